// Package analytics will ingest client tracking events and compute app
// metrics and crash-rate circuit breaking. Not built yet: see the issue
// "Analytics".
package analytics
