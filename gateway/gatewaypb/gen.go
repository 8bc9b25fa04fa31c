// Package gatewaypb holds the protobuf schema of the Sluice client
// protocol (gateway/PROTOCOL.md). The .pb.go file is generated; edit
// gateway.proto and run go generate.
package gatewaypb

//go:generate protoc -I . -I ../../delivery/deliverypb -I ../../analytics/analyticspb --go_out=. --go_opt=paths=source_relative gateway.proto
