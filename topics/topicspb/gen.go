// Package topicspb holds the protobuf schema of topic definitions, follow
// relations, topic cursors and the topic API. The .pb.go file is
// generated; edit topics.proto and run go generate. It imports oplog.proto
// by the name it is registered under (its own directory is on the path).
package topicspb

//go:generate protoc -I . -I ../../oplog/oplogpb -I /usr/include --go_out=. --go_opt=paths=source_relative topics.proto
