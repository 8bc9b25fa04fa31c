// Package oplogpb holds the protobuf schema of Sluice's stored events and
// producer API. The .pb.go file is generated; edit oplog.proto and run
// go generate.
package oplogpb

//go:generate protoc -I . -I /usr/include --go_out=. --go_opt=paths=source_relative oplog.proto
