// Package gateway will serve apps over WebSocket and TLV sockets: hello,
// backlog, live entries, acks and link health. Not built yet: see the issue
// "Gateway".
package gateway
