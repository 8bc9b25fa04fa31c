// Package fanoutpb holds the protobuf schema of fanout jobs, chunks, done
// markers, segment membership and the fanout API. The .pb.go file is
// generated; edit fanout.proto and run go generate.
package fanoutpb

//go:generate protoc -I . -I ../../oplog/oplogpb -I /usr/include --go_out=. --go_opt=paths=source_relative,Moplog.proto=github.com/sluicehq/sluice/oplog/oplogpb fanout.proto
