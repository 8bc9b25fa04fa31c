package analytics

import (
	"math"

	"github.com/sluicehq/sluice/analytics/analyticspb"
	"google.golang.org/protobuf/encoding/protowire"
)

// Field numbers of analyticspb.Event (analytics.proto).
const (
	fieldID protowire.Number = iota + 1
	fieldType
	fieldTimeMs
	fieldDevice
	fieldUser
	fieldApp
	fieldAppVersion
	fieldOs
	fieldOsVersion
	fieldModel
	fieldRegion
	fieldNetwork
	fieldReleases
	fieldSwitches
	fieldPage
	fieldReferrer
	fieldName
	fieldProperties
	fieldStack
	fieldDurationMs
	fieldValue
	fieldSession
	fieldReceivedMs
	eventFields = fieldReceivedMs // the highest field number encoded
)

// appendEvent appends ev's protobuf encoding, as proto.Marshal would
// write it (proto3: zero values left out; map entries in map order),
// without reflection: Ingest encodes every event it stores, and the
// generic encoder spends most of its time walking the maps. proto.Equal
// holds after a round trip for every field (TestAppendEventCoversEveryField
// fails when a field is added to the message and not here).
func appendEvent(b []byte, ev *analyticspb.Event) []byte {
	b = appendString(b, fieldID, ev.Id)
	b = appendInt(b, fieldType, int64(ev.Type))
	b = appendInt(b, fieldTimeMs, ev.TimeMs)
	b = appendString(b, fieldDevice, ev.Device)
	b = appendString(b, fieldUser, ev.User)
	b = appendString(b, fieldApp, ev.App)
	b = appendString(b, fieldAppVersion, ev.AppVersion)
	b = appendString(b, fieldOs, ev.Os)
	b = appendString(b, fieldOsVersion, ev.OsVersion)
	b = appendString(b, fieldModel, ev.Model)
	b = appendString(b, fieldRegion, ev.Region)
	b = appendString(b, fieldNetwork, ev.Network)
	b = appendMap(b, fieldReleases, ev.Releases)
	b = appendMap(b, fieldSwitches, ev.Switches)
	b = appendString(b, fieldPage, ev.Page)
	b = appendString(b, fieldReferrer, ev.Referrer)
	b = appendString(b, fieldName, ev.Name)
	b = appendMap(b, fieldProperties, ev.Properties)
	b = appendString(b, fieldStack, ev.Stack)
	b = appendInt(b, fieldDurationMs, ev.DurationMs)
	if bits := math.Float64bits(ev.Value); bits != 0 {
		b = protowire.AppendTag(b, fieldValue, protowire.Fixed64Type)
		b = protowire.AppendFixed64(b, bits)
	}
	b = appendString(b, fieldSession, ev.Session)
	b = appendInt(b, fieldReceivedMs, ev.ReceivedMs)
	return b
}

func appendString(b []byte, n protowire.Number, s string) []byte {
	if s == "" {
		return b
	}
	b = protowire.AppendTag(b, n, protowire.BytesType)
	return protowire.AppendString(b, s)
}

// appendInt writes int64 and enum fields (varints; negative ones take ten
// bytes, as proto.Marshal writes them).
func appendInt(b []byte, n protowire.Number, v int64) []byte {
	if v == 0 {
		return b
	}
	b = protowire.AppendTag(b, n, protowire.VarintType)
	return protowire.AppendVarint(b, uint64(v))
}

// appendMap writes a map<string, string>: one length-delimited entry per
// pair, key field 1 and value field 2.
func appendMap(b []byte, n protowire.Number, m map[string]string) []byte {
	for k, v := range m {
		size := protowire.SizeTag(1) + protowire.SizeBytes(len(k)) + protowire.SizeTag(2) + protowire.SizeBytes(len(v))
		b = protowire.AppendTag(b, n, protowire.BytesType)
		b = protowire.AppendVarint(b, uint64(size))
		b = protowire.AppendTag(b, 1, protowire.BytesType)
		b = protowire.AppendString(b, k)
		b = protowire.AppendTag(b, 2, protowire.BytesType)
		b = protowire.AppendString(b, v)
	}
	return b
}
