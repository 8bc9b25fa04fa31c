package gateway

// Dispatch (HTTPDNS-style): every gateway node announces its addresses in a
// KV bucket whose entries expire unless refreshed, and the dispatch endpoint
// tells a device which live nodes to connect to, in an order that is stable
// for that device.
//
// Expiry. The bucket's TTL (the stream's MaxAge) removes an entry that has
// not been refreshed for TTL; each node re-puts its entry every TTL/3, and a
// Put is a new revision, which resets the clock. Watchers are told of such
// an expiry only when the bucket has limit markers (KeyValueConfig.
// LimitMarkerTTL, NATS 2.11+): the server then leaves a marker with
// Nats-Marker-Reason "MaxAge", which the watcher reports as a Purge.
// Without markers the entry vanishes silently (checked against
// nats-server 2.15.2 and nats.go 1.55). So the bucket is created with
// markers where the server supports them, and, whatever the server does,
// an entry also counts as dead once its Created time (the server's time of
// the Put) is TTL old: the in-memory list is right in both cases.

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"net"
	"net/http"
	"net/url"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/nats-io/nats.go/jetstream"
	"github.com/rs/zerolog"
	"github.com/sluicehq/sluice/oplog"
)

// BucketGateways is the KV bucket in which gateway nodes announce
// themselves, one key per node ID.
const BucketGateways = "sluice_gateways"

// DefaultRegistryTTL is how long a node's entry lives without a refresh
// when RegistryConfig.TTL is zero.
const DefaultRegistryTTL = 15 * time.Second

// Node is what one gateway node announces.
type Node struct {
	// ID is unique per process (e.g. random) and a valid KV key token:
	// [A-Za-z0-9_-], as oplog.ValidID checks.
	ID string `json:"id"`
	// WebSocket is the WebSocket URL, e.g. "ws://127.0.0.1:7481/v1/ws" or a
	// wss:// one; empty if the node serves no WebSocket.
	WebSocket string `json:"websocket,omitempty"`
	// TCP is the host:port of the TLV socket, e.g. "127.0.0.1:7482"; empty
	// if the node serves none.
	TCP string `json:"tcp,omitempty"`
	// TLS reports that the TCP address speaks TLS.
	TLS bool `json:"tls,omitempty"`
	// Started is when the node started. Default: when OpenRegistry ran.
	Started time.Time `json:"started"`
	// Draining marks a node that is shutting down: it is not handed out.
	Draining bool `json:"draining,omitempty"`
}

// RegistryConfig configures a Registry. A zero field takes the default in
// its comment.
type RegistryConfig struct {
	// JetStream holds the bucket. Required.
	JetStream jetstream.JetStream
	// Node is this process's announcement. Required: an ID and at least one
	// address.
	Node Node
	// TTL is how long an entry lives without a refresh; the node refreshes
	// its own every TTL/3. It is a property of the whole bucket, so every
	// node of a deployment must use the same TTL (the last node to open the
	// bucket sets it). Default DefaultRegistryTTL (15s).
	TTL time.Duration
	// Replicas of the bucket. Default 1.
	Replicas int
	// Logger. Default zerolog.Nop().
	Logger *zerolog.Logger
}

// Registry announces this gateway node in the BucketGateways bucket and
// keeps the list of live nodes, which the dispatch endpoint hands out.
//
// OpenRegistry puts the node and loads the current list; Run keeps both
// fresh until its context ends and then withdraws the node. All methods
// are safe for concurrent use; Run must be called at most once.
type Registry struct {
	kv    jetstream.KeyValue
	ttl   time.Duration
	every time.Duration // refresh period: ttl/3
	log   zerolog.Logger

	// putMu serialises the Puts of this node's entry, so a refresh cannot
	// overwrite a newer Draining. Lock order: putMu, then mu.
	putMu sync.Mutex

	mu    sync.RWMutex
	self  Node
	nodes map[string]nodeEntry // by KV key (= Node.ID)
}

// nodeEntry is the latest revision of one node's key.
type nodeEntry struct {
	node    Node
	rev     uint64
	created time.Time // server time of the Put
}

// OpenRegistry creates or updates the bucket (idempotently), puts this
// node and loads the nodes already announced.
func OpenRegistry(ctx context.Context, cfg RegistryConfig) (*Registry, error) {
	if cfg.JetStream == nil {
		return nil, errors.New("gateway: RegistryConfig.JetStream is required")
	}
	if err := validNode(cfg.Node); err != nil {
		return nil, err
	}
	r := &Registry{
		ttl:   cfg.TTL,
		log:   zerolog.Nop(),
		self:  cfg.Node,
		nodes: make(map[string]nodeEntry),
	}
	if r.ttl <= 0 {
		r.ttl = DefaultRegistryTTL
	}
	r.every = r.ttl / 3
	if r.self.Started.IsZero() {
		r.self.Started = time.Now().UTC()
	}
	if cfg.Logger != nil {
		r.log = cfg.Logger.With().Str("component", "dispatch").Str("node_id", cfg.Node.ID).Logger()
	}
	kvc := jetstream.KeyValueConfig{
		Bucket:      BucketGateways,
		Description: "Sluice gateway nodes for dispatch; entries expire unless refreshed",
		History:     1,
		TTL:         r.ttl,
		// Markers make watchers see expiries; the server wants at least 1s.
		LimitMarkerTTL: max(r.ttl, time.Second),
		// Presence is ephemeral: nodes re-announce within TTL/3 after a
		// server restart, so nothing is worth a disk write.
		Storage:  jetstream.MemoryStorage,
		Replicas: max(cfg.Replicas, 1),
	}
	kv, err := cfg.JetStream.CreateOrUpdateKeyValue(ctx, kvc)
	if errors.Is(err, jetstream.ErrLimitMarkerTTLNotSupported) {
		// Before NATS 2.11: no markers; expiry is then seen by age alone.
		kvc.LimitMarkerTTL = 0
		kv, err = cfg.JetStream.CreateOrUpdateKeyValue(ctx, kvc)
	}
	if err != nil {
		return nil, fmt.Errorf("gateway: bucket %s: %w", BucketGateways, err)
	}
	r.kv = kv
	if err := r.put(ctx); err != nil {
		return nil, err
	}
	w, err := kv.WatchAll(ctx)
	if err != nil {
		return nil, fmt.Errorf("gateway: watch %s: %w", BucketGateways, err)
	}
	defer func() { _ = w.Stop() }()
	if err := r.load(ctx, w); err != nil {
		return nil, fmt.Errorf("gateway: load %s: %w", BucketGateways, err)
	}
	return r, nil
}

// validNode checks what a node must announce.
func validNode(n Node) error {
	if !oplog.ValidID(n.ID) {
		return fmt.Errorf("gateway: invalid node id %q", n.ID)
	}
	if n.WebSocket == "" && n.TCP == "" {
		return errors.New("gateway: node announces no address")
	}
	if n.WebSocket != "" {
		u, err := url.Parse(n.WebSocket)
		if err != nil || (u.Scheme != "ws" && u.Scheme != "wss") || u.Host == "" {
			return fmt.Errorf("gateway: node websocket %q is not a ws:// or wss:// URL", n.WebSocket)
		}
	}
	if n.TCP != "" {
		if _, _, err := net.SplitHostPort(n.TCP); err != nil {
			return fmt.Errorf("gateway: node tcp address %q: %w", n.TCP, err)
		}
	}
	return nil
}

// Run refreshes this node's entry every TTL/3 and watches the bucket to
// keep the list of live nodes, until ctx ends; failures are logged and
// retried with backoff. It then deletes this node's entry (best effort,
// within 2s) and returns nil.
func (r *Registry) Run(ctx context.Context) error {
	var wg sync.WaitGroup
	wg.Go(func() { r.refresh(ctx) })
	wg.Go(func() { r.watchLoop(ctx) })
	wg.Wait()
	r.withdraw(ctx)
	return nil
}

// SetDraining announces that this node is shutting down: from now on it is
// not handed out, by this node or by any other.
func (r *Registry) SetDraining(ctx context.Context) error {
	r.mu.Lock()
	r.self.Draining = true
	r.mu.Unlock()
	return r.put(ctx)
}

// Nodes returns the live, non-draining nodes, sorted by ID.
func (r *Registry) Nodes() []Node {
	nodes := r.live(time.Now())
	slices.SortFunc(nodes, func(a, b Node) int { return strings.Compare(a.ID, b.ID) })
	return nodes
}

// Pick returns up to n live, non-draining nodes (all of them if n <= 0) in
// rendezvous-hashing order for key: each node is weighted by a hash of key
// and its ID, highest first. A key keeps its order while the set of nodes
// is unchanged, and when a node comes or goes the others keep their
// relative order, so a device mostly returns to the same node.
func (r *Registry) Pick(key string, n int) []Node {
	nodes := rank(key, r.live(time.Now()))
	if n > 0 && len(nodes) > n {
		nodes = nodes[:n]
	}
	return nodes
}

// live returns the nodes whose latest entry is a Put younger than the TTL,
// minus the draining ones. The age test covers expiries the watcher is not
// told of (buckets without limit markers).
func (r *Registry) live(now time.Time) []Node {
	r.mu.RLock()
	defer r.mu.RUnlock()
	nodes := make([]Node, 0, len(r.nodes))
	for _, e := range r.nodes {
		if !e.node.Draining && now.Sub(e.created) < r.ttl {
			nodes = append(nodes, e.node)
		}
	}
	return nodes
}

// rank sorts nodes in place by rendezvous weight for key, highest first
// (ties, in practice never, by ID), and returns them.
func rank(key string, nodes []Node) []Node {
	type weighted struct {
		w uint64
		n Node
	}
	ws := make([]weighted, len(nodes))
	for i, n := range nodes {
		ws[i] = weighted{rendezvous(key, n.ID), n}
	}
	slices.SortFunc(ws, func(a, b weighted) int {
		if a.w != b.w {
			if a.w > b.w {
				return -1
			}
			return 1
		}
		return strings.Compare(a.n.ID, b.n.ID)
	})
	for i := range ws {
		nodes[i] = ws[i].n
	}
	return nodes
}

// rendezvous is the weight of node id for key: FNV-1a 64 of key, a 0 byte
// and id, finished with the murmur3 fmix64 mixer, because FNV's high bits
// vary little when only the last bytes differ.
func rendezvous(key, id string) uint64 {
	const (
		offset64 = 14695981039346656037
		prime64  = 1099511628211
	)
	h := uint64(offset64)
	for i := 0; i < len(key); i++ {
		h ^= uint64(key[i])
		h *= prime64
	}
	h *= prime64 // the 0 separator: h ^= 0 is a no-op
	for i := 0; i < len(id); i++ {
		h ^= uint64(id[i])
		h *= prime64
	}
	h ^= h >> 33
	h *= 0xff51afd7ed558ccd
	h ^= h >> 33
	h *= 0xc4ceb9fe1a85ec53
	h ^= h >> 33
	return h
}

// put writes this node's current announcement and records it locally at
// once, so this node's own answers do not wait for the watcher.
func (r *Registry) put(ctx context.Context) error {
	r.putMu.Lock()
	defer r.putMu.Unlock()
	r.mu.RLock()
	n := r.self
	r.mu.RUnlock()
	data, err := json.Marshal(n)
	if err != nil {
		return fmt.Errorf("gateway: encode node: %w", err)
	}
	rev, err := r.kv.Put(ctx, n.ID, data)
	if err != nil {
		return fmt.Errorf("gateway: announce node %s: %w", n.ID, err)
	}
	r.mu.Lock()
	r.store(r.nodes, n.ID, nodeEntry{node: n, rev: rev, created: time.Now()})
	r.mu.Unlock()
	return nil
}

// refresh re-puts this node's entry every TTL/3 until ctx ends, sooner
// (with backoff from 100ms) after a failure, and drops long-dead entries
// from memory.
func (r *Registry) refresh(ctx context.Context) {
	const first = 100 * time.Millisecond
	var backoff time.Duration
	t := time.NewTimer(r.every)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		r.prune(time.Now())
		pctx, cancel := context.WithTimeout(ctx, r.every)
		err := r.put(pctx)
		cancel()
		if ctx.Err() != nil {
			return
		}
		if err != nil {
			backoff = min(max(2*backoff, first), r.every)
			r.log.Error().Err(err).Dur("retry_in", backoff).Msg("node refresh failed")
			t.Reset(backoff)
			continue
		}
		if backoff > 0 {
			r.log.Info().Msg("node refresh recovered")
			backoff = 0
		}
		t.Reset(r.every)
	}
}

// prune forgets entries dead for more than a TTL (they are already hidden
// from Nodes and Pick once a TTL old), so memory does not grow with
// crashed nodes the watcher was not told about.
func (r *Registry) prune(now time.Time) {
	r.mu.Lock()
	defer r.mu.Unlock()
	for k, e := range r.nodes {
		if now.Sub(e.created) >= 2*r.ttl {
			delete(r.nodes, k)
		}
	}
}

// errWatchClosed: the watcher's channel closed (connection closed).
var errWatchClosed = errors.New("gateway: registry watcher closed")

// watchLoop runs watch until ctx ends, again after an exponential backoff
// (100ms to 5s) when it fails; a watch that lasted longer than the
// longest backoff resets it.
func (r *Registry) watchLoop(ctx context.Context) {
	const first, last = 100 * time.Millisecond, 5 * time.Second
	backoff := first
	for {
		start := time.Now()
		err := r.watch(ctx)
		if ctx.Err() != nil {
			return
		}
		if time.Since(start) > last {
			backoff = first
		}
		r.log.Error().Err(err).Dur("retry_in", backoff).Msg("node watch failed")
		select {
		case <-time.After(backoff):
		case <-ctx.Done():
			return
		}
		backoff = min(2*backoff, last)
	}
}

// watch loads the bucket's current entries, replaces the list with them,
// then applies updates until ctx ends (nil) or the watcher fails.
func (r *Registry) watch(ctx context.Context) error {
	w, err := r.kv.WatchAll(ctx)
	if err != nil {
		return fmt.Errorf("gateway: watch %s: %w", BucketGateways, err)
	}
	defer func() { _ = w.Stop() }()
	if err := r.load(ctx, w); err != nil {
		return err
	}
	for {
		select {
		case e, ok := <-w.Updates():
			if !ok {
				return errWatchClosed
			}
			if e != nil {
				r.mu.Lock()
				r.apply(r.nodes, e)
				r.mu.Unlock()
			}
		case <-ctx.Done():
			return nil
		}
	}
}

// load reads w's initial entries (up to its nil marker) into a new list
// and makes it current.
func (r *Registry) load(ctx context.Context, w jetstream.KeyWatcher) error {
	fresh := make(map[string]nodeEntry)
	for {
		select {
		case e, ok := <-w.Updates():
			if !ok {
				return errWatchClosed
			}
			if e == nil {
				r.mu.Lock()
				r.nodes = fresh
				r.mu.Unlock()
				return nil
			}
			r.apply(fresh, e)
		case <-ctx.Done():
			return ctx.Err()
		}
	}
}

// apply records one watched entry into m: a Put stores the node, a Delete
// or Purge (including a server expiry marker) removes it. Older revisions
// than the one held are ignored.
func (r *Registry) apply(m map[string]nodeEntry, e jetstream.KeyValueEntry) {
	key := e.Key()
	if e.Operation() != jetstream.KeyValuePut {
		if cur, ok := m[key]; ok && cur.rev <= e.Revision() {
			delete(m, key)
		}
		return
	}
	var n Node
	if err := json.Unmarshal(e.Value(), &n); err != nil || n.ID != key || validNode(n) != nil {
		r.log.Warn().Uint64("seq", e.Revision()).Msg("unreadable node entry skipped")
		return
	}
	r.store(m, key, nodeEntry{node: n, rev: e.Revision(), created: e.Created()})
}

// store puts e in m unless m holds a newer revision; an equal revision
// (this node's own Put, seen again by the watcher) takes the server's
// Created time.
func (r *Registry) store(m map[string]nodeEntry, key string, e nodeEntry) {
	if cur, ok := m[key]; ok && cur.rev > e.rev {
		return
	}
	m[key] = e
}

// withdraw deletes this node's entry, best effort, so the others stop
// handing it out at once rather than after the TTL.
func (r *Registry) withdraw(ctx context.Context) {
	r.mu.Lock()
	id := r.self.ID
	delete(r.nodes, id)
	r.mu.Unlock()
	dctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 2*time.Second)
	defer cancel()
	if err := r.kv.Delete(dctx, id); err != nil {
		r.log.Warn().Err(err).Msg("node withdraw failed; it expires by ttl")
	}
}

// dispatchNode is one node in a dispatch answer.
type dispatchNode struct {
	ID        string `json:"id"`
	WebSocket string `json:"websocket,omitempty"`
	TCP       string `json:"tcp,omitempty"`
	TLS       bool   `json:"tls,omitempty"`
}

// dispatchAnswer is the body of a successful dispatch.
type dispatchAnswer struct {
	Nodes      []dispatchNode `json:"nodes"`
	TTLSeconds int            `json:"ttl_seconds"`
}

// Handler serves the dispatch endpoint at whatever path it is mounted
// (sluiced mounts it at /v1/dispatch):
//
//	GET /v1/dispatch?device=<id>&transport=ws|tcp|any
//
// transport defaults to any; ws and tcp keep only the nodes with that
// address. The answer is 200 with {"nodes":[{"id","websocket","tcp","tls"}],
// "ttl_seconds":N}: every such live node in Pick order for the device (try
// them in order), and how long the answer may be reused (the registry TTL,
// rounded up). A bad device id or transport is 400 {"error","code":
// "INVALID"}, no live node 503 {"error","code":"UNAVAILABLE"}, a method
// other than GET or HEAD 405. Answers are never cached (Cache-Control:
// no-store).
func (r *Registry) Handler() http.Handler {
	return http.HandlerFunc(r.serveDispatch)
}

func (r *Registry) serveDispatch(w http.ResponseWriter, req *http.Request) {
	w.Header().Set("Cache-Control", "no-store")
	if req.Method != http.MethodGet && req.Method != http.MethodHead {
		w.Header().Set("Allow", "GET, HEAD")
		writeDispatchError(w, http.StatusMethodNotAllowed, "INVALID", "method not allowed")
		return
	}
	q := req.URL.Query()
	device := q.Get("device")
	if !oplog.ValidID(device) {
		writeDispatchError(w, http.StatusBadRequest, "INVALID", "invalid device id")
		return
	}
	var keep func(Node) bool
	switch t := q.Get("transport"); t {
	case "", "any":
		keep = func(Node) bool { return true }
	case "ws":
		keep = func(n Node) bool { return n.WebSocket != "" }
	case "tcp":
		keep = func(n Node) bool { return n.TCP != "" }
	default:
		writeDispatchError(w, http.StatusBadRequest, "INVALID", "transport must be ws, tcp or any")
		return
	}
	ans := dispatchAnswer{TTLSeconds: int(math.Ceil(r.ttl.Seconds()))}
	for _, n := range r.Pick(device, 0) {
		if keep(n) {
			ans.Nodes = append(ans.Nodes, dispatchNode{ID: n.ID, WebSocket: n.WebSocket, TCP: n.TCP, TLS: n.TLS})
		}
	}
	if len(ans.Nodes) == 0 {
		writeDispatchError(w, http.StatusServiceUnavailable, "UNAVAILABLE", "no gateway node available")
		return
	}
	writeDispatchJSON(w, http.StatusOK, ans)
}

func writeDispatchError(w http.ResponseWriter, status int, code, msg string) {
	writeDispatchJSON(w, status, map[string]string{"error": msg, "code": code})
}

func writeDispatchJSON(w http.ResponseWriter, status int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	_ = json.NewEncoder(w).Encode(v)
}
