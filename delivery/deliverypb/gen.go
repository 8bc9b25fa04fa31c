// Package deliverypb holds the protobuf schema of the delivery package:
// targeting rules, switches, package releases, pushes and the view a
// device gets. The .pb.go file is generated; edit delivery.proto and run
// go generate.
package deliverypb

//go:generate protoc -I . --go_out=. --go_opt=paths=source_relative delivery.proto
