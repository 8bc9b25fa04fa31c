// Package buckets will group businesses into buckets so that the sync
// computation on connect costs one read per bucket, not per business. Not
// built yet: see the issue "Fanout, topics and buckets".
package buckets
