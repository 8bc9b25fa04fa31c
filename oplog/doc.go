// Package oplog is the core of Sluice: every change for a user or device
// (sync data, push, release, switch, command) becomes an entry in a
// JetStream oplog stream, and everything else is a projection of the log.
//
// # Pieces
//
//   - Log appends validated events (Append, AppendBatch) to the oplog
//     streams, one entry per target, and owns the stream definitions, their
//     epochs and the business registry (a KV bucket).
//   - Service serves producers over NATS: request/reply on SubjectAppend and
//     SubjectAppendBatch, and a router that moves fire-and-forget events from
//     the INGEST work-queue stream into the oplog, or into the dead-letter
//     stream with the reason in the Sluice-Error header.
//   - Inbox is the badger projection of the oplog and ACKS streams: per-user
//     and per-device inboxes, device sync points and single-device
//     watermarks. Backlog, SyncPoints, Ack, Rebuild and Digest read and
//     drive it. With InboxConfig.LocalFeed it applies this process's own
//     appends straight from the writer and reads the stream only for the
//     rest (see projector.go); the result is the same either way.
//
// # Invariants
//
//   - The log is the truth. An event is acknowledged (reply, or JetStream
//     ack on ingest) only once its entries are stored; with the default
//     always-fsync policy of sluiced, stored means on disk.
//   - Ids come from the log: an entry's id is its stream sequence, unique,
//     increasing in append order and never reused. Ids are only comparable
//     within one epoch; the epoch of a stream changes when the stream is
//     recreated, and a sync point of an old epoch counts as no sync point.
//   - Everything else is a projection: the Inbox records the sequence it has
//     applied in the same badger transaction as the data, resumes from it
//     after a crash, and can be dropped and rebuilt by replay with the same
//     result (Digest proves it).
//   - Source-of-truth streams refuse deletes and purges. Expired entries
//     leave storage by per-message TTL.
//
// # Ordering and delivery
//
// Entries of one target are in append order. A producer message id
// (Event.message_id) makes appends idempotent within the duplicate window:
// the same id for the same target yields the original entry with
// Duplicate set. Validation happens before any write, so a refused event
// writes nothing; an event with several targets whose append fails
// midway may be partly written, and its retry with the same message id
// completes it without duplicates. Transient events are published on
// the live subject (SubjectLive) only and never stored.
//
// Inbox.Watch delivers a target's entries live: stored ones once the
// projection has applied them (in id order), transient ones from the live
// subject. Inbox.Backlog waits until the projection holds every entry the
// stream held when it was called, so a reader that watches first and reads
// the backlog second misses nothing (it may see an entry twice, and
// dedupes by id). See live.go for why live entries come from the
// projection rather than from the stream's RePublish.
//
// # Concurrency
//
// Log, Service and Inbox are safe for concurrent use. Each projection is
// written by exactly one goroutine (its projector), which also performs
// rebuild resets on request; readers use badger read transactions. Each
// type holds at most one mutex and never calls out while holding it, so
// there is no lock order to respect. A projector that falls behind slows
// nobody: producers are acknowledged by the stream, and backlog readers
// wait only for the sequence they need.
package oplog
