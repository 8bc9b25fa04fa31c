// Package delivery is what Sluice delivers besides sync data: pushes,
// package releases with gray rules, and switches, all as events in NATS
// JetStream, with one targeting engine for the three.
//
// # Targeting
//
// A Rule (deliverypb.Rule, compiled by Compile) reaches a device when the
// time is inside its window and the device is whitelisted (users or
// devices), or passes every predicate set (app and OS version ranges, OS,
// model, network, region, CPU, channel) and falls inside the sticky
// percentage: a device's Place is a hash of the rule's salt (the release
// or switch) and its id, so the answer never changes while the rule does
// not, and raising the percentage only adds devices. Match does not
// allocate (about 125 ns per typical rule on one core here).
//
// # Switches and releases: control events, state as a projection
//
// Switch definitions (typed values, variants with rules evaluated in
// order, a kill switch), package events (upload, gray, full, pause,
// resume, stop, rollback) and producer keys are events in SLUICE_CONTROL
// (sluice.control.switch.<key>, .package.<name>, .producerkey.<id>,
// .recall.<push>). Every node replays them into memory (oplog.Control);
// one function, transition, holds the lifecycle rules for both the
// writer's check and the replay, so replaying gives the same state.
// Writes carry JetStream's expected last subject sequence: two admins
// cannot both move a release from the same state, and a switch edit can be
// made conditional on the version read (ErrConflict otherwise).
//
// Lifecycle: draft → gray (with a gray rule; the rule may change) → full;
// gray or full ↔ paused; any → stopped; Rollback takes back every release
// devices may have (gray, full, or offered then stopped) newer than the
// last stable (full) version, and resumes that version if paused.
//
// # Views: what one device is told
//
// View computes, for a device (id, user, attributes), the value of every
// switch and, per package, the release to have: walking the releases
// newest first, a gray release if the device is in its audience and gray
// rule, a full one if in its audience; paused, stopped and draft ones are
// skipped (devices keep what they have: they never downgrade on that);
// the rolled-back releases newer than the one offered make it a rollback
// (Manifest.rollback, rollback_from listing them) for every device, since
// a device may have a rolled-back release under a rule, window or
// attributes that no longer hold, and a client downgrades only from a
// version listed.
// Each release is a Manifest signed with the server's ed25519 key (signed
// once per state, not per device), carrying version, serial and expiry:
// clients install only what a valid, unexpired manifest with a serial no
// lower than the last accepted names, and downgrade only on a signed
// rollback. A hot patch must carry an ed25519 signature over its SHA-256
// from a registered producer key, checked at upload; a revoked key's hot
// patches are no longer offered.
//
// Gateways send the view over the sync link (the View frame, to clients
// that ask) on connect and whenever it changes (Changed: any state change,
// and a rule window opening or closing), so a new release is pushed ahead
// of time to the online devices it targets (push-pull). UpdatesHandler is
// the same check over HTTP, with the digest as ETag.
//
// # Packages and diffs
//
// Upload stores the bytes in the JetStream Object Store bucket
// sluice_packages (its SHA-256 checked against the store's digest) and
// computes diffs from the previous three versions with delivery/diff
// (file-level for zip archives, zstd with the old version as a raw
// dictionary for single files), keeping those smaller than the package.
// DownloadHandler serves packages and diffs to devices, with range
// requests and SHA-256 ETags.
//
// # Push
//
// Push sends a notification to users, devices, a fanout segment or
// everyone (lists bigger than one event's targets go through a fanout
// list job; everyone is one message of the topic every device reads). The
// title and body are templates ({{name}}), rendered with the push's and
// each target's variables; values are inserted literally. Validity, deep
// link, priority, app data and a collapse key (the oplog's: a newer
// entry replaces an older one not yet delivered) come with it. Recall
// withdraws what is not delivered yet: gateways drop entries of recalled
// pushes (Suppressed). Receipts (sent by gateways, delivered and opened by
// clients) are events in SLUICE_RECEIPTS, counted per push into a Funnel.
// Devices not reached over their link within a deadline get the push
// through their vendor channel (OfflineChannel; Webhook implemented),
// checked by a JetStream-scheduled message per push.
//
// # Device registry and dry runs
//
// Registry keeps what every device reported when it last connected (user,
// app, attributes, vendor push address), from events in SLUICE_DEVICES
// projected into badger. Dry runs count the known devices a rule, a
// release (audience and gray rule) or a push would reach.
//
// # Limits
//
// Switch keys, package names and producer key ids: 1-64 of [a-z0-9_-].
// Rules: 64 values per list, 10,000 whitelisted ids. Packages: 256 MiB
// (Config.MaxPackageSize). Push titles 256 and bodies 4,096 bytes once
// rendered, 32 KiB of data, validity up to 30 days.
//
// Not yet: per-app scoping of switches and releases (state is global to
// the deployment; apps name packages apart), offline checks for pushes to
// lists bigger than one event's targets.
package delivery
