// Package buckets groups businesses into buckets so that the computation a
// gateway runs when a client connects, logs in or comes to the foreground
// (a sync round) costs one inbox read per non-empty bucket, not one per
// business, and so that under load the important buckets go first.
//
// # Why buckets
//
// With ~80 businesses, computing each one separately on every connect is
// ruinous. Businesses of the same nature are served by the same read: all
// the user-dimension businesses of a user are one prefix scan of the user's
// inbox from the lowest sync point among them. So the round asks Plan for
// the groups, reads once per group, and splits the entries by business.
// Adding a business to an existing bucket adds no read. (A custom bucket
// that mixes user- and device-dimension businesses costs the gateway one
// read per inbox it touches; the default buckets never mix.)
//
// # Default buckets and the default rule
//
// Five buckets exist without any control event:
//
//	name          priority  holds by default
//	global        0         nothing; the gateway computes topics (and the
//	                        everyone-topic) and global configuration here
//	device        1         device-dimension businesses
//	multi-device  1         user-dimension businesses in multi-device mode
//	                        (every device of the user gets each entry)
//	user          2         user-dimension businesses in single-device mode
//	                        (once one device acks, the others do not get it)
//	one-shot      3         nothing; operators move in businesses whose
//	                        entries are consumed once (commands, notices)
//
// A business without an assignment follows the default rule (DefaultRule):
// device, user or multi-device by its dimension and device mode. A
// definition named like a default bucket overrides its settings; a default
// bucket cannot be removed. Priority 0 runs first and is never deferred for
// overload; the rate limit of every default bucket is 0 (unlimited) until
// an operator sets one.
//
// # Control events
//
// Bucket definitions (bucketspb.Bucket) and assignments
// (bucketspb.Assignment) are control events in the SLUICE_CONTROL stream,
// on sluice.control.bucket.<name> and sluice.control.assign.<business>.
// Every node holds a Map: the projection of those subjects, replayed from
// the start by Open and followed by Run. Changing buckets needs no restart:
// Define, Remove and Assign validate, publish with JetStream (the ack means
// stored) and return once this node's Map has applied the event, so the
// next Plan on this node already uses it. Other nodes apply it as their Run
// reads it, normally within milliseconds; a round that started before sees
// the old plan, the next one the new.
//
// Invariants:
//
//   - The stream is the truth; a Map is a projection. Applying the same
//     events in stream order gives the same state (Buckets, BucketOf,
//     Assignments, Version) on every node and after every replay. The
//     apply step is deterministic and does no I/O (state.go).
//   - Invalid input is refused before anything is written, with the
//     oplog sentinels callers branch on: ErrInvalidID, ErrInvalid,
//     ErrUnknownBusiness, ErrNotFound. An invalid event found in the
//     stream (a foreign writer's) is skipped, deterministically.
//   - A write that fails after its publish (its ctx ended while it waited
//     to be applied) may still take effect: the event is stored. Every
//     write is idempotent, so retrying it is safe.
//   - Removing a custom bucket sends its businesses back to the default
//     rule; they stay there if a bucket of that name is defined again. An
//     assignment naming a bucket that no longer exists when it is applied
//     (a Remove won the race) has no effect, and its Assign reports
//     ErrNotFound.
//
// # Scheduler
//
// A Scheduler admits bucket computations on one node: a token bucket per
// bucket (Rate per second, Burst), and node overload — from
// SchedulerConfig.OverloadAt computations in flight, buckets of priority
// above 0 are deferred for DeferFor ±25% (jitter, so that deferred clients
// do not return together) while priority 0 proceeds. Settings are read
// from the Bucket passed to every Admit, so a new rate applies at once. It
// also measures: per bucket computations, reads, deferrals and latency
// quantiles; in total reads per computation (Stats, JSON-ready).
//
// # Concurrency
//
// Map and Scheduler are safe for concurrent use. Map readers (Plan,
// BucketOf, Buckets, ...) load an immutable snapshot through an atomic
// pointer and take no lock: Plan is on the path of every connect. One
// goroutine at a time reads the stream and builds snapshots: the holder of
// Map's reader mutex, which is Run while it runs, or Open, or a writer
// catching up by itself when Run is not running. It is the only lock of
// Map and nothing else is taken while it is held. The Scheduler's map lock
// and its per-bucket mutexes are never held together.
//
// A Map that falls behind its stream (NATS down, a slow node) keeps
// serving its last state; Plan never waits for the stream. Only writers
// wait, for their own event, and give up when their ctx ends.
package buckets
