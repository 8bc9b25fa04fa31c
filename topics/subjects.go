package topics

import (
	"encoding/binary"
	"strings"
)

// Streams, subjects and the names of the topic API. Every name this
// package puts on NATS is built here.
const (
	// StreamTopics holds every topic message once, on sluice.topic.<topic>.
	StreamTopics = "SLUICE_TOPICS"
	// StreamFollows holds the last definition of every topic, on
	// sluice.follow.<topic>, and the last state of every follow relation,
	// on sluice.follow.<topic>.<user>.
	StreamFollows = "SLUICE_FOLLOWS"
	// StreamTopicAcks holds the last acked cursor of every device and
	// topic, on sluice.tack.<device>.<topic>.
	StreamTopicAcks = "SLUICE_TOPIC_ACKS"

	// Request/reply subjects of the topic API (see Service).
	SubjectCreate    = "sluice.api.v1.topic.create"    // Topic → TopicReply
	SubjectDelete    = "sluice.api.v1.topic.delete"    // DeleteRequest → TopicReply
	SubjectPublish   = "sluice.api.v1.topic.publish"   // oplogpb.Event → oplogpb.AppendReply
	SubjectFollow    = "sluice.api.v1.topic.follow"    // FollowRequest → FollowReply
	SubjectUnfollow  = "sluice.api.v1.topic.unfollow"  // FollowRequest → FollowReply
	SubjectFollowers = "sluice.api.v1.topic.followers" // FollowersRequest → FollowersReply
	SubjectFollowing = "sluice.api.v1.topic.following" // FollowingRequest → FollowingReply

	subjectTopicPrefix  = "sluice.topic."
	subjectFollowPrefix = "sluice.follow."
	subjectAckPrefix    = "sluice.tack."
)

// SubjectTopic is where the messages of a topic are stored.
func SubjectTopic(topic string) string { return subjectTopicPrefix + topic }

// subjectDefinition is where a topic's definition is stored.
func subjectDefinition(topic string) string { return subjectFollowPrefix + topic }

// subjectRelation is where a user's follow state of a topic is stored. The
// topic comes first so that the relations of one topic share a prefix.
func subjectRelation(topic, user string) string {
	return subjectFollowPrefix + topic + "." + user
}

// subjectCursor is where a device's cursor of a topic is stored.
func subjectCursor(device, topic string) string { return subjectAckPrefix + device + "." + topic }

// parseTopicSubject returns the topic of a topic message subject.
func parseTopicSubject(subj string) (string, bool) {
	t, ok := strings.CutPrefix(subj, subjectTopicPrefix)
	return t, ok && validName(t)
}

// parseFollowSubject splits a follows stream subject: a definition has no
// user.
func parseFollowSubject(subj string) (topic, user string, ok bool) {
	rest, ok := strings.CutPrefix(subj, subjectFollowPrefix)
	if !ok {
		return "", "", false
	}
	topic, user, rel := strings.Cut(rest, ".")
	if !validName(topic) || rel && !validName(user) {
		return "", "", false
	}
	return topic, user, true
}

// parseCursorSubject splits a topic ack subject.
func parseCursorSubject(subj string) (device, topic string, ok bool) {
	rest, ok := strings.CutPrefix(subj, subjectAckPrefix)
	if !ok {
		return "", "", false
	}
	device, topic, ok = strings.Cut(rest, ".")
	return device, topic, ok && validName(device) && validName(topic)
}

// Key layout of the badger store. Ids never contain '/', so prefixes never
// collide; each projection owns its own prefixes.
//
//	m/<topic>/<seq:8 bytes BE>  topic message: the stored oplogpb.Entry (SLUICE_TOPICS)
//	d/<topic>                   definition status: seq (8 bytes BE), deleted (1), backfill (4 BE) (SLUICE_FOLLOWS)
//	t/<topic>                   definition: topicspb.Topic (SLUICE_FOLLOWS)
//	f/<user>/<topic>            follow state: see relation (SLUICE_FOLLOWS)
//	n/<topic>                   follower count (8 bytes BE), absent when 0 (SLUICE_FOLLOWS)
//	c/<device>/<topic>          acked cursor: id, epoch (8 bytes BE each) (SLUICE_TOPIC_ACKS)
//	a/<stream>                  applied stream sequence (oplog.Projection)
var (
	prefixMessages    = []byte("m/")
	prefixStatus      = []byte("d/")
	prefixDefinitions = []byte("t/")
	prefixFollows     = []byte("f/")
	prefixCounts      = []byte("n/")
	prefixCursors     = []byte("c/")
)

func messagePrefix(topic string) []byte { return []byte("m/" + topic + "/") }

func messageKey(topic string, seq uint64) []byte {
	return binary.BigEndian.AppendUint64(messagePrefix(topic), seq)
}

func statusKey(topic string) []byte         { return []byte("d/" + topic) }
func definitionKey(topic string) []byte     { return []byte("t/" + topic) }
func followPrefix(user string) []byte       { return []byte("f/" + user + "/") }
func followKey(user, topic string) []byte   { return []byte("f/" + user + "/" + topic) }
func countKey(topic string) []byte          { return []byte("n/" + topic) }
func cursorPrefix(device string) []byte     { return []byte("c/" + device + "/") }
func cursorKey(device, topic string) []byte { return []byte("c/" + device + "/" + topic) }
