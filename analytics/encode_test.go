package analytics

import (
	"bytes"
	"fmt"
	"math"
	"math/rand/v2"
	"testing"

	"github.com/sluicehq/sluice/analytics/analyticspb"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protoreflect"
)

// TestAppendEventCoversEveryField sets every field of the message (found
// by reflection, so a field added to analytics.proto is set too) and
// checks that appendEvent's bytes decode to the same event.
func TestAppendEventCoversEveryField(t *testing.T) {
	ev := &analyticspb.Event{}
	m := ev.ProtoReflect()
	fields := m.Descriptor().Fields()
	for i := range fields.Len() {
		fd := fields.Get(i)
		switch {
		case fd.IsMap():
			mp := m.Mutable(fd).Map()
			for k := range 3 {
				mp.Set(protoreflect.ValueOfString(fmt.Sprintf("k%d-%d", fd.Number(), k)).MapKey(), protoreflect.ValueOfString(fmt.Sprintf("v%d", k)))
			}
		case fd.Kind() == protoreflect.StringKind:
			m.Set(fd, protoreflect.ValueOfString(fmt.Sprintf("s%d", fd.Number())))
		case fd.Kind() == protoreflect.Int64Kind:
			m.Set(fd, protoreflect.ValueOfInt64(-int64(fd.Number())*1_000_003))
		case fd.Kind() == protoreflect.EnumKind:
			m.Set(fd, protoreflect.ValueOfEnum(2))
		case fd.Kind() == protoreflect.DoubleKind:
			m.Set(fd, protoreflect.ValueOfFloat64(-12.5))
		default:
			t.Fatalf("field %s (%v): appendEvent and this test know no such kind: teach both", fd.Name(), fd.Kind())
		}
	}
	if fields.Len() != int(eventFields) {
		t.Fatalf("Event has %d fields, appendEvent writes %d: add the new ones", fields.Len(), eventFields)
	}
	roundTrip(t, ev)
}

// TestAppendEventMatchesProtoMarshal: random events, including zero
// values, negative numbers, -0.0, empty map values and non-ASCII text,
// decode equal; without maps the bytes are proto.Marshal's.
func TestAppendEventMatchesProtoMarshal(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	str := func() string {
		return []string{"", "a", "Pixel 8", "ünïcödé ✓", string(bytes.Repeat([]byte("x"), 300))}[rng.IntN(5)]
	}
	num := func() int64 {
		return []int64{0, 1, -1, 1 << 40, math.MinInt64, math.MaxInt64}[rng.IntN(6)]
	}
	mp := func() map[string]string {
		if rng.IntN(3) == 0 {
			return nil
		}
		m := map[string]string{}
		for range rng.IntN(5) {
			m[str()+"k"] = str()
		}
		return m
	}
	for i := range 2000 {
		ev := &analyticspb.Event{Id: str(), Type: analyticspb.Type(rng.IntN(9)), TimeMs: num(), Device: str(), User: str(), App: str(),
			AppVersion: str(), Os: str(), OsVersion: str(), Model: str(), Region: str(), Network: str(), Releases: mp(), Switches: mp(),
			Page: str(), Referrer: str(), Name: str(), Properties: mp(), Stack: str(), DurationMs: num(),
			Value: []float64{0, math.Copysign(0, -1), 1.5, math.Inf(1), -3e300}[rng.IntN(5)], Session: str(), ReceivedMs: num()}
		roundTrip(t, ev)
		if len(ev.Releases)+len(ev.Switches)+len(ev.Properties) == 0 {
			want, err := proto.Marshal(ev)
			if err != nil {
				t.Fatal(err)
			}
			if got := appendEvent(nil, ev); !bytes.Equal(got, want) {
				t.Fatalf("event %d: appendEvent wrote\n%x\nproto.Marshal\n%x", i, got, want)
			}
		}
	}
}

func roundTrip(t *testing.T, ev *analyticspb.Event) {
	t.Helper()
	data := appendEvent(nil, ev)
	got := &analyticspb.Event{}
	if err := proto.Unmarshal(data, got); err != nil {
		t.Fatalf("decode: %v", err)
	}
	if !proto.Equal(got, ev) {
		t.Fatalf("round trip:\n got %v\nwant %v", got, ev)
	}
	if want := proto.Size(ev); len(data) != want {
		t.Fatalf("appendEvent wrote %d bytes, proto.Size says %d", len(data), want)
	}
}

func BenchmarkEncodeEvent(b *testing.B) {
	ev := &analyticspb.Event{Id: "e123456", Type: analyticspb.Type_TYPE_CUSTOM, TimeMs: 1_790_000_000_000, Device: "dev-000123", User: "user-000123",
		App: "shop", AppVersion: "5.2.1", Os: "android", OsVersion: "14", Model: "Pixel 8", Region: "eu-west", Network: "wifi",
		Releases: map[string]string{"app": "5.2.1"}, Switches: map[string]string{"new-checkout": "on", "dark-mode": "off"},
		Page: "cart", Name: "add_to_cart", Properties: map[string]string{"item": "sku-001234", "price": "19.99", "currency": "EUR",
			"list": "recommended", "position": "7", "sdk": "sluice-android/1.4.2", "screen": "1080x2400", "locale": "de-DE"},
		Session: "dev-000123-0badcafe", ReceivedMs: 1_790_000_001_500}
	b.Run("proto.Marshal", func(b *testing.B) {
		b.ReportAllocs()
		for b.Loop() {
			if _, err := proto.Marshal(ev); err != nil {
				b.Fatal(err)
			}
		}
	})
	b.Run("appendEvent", func(b *testing.B) {
		b.ReportAllocs()
		for b.Loop() {
			_ = appendEvent(make([]byte, 0, 512), ev)
		}
	})
}

// TestEventHeadMatchesEvent: the aggregates decode stored Events as
// EventHeads; each of EventHead's fields must be Event's field of that
// number, and only properties and stack may be missing.
func TestEventHeadMatchesEvent(t *testing.T) {
	full := (&analyticspb.Event{}).ProtoReflect().Descriptor().Fields()
	head := (&analyticspb.EventHead{}).ProtoReflect().Descriptor().Fields()
	for i := range head.Len() {
		h := head.Get(i)
		f := full.ByNumber(h.Number())
		if f == nil || f.Name() != h.Name() || f.Kind() != h.Kind() || f.Cardinality() != h.Cardinality() || f.IsMap() != h.IsMap() {
			t.Errorf("EventHead field %d %s (%v) is not Event's %v", h.Number(), h.Name(), h.Kind(), f)
		}
	}
	var missing []string
	for i := range full.Len() {
		if f := full.Get(i); head.ByNumber(f.Number()) == nil {
			missing = append(missing, string(f.Name()))
		}
	}
	if fmt.Sprint(missing) != "[properties stack]" {
		t.Errorf("Event fields EventHead lacks: %v, want [properties stack]", missing)
	}
	// And a stored event reads back as its head.
	ev := &analyticspb.Event{Id: "e1", Type: analyticspb.Type_TYPE_CRASH, TimeMs: 5, Device: "d", Model: "Pixel 8", Stack: "boom",
		Properties: map[string]string{"a": "b"}, Releases: map[string]string{"app": "2"}, Value: 1.5, ReceivedMs: 6}
	h := &analyticspb.EventHead{}
	if err := headDecoder.Unmarshal(appendEvent(nil, ev), h); err != nil {
		t.Fatal(err)
	}
	if h.Id != "e1" || h.Type != ev.Type || h.TimeMs != 5 || h.Model != "Pixel 8" || h.Releases["app"] != "2" || h.Value != 1.5 || h.ReceivedMs != 6 ||
		len(h.ProtoReflect().GetUnknown()) != 0 {
		t.Fatalf("head %v of %v", h, ev)
	}
}
