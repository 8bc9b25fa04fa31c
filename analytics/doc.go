// Package analytics ingests client tracking events: apps upload batches
// (page views, sessions, custom events, crashes, freezes, performance
// samples) over HTTP, compressed or not; each event is validated, its
// device and user set from the device's token, its time clamped when in
// the future and refused when older than the late window, and stored in
// the SLUICE_ANALYTICS stream (one message per event, deduplicated by
// "<device>:<event id>") before the upload is answered: acknowledged =
// durable.
//
// Built so far: ingestion (Ingestor, Handler). Not yet: ingestion over
// the gateway link, the aggregations (active users, sessions, retention,
// pages, crash and freeze rates, breakdowns), queries, diagnostics and
// circuit breaking — see the issue "Analytics".
package analytics
