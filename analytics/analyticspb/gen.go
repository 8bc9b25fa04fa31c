// Package analyticspb holds the protobuf schema of client tracking events.
// The .pb.go file is generated; edit analytics.proto and run go generate.
package analyticspb

//go:generate protoc -I . --go_out=. --go_opt=paths=source_relative analytics.proto diagnostics.proto
