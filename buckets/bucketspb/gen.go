// Package bucketspb holds the protobuf schema of the bucket control events.
// The .pb.go file is generated; edit buckets.proto and run go generate.
package bucketspb

//go:generate protoc -I . --go_out=. --go_opt=paths=source_relative buckets.proto
