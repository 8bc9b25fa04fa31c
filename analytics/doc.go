// Package analytics ingests client tracking events: apps upload batches
// (page views, sessions, custom events, crashes, freezes, performance
// samples) over HTTP, compressed or not; each event is validated, its
// device and user set from the device's token, its time clamped when in
// the future and refused when older than the late window, and stored in
// the SLUICE_ANALYTICS stream (one message per event, deduplicated by
// "<device>:<event id>") before the upload is answered: acknowledged =
// durable.
//
// Aggregates is the badger projection of the stream: per app and UTC day
// active and new users, sessions (server-side: a session ends after 30
// minutes without an event), session length, crashes, freezes, crashed
// sessions and users per app version and per release, page views and
// transitions, custom events, breakdowns of active users by version, OS,
// model, region and network; active users per ISO week and month;
// day-N retention per cohort (the first day a user was seen, in stream
// order). Duplicates past JetStream's window are dropped by event id, and
// malformed records never reach it; a rebuild gives the same digest.
//
// Breakers are circuit breakers: rules (control events) naming a release
// or a switch variant, optionally one device model, a metric (crash or
// freeze rate), a threshold, a minimum of sessions and a window. Every
// couple of seconds each armed rule is checked against per-minute
// counters the aggregates keep for the slices breakers watch (each
// release and switch variant on the devices, alone and per model); over
// the threshold, the action is taken once per rule version through
// Actions (delivery: pause, rollback, switch off; a pause or switch-off
// for one model when the rule says so: the model is left out of the gray
// release, the switch gets an "off" variant for it), and a trip records
// the evidence. The trip is written before the action with the expected
// last subject sequence, so one node acts.
//
// Apps also send batches over their link (gateway: ClientEvent.analytics,
// answered by AnalyticsAck); the Go SDK's Track batches events and obeys
// the reporting switch (a bool switch per app, its variants sampling
// devices).
//
// Diagnostics (diagnostics.go): a command sent over sync makes a device,
// or every device of a user, upload its logs to the Object Store; admins
// list the requests with their status and download the logs.
//
// Queries: Counters, Retention, CrashRates (the admin API's
// /v1/analytics), breakers (/v1/breakers), diagnostics
// (/v1/diagnostics).
package analytics
