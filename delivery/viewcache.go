package delivery

import (
	"sync"

	"github.com/sluicehq/sluice/oplog"
	"google.golang.org/protobuf/proto"
)

// viewCacheSize bounds the devices whose encoded view the update check
// keeps.
const viewCacheSize = 100_000

// viewKey is what a device's view depends on besides the state and the
// time: its id, user and attributes.
type viewKey struct {
	device, user string
	attrs        oplog.Attrs
}

// cachedView is a device's view as the update check answers it: its
// digest and protobuf encoding, computed in generation gen.
type cachedView struct {
	gen    uint64
	snap   *snapshot
	digest string
	body   []byte
}

// viewCache keeps the encoded views of the devices that checked for
// updates, valid for one generation (Delivery.gen: bumped whenever a view
// may change, see watch). A device polling again under the same state
// costs a map lookup instead of evaluating every rule and encoding the
// view. Bodies are shared between devices with the same digest.
type viewCache struct {
	mu     sync.Mutex
	views  map[viewKey]*cachedView
	bodies map[string][]byte // digest → body, of the current generation
	gen    uint64            // of bodies
}

func newViewCache() *viewCache {
	return &viewCache{views: map[viewKey]*cachedView{}, bodies: map[string][]byte{}}
}

func (c *viewCache) get(k viewKey, gen uint64, s *snapshot) *cachedView {
	c.mu.Lock()
	defer c.mu.Unlock()
	if v := c.views[k]; v != nil && v.gen == gen && v.snap == s {
		return v
	}
	return nil
}

func (c *viewCache) put(k viewKey, v *cachedView) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.gen != v.gen {
		if v.gen < c.gen {
			return // computed before a change: do not keep
		}
		clear(c.bodies)
		c.gen = v.gen
	}
	if b, ok := c.bodies[v.digest]; ok {
		v.body = b
	} else {
		c.bodies[v.digest] = v.body
	}
	if len(c.views) >= viewCacheSize {
		// Drop about a tenth, in map order (random).
		n := 0
		for old := range c.views {
			delete(c.views, old)
			if n++; n >= viewCacheSize/10 {
				break
			}
		}
	}
	c.views[k] = v
}

// encodedView returns a device's view digest and protobuf encoding, from
// the cache when the device asked already in this state and generation
// (the state changes with every control event; the generation when a
// rule window opens or closes or manifests are due to be signed anew).
func (d *Delivery) encodedView(dev *Device) (*cachedView, error) {
	k := viewKey{device: dev.ID, user: dev.User, attrs: dev.Attrs}
	gen := d.gen.Load() // before the time is read: a boundary after it makes the entry stale
	s := d.ctl.Snapshot()
	if v := d.views.get(k, gen, s); v != nil {
		return v, nil
	}
	v := d.viewOf(s, dev)
	body, err := proto.Marshal(v)
	if err != nil {
		return nil, err
	}
	cv := &cachedView{gen: gen, snap: s, digest: v.Digest, body: body}
	d.views.put(k, cv)
	return cv, nil
}
