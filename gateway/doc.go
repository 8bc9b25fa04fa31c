// Package gateway serves apps over WebSocket and TLV-framed TCP: hello with
// a signed token, the backlog after the client's sync points, live
// entries, acks, and link health. gateway/PROTOCOL.md is the protocol;
// gatewaypb its schema; wire its codec, shared with the Go client.
//
// # Sessions
//
// A link becomes a session once its Hello names a valid token. The
// session watches the device's inbox and, when a user is bound, the
// user's (oplog.Inbox.Watch), then runs a sync round: it reads the
// backlog after the client's points and queues it as Sync frames, while
// live entries that arrive meanwhile are held; after the round the held
// entries are sent unless the backlog already carried them (dedupe by id
// per business). Watching before reading the backlog means no entry falls
// between the two. Login and foreground events start another round; so
// does a round whose held entries overflowed (the live path's gap goes
// back to the backlog).
//
// A round reads per bucket of businesses (Config.Buckets; round.go): one
// read per non-empty bucket in priority order, each admitted by the
// scheduler, which defers lower buckets under load. The global bucket
// also reads the user's topics and Everyone (Config.Topics; topics.go):
// topic messages are stored once and reach sessions through one
// in-process watch per topic and session.
//
// Goroutines per link: a flusher only while frames are queued (an idle
// link has no writer); a sync round only while it runs; the liveness
// timer's callback briefly; and a reader. Hello is read on a goroutine of
// its own, so that the reader's stack stays small. On Linux a plain-TCP
// link past Hello has no reader goroutine either: an epoll poller
// (poll_linux.go) watches it and a short-lived goroutine reads it when it
// is readable; the poller's descriptor is itself polled by the runtime, so
// no thread blocks in epoll_wait. WebSocket and TLS links keep a reader, blocked in their
// library's read. Measured at 10,000 idle links: 4.4 KiB per TLV link and
// 13.7 KiB per WebSocket link (README, Performance); topics add no map to
// an idle session (see topics.go). Live entries are
// queued on the inbox's goroutine and never block it: a client whose
// queue overflows (Config.SendQueue, SendBytes) is a slow consumer and is
// disconnected; it resyncs from its sync point when it comes back.
//
// # Link health
//
// Clients ping at the Welcome's heartbeat. A link silent for a heartbeat
// and a half gets a Probe; one that does not echo it within ProbeTimeout
// is closed as dead, one silent for three heartbeats as idle. A device
// that opens a new link replaces its old one: the old link's queue is
// drained, then it gets GoAway(REPLACED). Shutdown drains every link the
// same way with GoAway(SHUTDOWN) and a spread reconnect hint.
//
// # Dispatch
//
// Registry announces this node in the sluice_gateways KV bucket (with a
// TTL) and answers /v1/dispatch with the live nodes in a stable order per
// device.
package gateway
