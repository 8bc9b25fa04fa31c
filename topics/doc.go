// Package topics will hold read diffusion: topics stored once and read by
// every follower, with a follow index rebuildable by replay. Not built yet:
// see the issue "Fanout, topics and buckets".
package topics
