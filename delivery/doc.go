// Package delivery will hold pushes, package releases with gray rules and
// switches, all as oplog events. Not built yet: see the issue "Delivery".
package delivery
