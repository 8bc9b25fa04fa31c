package oplog

import (
	"fmt"
	"hash/fnv"
	"strconv"
	"strings"

	"github.com/sluicehq/sluice/oplog/oplogpb"
)

// Subjects and streams. Every name Sluice puts on NATS is built here.
const (
	// SubjectAppend takes one Event by request/reply and answers an AppendReply.
	SubjectAppend = "sluice.api.v1.append"
	// SubjectAppendBatch takes an EventBatch and answers an AppendBatchReply.
	SubjectAppendBatch = "sluice.api.v1.append.batch"
	// SubjectIngest is the prefix of fire-and-forget ingest subjects:
	// producers publish one Event to "sluice.ingest.<anything>" and get a
	// JetStream ack once it is stored in the INGEST stream.
	SubjectIngest = "sluice.ingest"

	// StreamIngest captures the ingest subjects (work queue).
	StreamIngest = "SLUICE_INGEST"
	// StreamDeadLetter holds ingested events that failed validation, with
	// the reason in the Sluice-Error and Sluice-Error-Code headers.
	StreamDeadLetter = "SLUICE_DLQ"
	// StreamAcks holds the last ack of every device and business.
	StreamAcks = "SLUICE_ACKS"
	// BucketBusinesses is the KV bucket of registered businesses.
	BucketBusinesses = "sluice_businesses"
	// StreamControl holds platform control events (buckets, business
	// assignments, ...), one subject family per kind: sluice.control.<kind>.<key>.
	// Projections of it are rebuilt by replaying it from the start; it keeps
	// every event (control traffic is small) and refuses deletes and purges.
	StreamControl = "SLUICE_CONTROL"

	// HeaderContentType selects the encoding of a request or ingest body:
	// "application/json" for protojson, anything else for protobuf.
	HeaderContentType = "Content-Type"
	// HeaderError and HeaderErrorCode carry the reason of a dead letter.
	HeaderError     = "Sluice-Error"
	HeaderErrorCode = "Sluice-Error-Code"
	// HeaderEpoch carries the epoch on transient live messages.
	HeaderEpoch = "Sluice-Epoch"
	// HeaderTransient marks a live message that was never stored.
	HeaderTransient = "Sluice-Transient"
	// HeaderCollapse carries an entry's collapse key, so that the inbox
	// projection can index it without decoding the entry.
	HeaderCollapse = "Sluice-Collapse"

	// ContentTypeJSON is the value of HeaderContentType for protojson.
	ContentTypeJSON = "application/json"
)

// StreamOplog is the name of the oplog stream of a shard.
func StreamOplog(shard uint32) string { return "SLUICE_OPLOG_" + strconv.FormatUint(uint64(shard), 10) }

// SubjectControl is the subject of a control event:
// sluice.control.<kind>.<key>... Each part must be a valid subject token
// (an id or business code).
func SubjectControl(kind string, key ...string) string {
	s := "sluice.control." + kind
	for _, k := range key {
		s += "." + k
	}
	return s
}

// dimToken is the subject token of a dimension.
func dimToken(d oplogpb.Dimension) string {
	if d == oplogpb.Dimension_DIMENSION_DEVICE {
		return "d"
	}
	return "u"
}

// SubjectOplog is where the entry of a target and business is stored:
// sluice.oplog.<shard>.<u|d>.<target>.<business>.
func SubjectOplog(shard uint32, dim oplogpb.Dimension, target, business string) string {
	return "sluice.oplog." + strconv.FormatUint(uint64(shard), 10) + "." + dimToken(dim) + "." + target + "." + business
}

// SubjectOplogTarget matches every stored entry of one target.
func SubjectOplogTarget(shard uint32, dim oplogpb.Dimension, target string) string {
	return "sluice.oplog." + strconv.FormatUint(uint64(shard), 10) + "." + dimToken(dim) + "." + target + ".*"
}

// SubjectLive is where transient entries are published (never stored):
// sluice.live.<shard>.<u|d>.<target>.<business>. Stored entries reach live
// readers in process, from the projection (Inbox.Watch).
func SubjectLive(shard uint32, dim oplogpb.Dimension, target, business string) string {
	return "sluice.live." + strconv.FormatUint(uint64(shard), 10) + "." + dimToken(dim) + "." + target + "." + business
}

// SubjectLiveTarget matches every live entry of one target.
func SubjectLiveTarget(shard uint32, dim oplogpb.Dimension, target string) string {
	return "sluice.live." + strconv.FormatUint(uint64(shard), 10) + "." + dimToken(dim) + "." + target + ".*"
}

// SubjectAck is where a device's ack of a business is stored:
// sluice.ack.<device>.<business>.<user, or ~ for none>. The stream keeps the
// last ack per subject; the user is part of the subject so that a device
// that changes users keeps, after a replay, the acks that set each user's
// single-device watermark.
func SubjectAck(device, business, user string) string {
	if user == "" {
		user = "~"
	}
	return "sluice.ack." + device + "." + business + "." + user
}

// ParseOplogSubject splits an oplog or live subject into its parts. It
// runs for every projected entry, so it cuts the subject in place rather
// than allocating a slice of tokens.
func ParseOplogSubject(subj string) (shard uint32, dim oplogpb.Dimension, target, business string, err error) {
	bad := func(what string) error { return fmt.Errorf("subject %q: %s: %w", clip(subj), what, ErrInvalid) }
	rest, ok := strings.CutPrefix(subj, "sluice.")
	if !ok {
		return 0, 0, "", "", bad("prefix")
	}
	kind, rest, _ := strings.Cut(rest, ".")
	if kind != "oplog" && kind != "live" {
		return 0, 0, "", "", bad("kind")
	}
	shardTok, rest, _ := strings.Cut(rest, ".")
	n, perr := strconv.ParseUint(shardTok, 10, 32)
	if perr != nil {
		return 0, 0, "", "", bad("shard")
	}
	dimTok, rest, _ := strings.Cut(rest, ".")
	switch dimTok {
	case "u":
		dim = oplogpb.Dimension_DIMENSION_USER
	case "d":
		dim = oplogpb.Dimension_DIMENSION_DEVICE
	default:
		return 0, 0, "", "", bad("dimension")
	}
	target, business, ok = strings.Cut(rest, ".")
	if !ok || target == "" || business == "" || strings.Contains(business, ".") {
		return 0, 0, "", "", bad("target and business")
	}
	return uint32(n), dim, target, business, nil
}

// ShardOf returns the shard a target lives on: FNV-1a of the id modulo the
// shard count. A target always lives on one shard; changing the shard count
// of a deployment needs a migration.
func ShardOf(target string, shards int) uint32 {
	if shards <= 1 {
		return 0
	}
	h := fnv.New32a()
	h.Write([]byte(target))
	return h.Sum32() % uint32(shards)
}
