// Package fanout will expand one producer event to many recipients (lists,
// segments, everyone) exactly once. Not built yet: see the issue "Fanout,
// topics and buckets".
package fanout
