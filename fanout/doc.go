// Package fanout writes one producer event to many recipients (write
// diffusion): each recipient gets its own entry in its oplog inbox,
// exactly once, even when the process writing it is killed midway.
//
// # Audiences
//
// A Job names an event template (an oplogpb.Event without targets or
// message id) and one audience:
//
//   - a list of ids, up to millions, that the producer streams in chunks:
//     Create, then AddRecipients(job, n, ids) for n = 0, 1, 2, ... (each
//     at most Config.ChunkSize ids, default 1,000), then Seal(job, chunks).
//     Writing starts with the first chunk; the job is done when it is
//     sealed and every chunk is written. Nothing ever holds the whole list.
//   - a segment: a named set of users kept by events (SegmentAdd,
//     SegmentRemove), expanded by Run into chunks in user-id order.
//   - everyone: the event is stored once as a global entry that every
//     device reads (read diffusion), through Config.Global (the topics
//     package's "_all" topic), not copied into a million inboxes.
//
// Every entry a job writes carries the message id MessageID(job),
// "fanout-<job>", so each recipient's entry is stored with Nats-Msg-Id
// "fanout-<job>/<recipient>". The job id (id alphabet) is the producer's
// idempotency key: Create again with the same spec returns the job, with
// another spec it fails with oplog.ErrInvalid.
//
// # Storage
//
//   - BucketJobs (KV): "<job>.spec", the Job, written once by Create; and
//     "<job>.state", its JobState (sealed, chunk counts, segment cursor,
//     expander lease, final figures), changed by compare-and-set only.
//   - StreamFanout (work queue): chunk n of job J on SubjectChunk(J) with
//     Nats-Msg-Id "J/n", so a chunk published twice within the duplicate
//     window is stored once. A chunk leaves the queue when acked.
//   - BucketDone (KV): "J.n", the ChunkDone marker of a written chunk
//     (created once, never overwritten), and "J.n.started", created at the
//     first attempt at the chunk.
//   - StreamSegments: one Membership per segment and user (the stream
//     keeps the last), projected into badger in Config.Dir: see segment.go.
//     The projection is rebuildable (Projections, Rebuild, Digest,
//     Applied), like the inbox.
//
// Job records and markers are kept for Config.Retention (default 7 days):
// a job must end within it.
//
// # Writing a chunk, exactly once
//
// The workers of every node share one durable pull consumer. For a chunk
// a worker:
//
//  1. acks and skips it if its done marker exists (a redelivery after a
//     crash between marker and ack, or a second copy of the chunk);
//  2. acks and drops it if the job was cancelled, has ended, or is sealed
//     with fewer chunks than its number;
//  3. creates the start marker if there is none (the first attempt);
//  4. appends the template to the chunk's valid ids (invalid ids count as
//     failed, ids named twice once), in events of at most the log's
//     MaxTargets, with message id "fanout-J", in the oplog's bulk lane;
//  5. creates the done marker with the counts, then acks.
//
// A crash (or a failed append) before step 5 leaves the chunk unacked: it
// comes back (at once when a node starts, which resets the consumer to its
// ack floor; otherwise after the ack wait or a back-off), and is written
// again. Entries written by the earlier attempt are not written twice:
//
//   - Within the duplicate window (oplog.Config.DuplicateWindow, default 2
//     minutes) the oplog stream itself drops them: same Nats-Msg-Id.
//   - Every append of a chunk, by any attempt, happens after its start
//     marker was stored. So when the start marker is younger than half the
//     window, everything an earlier attempt appended is still remembered
//     by the stream. Otherwise (a crash that lasted, a long back-off), the
//     worker first looks each recipient up in this node's inbox projection
//     (oplog.Inbox.Find, from the sequence the job recorded per shard at
//     Create, for message id "fanout-J", after the projection has caught
//     up with the stream) and appends only to those not found; they count
//     as recovered in the marker. The half-window margin absorbs clock
//     skew between nodes and the server.
//   - After step 5, the marker makes every later delivery a no-op.
//
// What this assumes: no single append call stalls for longer than half the
// duplicate window while another attempt at the same chunk runs (a node
// frozen mid-append, then resumed after another node redid its chunk).
// Two attempts can run at once when a node starts (the consumer reset
// redelivers chunks other nodes are writing): both append within moments
// of each other, so the stream dedupes, and the marker is created once.
//
// Progress is summed from the markers, one per chunk whoever wrote it, so
// Status is exact after any crash: total (the ids known: added so far
// while running, the sum over chunks once done), done, failed, chunks
// done, started (the first chunk's start) and rate = done / (finished or
// now − started). On every node running Run, a tracker follows the markers
// of each sealed job and ends it, with a compare-and-set, when every chunk
// has one: DONE, or FAILED if nothing could be written (for example the
// event expired before its first chunk: entries are never written past
// expires_at, they count as failed).
//
// # Segments
//
// A segment job is expanded by one node at a time: the node that created
// it if it runs Run, else any node running Run. The expander holds a lease
// in the job state, renewed at every step; when it lapses (the node died)
// another node takes the job over where the state says. The state keeps a
// cursor: every member up to it (in user-id byte order) is in a chunk
// already. Before publishing chunk n the expander records the end of its
// range (chunk_end), publishes the members in (cursor, chunk_end] as
// chunk n with message id "J/n", then moves the cursor to chunk_end. A
// resumed expander republishes the same range under the same number; a
// copy is stored once, or written once thanks to the marker. When no
// member is left after the cursor it seals the job with its chunk count.
//
// Which members a segment job reaches: the members of the segment as the
// expander walks it. A member added (or removed) before the expander's
// planned range reaches their id is included (or left out); one changed
// after the range passed them is not affected; a change inside a planned
// range during a takeover may go either way. Each member reached gets
// exactly one entry.
//
// # Everyone
//
// An everyone job is one call of Global.Publish with message id
// "fanout-J", by the job's expander (with the same lease), retried while
// it fails with oplog.ErrUnavailable. Global must dedupe on the message
// id: after a crash between the publish and the job's end, it is called
// again. The job is DONE with total 1.
//
// # Single-user traffic comes first
//
// A big fanout must not delay one user's chat message. Each node writes at
// most Config.Concurrency chunks at once (default 2), and appends them
// with oplog.WithBulk: each oplog shard's writer takes every other queued
// append before a bulk one, so a single append waits at most for the
// commit in flight. Chunks of different jobs are taken in queue order;
// there is no fairness between jobs.
//
// # Cancel
//
// Cancel marks the job CANCELLED with the figures so far: the expander
// stops at its next step, and workers ack the job's remaining chunks
// without writing them. A chunk being written when Cancel lands finishes.
// Entries written stay (the log is append-only).
//
// # Limits and errors
//
// Errors are the oplog's sentinels, so producers branch on one set:
// oplog.ErrInvalidID (job, segment or user id outside the id alphabet),
// oplog.ErrUnknownBusiness, oplog.ErrUnknownKind, oplog.ErrPayloadTooLarge,
// oplog.ErrExpired and oplog.ErrInvalid (the template validated as an
// oplog event would be), oplog.ErrTooManyTargets (a chunk or a membership
// change over ChunkSize ids), oplog.ErrNoTargets, oplog.ErrNotFound (no
// such job), oplog.ErrUnavailable (NATS failed; retry). A job has at
// most MaxChunks chunks. A refused call
// writes nothing. Service serves the same operations over NATS
// request/reply (SubjectCreate and the others), answering typed errors as
// oplogpb.Error.
//
// Not checked: a list job sealed with chunk numbers it never added
// (holes below the count) stays running until they are added; ids named
// in two chunks get one entry if both are written within the duplicate
// window, two otherwise.
//
// # Concurrency
//
// Fanout and Service are safe for concurrent use. Run owns every goroutine
// it starts (workers, the manager and its trackers and expanders, the
// segment projection) and returns after they exit. The package holds no
// mutex across calls (a sync.Map caches job specs, which never change);
// all shared state is in NATS and changed by compare-and-set, so there is
// no lock order.
//
// Logs use component=fanout (fanout-api for Service) and, beyond the
// README's vocabulary, job, chunk, segment, audience, state, chunks,
// recipients, total, done, failed, recovered, tries and key.
package fanout
