// Package topics is read diffusion: a publisher with millions of followers
// publishes each message once, into a topic stream, and every follower
// reads it from there. The oplog writes each change into every
// recipient's inbox (write diffusion); for a merchant with 500 million
// followers that would be 500 million writes and tens of minutes. Here it
// is one write, and the follower's devices find it through an index of
// follow relations when they sync, and through one in-process watch per
// gateway node while they are online.
//
// # Streams
//
// Open creates (with oplog.Log.EnsureStream, so each has an epoch) three
// streams that refuse deletes and purges, and returns a *Topics: the
// streams' writer and their badger projections, one per node. (The name
// stutters, topics.Topics; it is the one the gateway uses for
// "the topics of this node", and no shorter noun said it better.)
//
//   - SLUICE_TOPICS (StreamTopics): every topic message once, an
//     oplogpb.Entry of kind KIND_TOPIC_MESSAGE on sluice.topic.<topic>.
//     A message's id is its stream sequence and its epoch the stream's;
//     per-message TTL removes expired ones; a producer message id dedupes
//     within the duplicate window.
//   - SLUICE_FOLLOWS (StreamFollows), one message kept per subject: topic
//     definitions (topicspb.Topic) on sluice.follow.<topic>, and follow
//     relations (topicspb.Follow) on sluice.follow.<topic>.<user>. Each
//     message is the whole current state of its subject, so the stream
//     stays as large as the number of relations, not of follow changes.
//   - SLUICE_TOPIC_ACKS (StreamTopicAcks), one message kept per subject:
//     a device's acked cursor of a topic on sluice.tack.<device>.<topic>.
//
// # Why a follow event carries its bounds
//
// A relation says: the user gets exactly the topic messages with
// From < id, and id <= Until once unfollowed. Follow computes From when it
// writes the event — the topic stream's last sequence then, or just before
// the topic's Backfill-th last message — and Unfollow computes Until the
// same way, and both are written into the event. The index is therefore a
// function of the follows stream alone: replaying it gives the same
// answers whatever the interleaving of the topic and follows streams was
// during the replay, or when the events were first applied. (Deriving
// From from "the topic messages applied before the follow" would make the
// index depend on which projection ran ahead.) The same fixed bounds let a
// gateway filter live messages: it delivers one to a user when the user's
// current Follow Covers its id.
//
// # Key layout (one badger store, three oplog.Projection instances)
//
//	m/<topic>/<seq:8 BE>  message (the stored Entry)       SLUICE_TOPICS
//	d/<topic>             definition status (small)        SLUICE_FOLLOWS
//	t/<topic>             definition (topicspb.Topic)      SLUICE_FOLLOWS
//	f/<user>/<topic>      follow state: from, until, ...   SLUICE_FOLLOWS
//	n/<topic>             follower count, absent when 0    SLUICE_FOLLOWS
//	c/<device>/<topic>    acked cursor: id, epoch          SLUICE_TOPIC_ACKS
//
// "Which topics does this user follow, from which cursor" is one prefix
// scan of f/<user>/. The follower count n/<topic> is updated in the same
// transaction as the relation, from the relation's previous state in the
// index (one writer goroutine per projection makes the read-modify-write
// safe), so it always equals the number of following relations, after any
// replay.
//
// # Invariants
//
//   - The streams are the truth; the store is a projection of them,
//     resumable after a crash (each projection records the sequence it
//     applied in the same transaction) and rebuildable from zero with the
//     same Digest (Rebuild, Digest, Projections, Applied).
//   - Ids come from the topic stream and are only comparable within its
//     epoch: follow bounds of another epoch are ignored (a following
//     relation then covers the whole new epoch; an ended one nothing), and
//     a client cursor of another epoch is reported in Backlog.Reset.
//   - Every refusal writes nothing and wraps an oplog sentinel
//     (ErrUnknownTopic, ErrInvalidID, ErrInvalid, ErrNotFound,
//     ErrPayloadTooLarge, ErrExpired, ErrEpochMismatch, ...).
//   - Topic names use the id alphabet. Names starting with "_" are the
//     system's: Create and Delete refuse them. Everyone ("_all") is
//     followed by every device implicitly, with no follow event; Open
//     defines it, and a device without a cursor for it starts before its
//     last Backfill messages. Publishing to it reaches every device.
//   - A deleted topic takes no message and no follower, and backlogs and
//     Following leave it out; its name is never reused (its messages and
//     relations stay in the streams).
//
// # Ordering and delivery
//
// Follow, Unfollow, Create and Delete return once this node's index
// holds the change, so a Following, Followers or Backlog after them sees
// it. They read, then write with the subject's expected last sequence
// (JetStream's optimistic concurrency), and retry on a concurrent change:
// changes of one relation or one definition are linearizable. FollowMany
// pipelines thousands of follow events for bulk imports without that
// guard. Ack, like the oplog's, only moves a cursor forward.
//
// Backlog first waits until the projections hold what their streams held
// at the call, then reads: Everyone first, then the followed topics by
// name, each in id order. Watch delivers each message committed to this
// node's store after the call, once (never again after a rebuild), in id
// order. A reader that watches first and reads the backlog second misses
// nothing and dedupes by id. WatchFollows delivers a user's relation
// changes once this node has applied them, before any message past an
// unfollow's Until is dispatched to watchers: Unfollow reads Until and
// applies its event while live dispatch is held (the unfollowing lock),
// and dispatch first waits for the follows projection to hold every
// relation event already written. That order holds within one process;
// with several nodes, an unfollow made on another node can still race a
// message published at the same moment, which a gateway here may then
// deliver. The backlog never returns a message past Until.
//
// With Config.SoleWriter (this process writes every message of the three
// streams, as sluiced does with its embedded server) each publish ack is
// reported to its projection, and readers wait for what was stored
// instead of asking each stream for its last sequence: a Backlog costs no
// NATS round trip.
//
// # Concurrency
//
// Topics, Service, Client, Watch and FollowWatch are safe for concurrent
// use. Each projection is written by its own goroutine (Run), which also
// calls the watchers. The watch registry has one mutex, the per-topic
// bounds another; neither is held while the other is taken or while
// calling out, so there is no lock order, and a watcher's fn may itself
// Watch or Stop. Dispatching a message takes one read lock, not one per
// watcher (see live.go).
//
// Slow consumers: a watcher's fn runs on the projection's goroutine and
// must never block; it should hand the entry to a bounded queue and drop
// its reader on overflow (the reader then resyncs from its cursor). A
// blocking fn stalls this node's topic delivery, not producers, which are
// acknowledged by the stream.
//
// # Cost (2 cores, lazy fsync; topics_bench_test.go)
//
//   - FollowMany: 1,000,000 followers of one topic published and indexed
//     in 22 s (~45,000 follows/s; 35 s with other work on the machine);
//     100,000 at 40,000-58,000/s. Most of the time is the server storing
//     each event; with always-fsync its per-message sync bounds it lower.
//   - Backlog of a user following 100 topics, 5 with news: ~0.2 ms and 6
//     badger scans (the index, then only the topics with messages past
//     the device's cursor: per-topic bounds of the newest id, kept in
//     memory, let the others be skipped unread).
//   - One message to 15,000 watchers of one topic: ~0.35 ms from publish
//     to the last watcher; 15,000 watches of one topic registered and
//     stopped: ~2 ms.
//
// # Not done here
//
// Ended relations stay in the index and the follows stream (one small
// record per relation ever made; the streams refuse purges). Transient
// (never stored) topic messages are refused. Follow events are not
// batched atomically, so FollowMany with always-fsync is limited by the
// stream's per-message sync.
package topics
