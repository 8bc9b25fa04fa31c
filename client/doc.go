// Package client is the Go SDK of the Sluice client protocol
// (gateway/PROTOCOL.md): it keeps one device in sync with a gateway over
// WebSocket (ws://, wss://) or TLV-framed TCP (tcp://, tls://), and hands
// the app each item once, in order, per business and per topic.
//
// It imports only gateway/gatewaypb and delivery/deliverypb (the
// schemas), gateway/wire (the codec) and delivery/diff (to apply package
// diffs) of this module, never the server; deps_test.go checks it. It is
// the one package besides gateway and cmd that uses coder/websocket, to
// dial what the gateway serves (oplog/deps_test.go lists it as an owner).
//
// # Use
//
// New a Client with a Config (URL, a Token func, a StateDir), register a
// Handler per business with Handle and per topic with HandleTopic (and
// optionally HandleDefault, HandleReset and HandleTopicReset), then call
// Run, which blocks until its context ends. Login, Logout, Foreground and
// Background send app events on the current link.
//
// # Delivery
//
// The client keeps a sync point (id and epoch) per business, persisted in
// StateDir, and presents them in each Hello; the server sends what
// follows them (a sync round of Sync frames), then live items. Items are
// handed to the handlers one at a time, in arrival order, on Run's
// goroutine: handlers never run concurrently. Per business ids only grow,
// so an item at or below the business's sync point of the same epoch is a
// duplicate and dropped (Stats.Duplicates). Transient items (id 0) are
// delivered as they come and touch no sync point. An item whose
// expires_ms has passed by the server's clock is dropped but passes the
// sync point (Stats.Expired). A business the server resets (its stream
// was recreated) goes to the ResetHandler and loses its sync point before
// the round's items are delivered. A round ends with a Sync frame with
// done set, which may carry no items.
//
// When a handler returns nil the business's sync point (or the topic's
// cursor) advances in memory. Points and cursors are written to StateDir
// (temporary file, fsync, rename) and then acked to the server, at most
// AckInterval after an item and at once at the end of every sync round:
// never acked before persisted. When a handler fails, nothing past the
// item is acked: the client persists what came before, closes the link and
// reconnects with backoff, and the server sends the item again. Delivery
// is at least once: an item processed but not yet persisted when the
// process dies comes again after the restart; short of that, each item
// reaches its handler once.
//
// # Topics
//
// A user follows topics (read diffusion: a topic message is stored once,
// in the topic's stream), and the built-in topic "_all" reaches every
// device. The server merges the topics' messages into the same sync rounds
// and live delivery as the businesses'. A topic item has Item.Topic set;
// its Id and Epoch are the topic stream's, so the client keeps a cursor
// per topic (a SyncPoint, see TopicCursors) beside the sync points: it
// presents the cursors in each Hello (Hello.topics), dedupes topic items
// against them exactly as business items against their points, and acks
// them (Ack.topics) with the same rule, persisted first. A topic item goes
// to the handler of its topic (HandleTopic), else to that of its business
// (Item.Business, when the message names the component that handles it),
// else to the default handler. A topic the server resets (Sync.topic_resets:
// its stream was recreated) goes to the HandleTopicReset function and
// loses its cursor before the round's items are delivered
// (Stats.TopicResets). Topic ids are the same for every user, so topic
// cursors are kept when the bound user changes.
//
// # Deferred buckets
//
// Under load the server may defer the lower-priority buckets (groups of
// businesses) of a round: the round's done frame lists them
// (Sync.deferred), and their items come neither in the round nor live. The
// client then sends a FOREGROUND event, which starts a round, after
// Sync.retry_after_ms (DefaultDeferRetry if 0) plus a random jitter of up
// to DeferJitter of it (Stats.Deferrals, Stats.DeferRetries). It asks once
// per deferral: another deferral re-arms the wait, a round that ends
// without deferrals cancels it, and so does the end of the link (the next
// link's Hello starts a round anyway). The server also runs a round by
// itself a little later if the client does not ask.
//
// # Switches and releases
//
// With Config.Views the Hello asks for View frames (PROTOCOL.md §4.11):
// the device's switch values and, per package, the release it should have
// as a manifest signed by the server. The server sends one after Welcome
// when the device's view differs from the one the client holds (whose
// digest the Hello presents), and again whenever it changes; each View
// replaces the last. The client verifies every manifest's ed25519
// signature with Config.ManifestKeys (the key its key_id names: hex of
// the key's first 8 bytes), drops those that fail (logged,
// Stats.ManifestsRejected; the rest of the view still applies), writes
// the view to StateDir (view.pb, replaced atomically like the sync
// points) and then tells the HandleView function. View frames are applied
// on Run's goroutine in their order among Sync and Live frames. The
// persisted view is loaded by New, so Switch, SwitchBool, SwitchString,
// SwitchInt, SwitchNumber and Releases answer offline and after a
// restart, and its digest saves a resend at the next Hello. Without a
// link, CheckUpdates asks over HTTP (GET /v1/updates on Config.HTTPBase,
// by default the ws:// or wss:// URL's host as http(s)://; If-None-Match
// the digest held) and applies a new view the same way.
//
// The client installs nothing itself: the app calls CheckInstall, or
// Install, which checks the same, downloads, verifies and returns the
// bytes to install. A manifest is refused when it expired (by the
// server's clock as the last Welcome told it), when its serial is below
// the highest the client accepted for the package (a replay;
// serials.json in StateDir), and when its version is not above the one
// installed unless it is a signed rollback from it. Install prefers a diff
// from the installed version (applied with delivery/diff, the result
// checked against the manifest's SHA-256 or, for an archive, its tree
// digest), then the whole package from the gateway (a broken transfer
// resumes with a range request), then the manifest's fallback_url (sent
// no token); every body is bounded by the size the manifest announces and
// checked against its digest. Only verified bytes are returned, and only
// then is the manifest's serial accepted.
//
// # Links and reconnection
//
// Run makes one link at a time. It pings every Welcome.heartbeat_ms and
// answers the server's probes at once from its reader, whatever the
// handlers are doing; it takes a link it has heard nothing on for three
// heartbeats for dead. After a link ends it waits a full-jitter backoff,
// uniform in [0, min(MaxBackoff, MinBackoff·2ⁿ)] for the n-th attempt in
// a row (n resets after a session that completed a sync round or lasted
// 30 s), and at least the GoAway's reconnect hint, then connects again,
// to the next URL of the list when the last dial failed or the node is
// draining (GoAway SHUTDOWN). It calls Config.Token at each attempt, so
// an expired token (TOKEN_EXPIRED) is replaced. It stops, returning an
// error, when the server refuses the token as invalid (ErrUnauthenticated),
// speaks another protocol version (ErrUnsupportedVersion) or replaced the
// link with a newer one of the same device (ErrReplaced).
//
// # Slow handlers
//
// The reader hands Sync and Live frames to the handler loop through a
// small queue and blocks when it is full, so a client never buffers more
// than a few frames. The server paces a sync round by the client's
// reading, but live items it cannot queue make the client a slow
// consumer: the server closes the link (GoAway SLOW_CONSUMER) and the
// client resyncs from its sync points after reconnecting. Keep handlers
// quick; hand long work to a queue of the app's own.
//
// # Users
//
// The token names the device and maybe a user. Ids of a user's businesses
// mean nothing for another user, so the state file records the user the
// sync points were earned under. On a link, Login and Logout switch the
// user and the server resets the user's businesses in the next round
// (HandleReset is told). When a link opens with a token for another user
// than the stored points', the client drops all its points (it cannot
// tell which businesses are the user's; topic cursors stay, as topic ids
// mean the same for every user) and says Hello again without them: the
// server then resumes each business from the sync point it recorded,
// device businesses as last acked and the user's as acked under that
// user, so little or nothing comes twice. Dropping the app's own data of
// the previous user is the app's business.
//
// # Concurrency
//
// A Client's methods are safe for concurrent use; one Run runs at a time
// (ErrRunning). Run owns every goroutine it starts, a reader and a pinger
// per link, and returns after they exit; its timers (acks, deferral
// retries) fire into Run's own loop. CheckUpdates and Install run on their
// caller's goroutine and start none of their own (the HTTP client's
// transport keeps idle connections, as net/http does). Client.mu
// (handlers, stats, the current link, the view, the serials) is taken
// last: viewMu (applying a view) and serialMu (writing the serial file)
// may be held while taking it, never the reverse, and neither is held
// while a handler runs. Client.mu and a link's write lock are never held
// together. View handler calls never overlap (see HandleView).
package client
