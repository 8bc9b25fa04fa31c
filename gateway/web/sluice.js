/*
 * sluice.js: a browser client of the Sluice gateway, protocol v1, JSON
 * sub-protocol "sluice.v1.json" (gateway/PROTOCOL.md). No dependencies, no
 * build step: load it with <script src="sluice.js"></script> and use
 * window.Sluice.Client.
 *
 *   const c = new Sluice.Client({token: () => fetchToken()});
 *   c.handle("chat", async (item) => { await save(item.id, item.text); });
 *   c.handleTopic("news", (item) => showNews(item.text));
 *   c.start();
 *
 * Delivery: items reach handlers one at a time, in arrival order (per
 * business, in id order); the next waits until the handler's promise
 * settles. A stored item's sync point advances only when its handler
 * resolves; points are saved to storage, then acknowledged to the gateway
 * (every ackInterval ms, and at the end of each sync round). An item at or
 * below the saved point of its business and epoch is dropped as a
 * duplicate. So delivery is at least once: an item whose handler ran but
 * whose point was not yet saved (the page closed) comes again. A handler
 * that throws (or rejects) makes the client drop the link and reconnect
 * with backoff: the item and those after it come again from the gateway.
 * Transient items (id "0") are delivered once, without a point, and a
 * failure of their handler is only reported. An item whose expiresMs has
 * passed by the gateway's clock is not delivered, but its point advances.
 *
 * Users: ids of a user's businesses mean nothing for another user, so the
 * saved points record the user they were earned under (Hello.pointsUser).
 * When a link's Welcome names another user, the client drops all its
 * points and says Hello again without them: the gateway then resumes each
 * business from the point it recorded from acks (user businesses as acked
 * under that user). login and logout switch the user on the link; the
 * gateway resets the user's businesses in the next round (opts.onReset is
 * told), and opts.token must return tokens for the new user from then on.
 *
 * Topics (read diffusion): the gateway merges the messages of the topics
 * the user follows, and of the built-in topic "_all" (every device), into
 * the same rounds and live items. A topic item has item.topic set; its id
 * and epoch are the topic stream's, so the client keeps a cursor per topic
 * beside the points (topicCursors()), presents them in Hello.topics, drops
 * duplicates against them and acknowledges them (Ack.topics) like points.
 * A topic item goes to the handler of its topic (handleTopic), else to
 * that of its business (item.business, when the message names one), else
 * to the default handler. A topic the gateway resets (Sync.topicResets:
 * its stream was recreated) loses its cursor, and opts.onTopicReset(topic)
 * is told. Topic ids are the same for every user: cursors stay when the
 * user changes.
 *
 * Deferred buckets: under load the gateway may defer lower-priority
 * buckets of businesses; the round's done frame lists them (deferred) with
 * retryAfterMs. The client then sends a FOREGROUND event after retryAfterMs
 * (1000 if 0) plus a random 0-25%, once; another deferral re-arms it, a
 * round without deferrals or the end of the link cancels it.
 *
 * Ids and epochs are unsigned 64-bit integers: the client compares them as
 * BigInt and hands them to handlers as decimal strings.
 */
(function (root) {
  "use strict";

  var PROTOCOL = "sluice.v1.json";
  var VERSION = 1;
  var MAX_POINTS = 1000; // sync points per Hello or Ack (gateway limit)
  var MAX_TOPICS = 1000; // topic cursors per Hello or Ack (gateway limit)
  var DEFER_RETRY_MS = 1000; // wait for deferred buckets when the gateway names none
  var DEFER_JITTER = 0.25; // of the wait, at most
  var ZERO = typeof BigInt === "function" ? BigInt(0) : null;

  var ERROR_CODES = ["CODE_UNSPECIFIED", "CODE_BAD_FRAME", "CODE_FRAME_TOO_LARGE", "CODE_UNAUTHENTICATED",
    "CODE_TOKEN_EXPIRED", "CODE_UNSUPPORTED_VERSION", "CODE_INVALID", "CODE_RATE_LIMITED",
    "CODE_SLOW_CONSUMER", "CODE_UNAVAILABLE", "CODE_INTERNAL", "CODE_TOO_MANY_CONNECTIONS"];
  var STATE_VERSION = 1; // format of the saved points; "topics" is an optional key of it
  var GOAWAY_REASONS = ["REASON_UNSPECIFIED", "REASON_SHUTDOWN", "REASON_REPLACED", "REASON_SLOW_CONSUMER",
    "REASON_IDLE", "REASON_DEAD_LINK", "REASON_PROTOCOL", "REASON_AUTH"];
  var ATTRS = ["appVersion", "os", "osVersion", "model", "region", "network", "channel", "sdk"];

  function noop() {}

  // enumName returns the name of a protojson enum value, which may come as
  // its name (the default) or its number.
  function enumName(v, names) {
    if (typeof v === "number") return names[v] || String(v);
    return v || names[0];
  }

  function num(v, def) {
    return typeof v === "number" && isFinite(v) && v >= 0 ? v : def;
  }

  // u64 parses a protojson uint64 (a decimal string, or a number when
  // small; absent when zero).
  function u64(v) {
    if (v === undefined || v === null || v === "") return ZERO;
    var b = BigInt(v);
    if (b < ZERO) throw new RangeError("negative id " + v);
    return b;
  }

  function b64decode(s) {
    if (!s) return new Uint8Array(0);
    var bin = atob(s.replace(/-/g, "+").replace(/_/g, "/"));
    var out = new Uint8Array(bin.length);
    for (var i = 0; i < bin.length; i++) out[i] = bin.charCodeAt(i);
    return out;
  }

  var utf8 = typeof TextDecoder === "function" ? new TextDecoder("utf-8") : null;

  // decodeItem returns the item handlers get (no BigInt in it, so that it
  // serializes as JSON) with its id and epoch as BigInt.
  function decodeItem(r) {
    var id = u64(r.id), epoch = u64(r.epoch);
    var payload = b64decode(r.payload);
    var item = {
      id: id.toString(),
      epoch: epoch.toString(),
      business: r.business || "",
      topic: r.topic || "",
      kind: r.kind || 0,
      payload: payload,
      text: utf8 ? utf8.decode(payload) : "",
      contentType: r.contentType || "",
      createdMs: Number(r.createdMs || 0),
      expiresMs: Number(r.expiresMs || 0),
      messageId: r.messageId || "",
      transient: id === ZERO,
    };
    return { item: item, id: id, epoch: epoch };
  }

  // marksObject returns sync points or topic cursors as saved and shown:
  // {name: {id, epoch}} with decimal strings.
  function marksObject(m) {
    var out = {};
    m.forEach(function (p, k) { out[k] = { id: p.id.toString(), epoch: p.epoch.toString() }; });
    return out;
  }

  // loadMarks fills m from a saved marksObject, if any.
  function loadMarks(m, o) {
    o = o || {};
    for (var k in o) {
      if (Object.prototype.hasOwnProperty.call(o, k) && o[k]) m.set(k, { id: u64(o[k].id), epoch: u64(o[k].epoch) });
    }
  }

  function defaultURL() {
    if (typeof location === "undefined") return "";
    return (location.protocol === "https:" ? "wss://" : "ws://") + location.host + "/v1/ws";
  }

  function memoryStorage() {
    var m = new Map();
    return {
      getItem: function (k) { return m.has(k) ? m.get(k) : null; },
      setItem: function (k, v) { m.set(k, String(v)); },
      removeItem: function (k) { m.delete(k); },
    };
  }

  function defaultStorage() {
    try {
      if (typeof localStorage !== "undefined" && localStorage) return localStorage;
    } catch (e) {
      // Access denied (sandboxed frame, privacy mode): fall through.
    }
    return memoryStorage();
  }

  // Client is one device's link to the gateway. It is not shared between
  // tabs: two tabs with the same device token replace each other's link
  // (the older one is told REPLACED and stops).
  class Client {
    constructor(opts) {
      if (ZERO === null) throw new Error("sluice: this browser has no BigInt");
      opts = opts || {};
      this._o = {
        url: opts.url || defaultURL(),
        token: opts.token,
        attrs: opts.attrs || {},
        storage: opts.storage === undefined ? defaultStorage() : (opts.storage || memoryStorage()),
        storageKey: opts.storageKey || "sluice.points",
        minBackoff: num(opts.minBackoff, 100),
        maxBackoff: num(opts.maxBackoff, 30000),
        ackInterval: num(opts.ackInterval, 100),
        connectTimeout: num(opts.connectTimeout, 10000),
        onState: typeof opts.onState === "function" ? opts.onState : noop,
        onError: typeof opts.onError === "function" ? opts.onError : noop,
        onReset: typeof opts.onReset === "function" ? opts.onReset : null,
        onTopicReset: typeof opts.onTopicReset === "function" ? opts.onTopicReset : null,
      };
      if (!this._o.url) throw new Error("sluice: no url and no page location");
      this._handlers = new Map();
      this._topicHandlers = new Map();
      this._default = null;
      this._points = new Map(); // business -> {id, epoch} (BigInt)
      this._topics = new Map(); // topic -> {id, epoch} (BigInt): the topic cursors
      this._owner = ""; // the user bound when the points were earned
      this._dirty = new Set(); // businesses whose point is not acknowledged yet
      this._tdirty = new Set(); // topics whose cursor is not acknowledged yet
      this._unsaved = false;
      this._running = false;
      this._gen = 0; // bumped by start and stop: a connect of an older generation gives up
      this._link = null;
      this._attempt = 0;
      this._failures = 0; // handler failures in a row
      this._retryTimer = null;
      this._ackTimer = null;
      this._deferTimer = null; // asks for deferred buckets on _deferLink
      this._deferLink = null;
      this._queue = []; // {link, sync|live}
      this._pumping = false;
      this._state = "closed";
      this._sessionId = "";
      this._clockOffset = 0; // the gateway's clock minus ours, ms
      this._pagehide = () => this._flushAck();
      this._s = {
        connects: 0, welcomes: 0, delivered: 0, duplicates: 0, transient: 0, resets: 0,
        topicItems: 0, topicResets: 0, deferrals: 0, deferRetries: 0, expired: 0, acks: 0, pings: 0, pongs: 0, probes: 0, rttMs: 0, framesIn: 0, framesOut: 0, errors: 0,
      };
      this._load();
    }

    // handle sets the handler of one business's items. It may return a
    // promise: the next item waits for it.
    handle(business, fn) {
      if (typeof fn !== "function") throw new TypeError("sluice: handler must be a function");
      this._handlers.set(business, fn);
      return this;
    }

    // handleTopic sets the handler of one topic's items (item.topic). It
    // comes before the handler of the item's business.
    handleTopic(topic, fn) {
      if (typeof fn !== "function") throw new TypeError("sluice: handler must be a function");
      this._topicHandlers.set(topic, fn);
      return this;
    }

    // handleDefault sets the handler of items no other handler takes.
    // Items nobody handles still advance their sync point (or cursor).
    handleDefault(fn) {
      if (typeof fn !== "function") throw new TypeError("sluice: handler must be a function");
      this._default = fn;
      return this;
    }

    get state() { return this._state; }

    // start connects, and keeps reconnecting until stop.
    start() {
      if (this._running) return;
      this._running = true;
      this._gen++;
      this._attempt = 0;
      this._failures = 0;
      if (typeof addEventListener === "function") addEventListener("pagehide", this._pagehide);
      this._setState("connecting", { attempt: 0, delayMs: 0 });
      this._connect(this._gen);
    }

    // stop saves and acknowledges what was handled, closes the link and
    // stops reconnecting. Items not yet handled are left to the next start.
    stop() {
      this._halt("closed", "stopped");
    }

    // login binds a user to the session: token must name this device and
    // the user. The gateway answers with a sync round of the user's
    // businesses. On reconnect the client sends the token that opts.token
    // returns: after login, make it return the user's. False if not
    // connected (the next Hello's token counts then).
    login(token) {
      return this._event({ type: "TYPE_LOGIN", token: String(token || "") });
    }

    // logout unbinds the user from the session.
    logout() {
      return this._event({ type: "TYPE_LOGOUT" });
    }

    // foreground asks the gateway for a sync round (call it when the page
    // becomes visible again, for instance).
    foreground() {
      return this._event({ type: "TYPE_FOREGROUND" });
    }

    // points returns the saved sync points: {business: {id, epoch}} with
    // decimal strings.
    points() {
      return marksObject(this._points);
    }

    // topicCursors returns the saved topic cursors: {topic: {id, epoch}}
    // with decimal strings.
    topicCursors() {
      return marksObject(this._topics);
    }

    // stats returns counters and the link's state.
    stats() {
      var s = Object.assign({}, this._s);
      s.state = this._state;
      s.sessionId = this._sessionId;
      s.user = this._owner;
      s.protocol = this._link && this._link.ws ? this._link.ws.protocol : "";
      s.queued = this._queue.length;
      s.unacked = this._dirty.size + this._tdirty.size;
      return s;
    }

    // --- link ---

    async _connect(gen) {
      this._retryTimer = null;
      if (!this._running || gen !== this._gen) return;
      var token;
      try {
        var t = this._o.token;
        token = await (typeof t === "function" ? t() : t);
      } catch (e) {
        this._report({ code: "TOKEN", message: "token: " + (e && e.message || e), fatal: false });
        if (this._running && gen === this._gen) this._retry(null, "token");
        return;
      }
      if (!this._running || gen !== this._gen) return;
      var ws;
      try {
        ws = new WebSocket(this._o.url, PROTOCOL);
      } catch (e) {
        this._report({ code: "CONNECT", message: String(e && e.message || e), fatal: false });
        this._retry(null, "connect");
        return;
      }
      this._s.connects++;
      var link = {
        ws: ws, token: String(token || ""), welcomed: false, down: false, failed: false, user: "",
        heartbeatMs: 0, lastRecv: Date.now(), timer: null, beat: null, goAway: null, fatal: null,
      };
      this._link = link;
      link.timer = setTimeout(() => this._drop(link, "no welcome within " + this._o.connectTimeout + " ms"), this._o.connectTimeout);
      ws.onopen = () => this._onOpen(link);
      ws.onmessage = (ev) => this._onMessage(link, ev);
      ws.onclose = (ev) => this._down(link, "closed (" + ev.code + (ev.reason ? " " + ev.reason : "") + ")");
      ws.onerror = noop; // a close follows
    }

    _onOpen(link) {
      if (link.down) return;
      if (link.ws.protocol !== PROTOCOL) {
        this._report({ code: "PROTOCOL", message: "server chose sub-protocol " + JSON.stringify(link.ws.protocol), fatal: false });
        this._drop(link, "wrong sub-protocol");
        return;
      }
      var points = [];
      this._points.forEach(function (p, b) {
        if (points.length < MAX_POINTS) points.push({ business: b, id: p.id.toString(), epoch: p.epoch.toString() });
      });
      var topics = [];
      this._topics.forEach(function (p, t) {
        if (topics.length < MAX_TOPICS) topics.push({ topic: t, id: p.id.toString(), epoch: p.epoch.toString() });
      });
      var hello = { version: VERSION, token: link.token, attrs: this._attrs(), points: points, pointsUser: this._owner };
      if (topics.length) hello.topics = topics;
      if (this._sessionId) hello.sessionId = this._sessionId;
      this._send(link, { hello: hello });
    }

    _attrs() {
      var a = this._o.attrs, out = {};
      for (var i = 0; i < ATTRS.length; i++) {
        var k = ATTRS[i];
        if (a[k] !== undefined && a[k] !== null && a[k] !== "") out[k] = String(a[k]);
      }
      if (!out.sdk) out.sdk = "sluice-js/" + VERSION;
      return out;
    }

    _onMessage(link, ev) {
      if (link.down) return;
      link.lastRecv = Date.now();
      this._s.framesIn++;
      var f;
      try {
        if (typeof ev.data !== "string") throw new Error("binary message");
        f = JSON.parse(ev.data);
      } catch (e) {
        this._report({ code: "CODE_BAD_FRAME", message: "undecodable frame: " + e.message, fatal: false });
        this._drop(link, "bad frame");
        return;
      }
      if (f.probe) {
        // Answered at once, whatever the handlers are doing.
        if (this._send(link, { probeEcho: { seq: f.probe.seq || "0" } })) this._s.probes++;
      } else if (f.welcome) {
        this._onWelcome(link, f.welcome);
      } else if (f.sync) {
        this._enqueue(link, { sync: f.sync });
      } else if (f.live) {
        this._enqueue(link, { live: f.live });
      } else if (f.pong) {
        this._s.pongs++;
        var sent = Number(f.pong.clientTimeMs || 0), now = Date.now();
        if (sent) {
          this._s.rttMs = now - sent;
          if (f.pong.serverTimeMs) this._clockOffset = Number(f.pong.serverTimeMs) - (sent + now) / 2;
        }
      } else if (f.ping) {
        this._send(link, { pong: { clientTimeMs: f.ping.clientTimeMs || "0", serverTimeMs: String(Date.now()) } });
      } else if (f.goaway) {
        link.goAway = {
          reason: enumName(f.goaway.reason, GOAWAY_REASONS),
          message: f.goaway.message || "",
          reconnectAfterMs: Number(f.goaway.reconnectAfterMs || 0),
        };
      } else if (f.error) {
        var e = { code: enumName(f.error.code, ERROR_CODES), message: f.error.message || "", fatal: !!f.error.fatal };
        if (e.fatal) link.fatal = e;
        this._report(e);
      }
      // Other frames (newer protocol additions) are ignored.
    }

    _onWelcome(link, w) {
      clearTimeout(link.timer);
      link.timer = null;
      link.welcomed = true;
      link.user = w.user || "";
      link.heartbeatMs = Number(w.heartbeatMs || 0) || 25000;
      this._sessionId = w.sessionId || "";
      if (w.serverTimeMs) this._clockOffset = Number(w.serverTimeMs) - Date.now();
      this._s.welcomes++;
      if (link.user !== this._owner) {
        // Points of another user: drop them all (which businesses are the
        // user's is the gateway's knowledge) and say Hello again without
        // them, to resume from the points the gateway recorded. Topic
        // cursors stay: topic ids are the same for every user.
        var again = this._points.size > 0;
        this._owner = link.user;
        this._points.clear();
        this._dirty.clear();
        this._unsaved = true;
        this._save();
        if (again) {
          this._drop(link, "bound user changed", 0);
          return;
        }
      }
      link.beat = setInterval(() => this._beat(link), link.heartbeatMs);
      this._setState("syncing", { sessionId: this._sessionId, user: w.user || "", device: w.device || "" });
      if (this._dirty.size || this._tdirty.size) this._flushAck(); // handled while disconnected
    }

    // _beat pings, and drops a link silent for three heartbeats.
    _beat(link) {
      if (link.down) return;
      if (Date.now() - link.lastRecv > 3 * link.heartbeatMs) {
        this._drop(link, "nothing heard for three heartbeats");
        return;
      }
      if (this._send(link, { ping: { clientTimeMs: String(Date.now()) } })) this._s.pings++;
    }

    _send(link, frame) {
      if (!link || link.down || link.ws.readyState !== 1) return false;
      link.ws.send(JSON.stringify(frame));
      this._s.framesOut++;
      return true;
    }

    _event(e) {
      var l = this._link;
      if (!l || !l.welcomed) return false;
      return this._send(l, { event: e });
    }

    // _drop closes a link the client gave up on; delay, if given, replaces
    // the backoff before the next link.
    _drop(link, why, delay) {
      if (link.down) return;
      try { link.ws.close(1000, why.slice(0, 100)); } catch (e) { /* closed already */ }
      this._down(link, why, delay);
    }

    // _down runs once per link when it ends: it decides whether and when
    // to reconnect.
    _down(link, why, delay) {
      if (link.down) return;
      link.down = true;
      clearTimeout(link.timer);
      clearInterval(link.beat);
      if (this._deferLink === link) this._disarmDefer();
      if (this._link === link) this._link = null;
      this._flushAck(); // saves; the ack goes out on the next link
      if (!this._running) return;
      var g = link.goAway, e = link.fatal;
      if (g && g.reason === "REASON_REPLACED") {
        this._halt("closed", "replaced");
        return;
      }
      if (e && (e.code === "CODE_UNAUTHENTICATED" || e.code === "CODE_UNSUPPORTED_VERSION")) {
        this._halt("error", e);
        return;
      }
      this._retry(g, g ? g.reason : e ? e.code : why, delay);
    }

    // _retry reconnects after a full-jitter exponential backoff, and at
    // least the GoAway's reconnect hint; after a protocol error (a client
    // bug) the backoff is long. TOKEN_EXPIRED needs nothing more:
    // opts.token is called again.
    _retry(g, reason, delay) {
      var n = Math.max(this._attempt, this._failures);
      this._attempt++;
      if (delay === undefined) {
        var cap = Math.min(this._o.maxBackoff, this._o.minBackoff * Math.pow(2, Math.min(n, 30)));
        if (g && g.reason === "REASON_PROTOCOL") {
          cap = this._o.maxBackoff;
          delay = cap / 2 + Math.floor(Math.random() * cap / 2);
        } else {
          delay = Math.floor(Math.random() * cap);
        }
        delay += g ? g.reconnectAfterMs : 0;
      }
      this._setState("connecting", { attempt: this._attempt, delayMs: delay, reason: reason });
      var gen = this._gen;
      this._retryTimer = setTimeout(() => this._connect(gen), delay);
    }

    // _halt stops for good (until start): on stop, REPLACED or a fatal
    // authentication error.
    _halt(state, detail) {
      var wasRunning = this._running;
      this._running = false;
      this._gen++;
      clearTimeout(this._retryTimer);
      this._retryTimer = null;
      this._disarmDefer();
      this._queue.length = 0;
      this._flushAck();
      var l = this._link;
      if (l) {
        this._link = null;
        l.down = true;
        clearTimeout(l.timer);
        clearInterval(l.beat);
        try { l.ws.close(1000, "stop"); } catch (e) { /* closed already */ }
      }
      if (typeof removeEventListener === "function") removeEventListener("pagehide", this._pagehide);
      if (wasRunning || this._state !== state) this._setState(state, detail);
    }

    _setState(state, detail) {
      if (state === this._state && state !== "connecting") return;
      this._state = state;
      try {
        this._o.onState(state, detail);
      } catch (e) {
        this._report({ code: "CALLBACK", message: "onState: " + (e && e.message || e), fatal: false });
      }
    }

    _report(e) {
      this._s.errors++;
      try { this._o.onError(e); } catch (x) { /* the app's problem */ }
    }

    // --- items ---

    _enqueue(link, task) {
      this._queue.push({ link: link, task: task });
      if (!this._pumping) this._pump();
    }

    // _pump delivers queued frames' items one at a time. Items of a link
    // that closed meanwhile are still delivered (duplicates of them are
    // dropped later); those after a failed handler on the same link are
    // not (the gateway sends them again).
    async _pump() {
      this._pumping = true;
      try {
        while (this._queue.length) {
          var q = this._queue.shift();
          if (q.link.failed || !this._running) continue;
          if (q.task.sync) {
            await this._syncFrame(q.link, q.task.sync);
          } else {
            await this._items(q.link, q.task.live.items || []);
          }
        }
      } finally {
        this._pumping = false;
      }
    }

    async _syncFrame(link, s) {
      if (link.failed || link.user !== this._owner) return;
      if (!s.done && this._state === "live" && this._link === link) this._setState("syncing", { sessionId: this._sessionId });
      var resets = s.resets || [];
      for (var i = 0; i < resets.length; i++) {
        // The business's stream was recreated: its point and local state
        // are void, what follows is new.
        var b = resets[i];
        this._s.resets++;
        this._points.delete(b);
        this._dirty.delete(b);
        this._unsaved = true;
        if (this._o.onReset) {
          try {
            await this._o.onReset(b);
          } catch (e) {
            this._report({ code: "HANDLER", message: "onReset(" + b + "): " + (e && e.message || e), fatal: false });
          }
        }
      }
      var tresets = s.topicResets || [];
      for (var j = 0; j < tresets.length; j++) {
        // Likewise for a topic's stream: its cursor is void.
        var tp = tresets[j];
        this._s.topicResets++;
        this._topics.delete(tp);
        this._tdirty.delete(tp);
        this._unsaved = true;
        if (this._o.onTopicReset) {
          try {
            await this._o.onTopicReset(tp);
          } catch (e) {
            this._report({ code: "HANDLER", message: "onTopicReset(" + tp + "): " + (e && e.message || e), fatal: false });
          }
        }
      }
      // The done frame may carry no items.
      if (!(await this._items(link, s.items || []))) return;
      if (s.done) {
        this._flushAck();
        if (this._link === link && !link.down) {
          this._attempt = 0;
          this._deferred(link, s);
          this._setState("live", { sessionId: this._sessionId });
        }
      }
    }

    // _deferred arms the request for the buckets the gateway deferred in
    // the round that s ends (a FOREGROUND event after retryAfterMs plus up
    // to 25%), replacing one armed before; a round without deferrals
    // disarms it.
    _deferred(link, s) {
      this._disarmDefer();
      var buckets = s.deferred || [];
      if (!buckets.length) return;
      this._s.deferrals++;
      var wait = Number(s.retryAfterMs || 0) || DEFER_RETRY_MS;
      wait += Math.floor(Math.random() * (wait * DEFER_JITTER + 1));
      this._deferLink = link;
      this._deferTimer = setTimeout(() => {
        this._deferTimer = null;
        this._deferLink = null;
        if (this._link === link && !link.down && this._send(link, { event: { type: "TYPE_FOREGROUND" } })) this._s.deferRetries++;
      }, wait);
    }

    _disarmDefer() {
      if (this._deferTimer !== null) clearTimeout(this._deferTimer);
      this._deferTimer = null;
      this._deferLink = null;
    }

    // _items delivers items in order; false if a handler failed (the link
    // is then dropped) or the client stopped.
    async _items(link, raw) {
      var gen = this._gen;
      for (var i = 0; i < raw.length; i++) {
        // Items of a link that failed, or of another user than the points'
        // (an older link's), are not delivered; nor any after stop.
        if (link.failed || link.user !== this._owner || gen !== this._gen) return false;
        var d;
        try {
          d = decodeItem(raw[i]);
        } catch (e) {
          this._report({ code: "CODE_BAD_FRAME", message: "bad item: " + e.message, fatal: false });
          this._fail(link, "bad item");
          return false;
        }
        var it = d.item;
        var fn = (it.topic && this._topicHandlers.get(it.topic)) || this._handlers.get(it.business) || this._default;
        if (it.transient) {
          this._s.transient++;
          if (fn) {
            try {
              await fn(it);
            } catch (e) {
              this._report({ code: "HANDLER", message: (it.topic ? "topic " + it.topic : it.business) + " transient item: " + (e && e.message || e), fatal: false });
            }
          }
          continue;
        }
        // A topic item's id is its topic stream's: it is deduped, and
        // advances, the topic's cursor.
        var marks = it.topic ? this._topics : this._points, name = it.topic || it.business;
        var dirty = it.topic ? this._tdirty : this._dirty;
        var p = marks.get(name);
        if (p && p.epoch === d.epoch && d.id <= p.id) {
          this._s.duplicates++;
          continue;
        }
        if (it.expiresMs && it.expiresMs <= Date.now() + this._clockOffset) {
          this._s.expired++;
        } else if (fn) {
          try {
            await fn(it);
          } catch (e) {
            this._failures++;
            this._report({ code: "HANDLER", message: (it.topic ? "topic " + it.topic : it.business) + " item " + it.id + ": " + (e && e.message || e), fatal: false });
            this._fail(link, "handler failed");
            return false;
          }
        }
        this._failures = 0;
        marks.set(name, { id: d.id, epoch: d.epoch });
        dirty.add(name);
        this._unsaved = true;
        this._s.delivered++;
        if (it.topic) this._s.topicItems++;
        this._scheduleAck();
      }
      return true;
    }

    // _fail stops delivery from link and drops it: what was not handled
    // comes again on the next link.
    _fail(link, why) {
      link.failed = true;
      this._drop(link, why);
    }

    // --- points ---

    _scheduleAck() {
      if (this._ackTimer !== null) return;
      this._ackTimer = setTimeout(() => {
        this._ackTimer = null;
        this._flushAck();
      }, this._o.ackInterval);
    }

    // _flushAck saves the points and topic cursors, then acknowledges
    // those that advanced, if a link is up (else the next Welcome does). A
    // failed save is reported, and the ack still goes out: the gateway's
    // recorded points then serve the next Hello's omissions.
    _flushAck() {
      if (this._ackTimer !== null) {
        clearTimeout(this._ackTimer);
        this._ackTimer = null;
      }
      this._save();
      if (!this._dirty.size && !this._tdirty.size) return;
      var l = this._link;
      if (!l || !l.welcomed || l.down) return;
      var points = [], topics = [];
      this._dirty.forEach((b) => {
        var p = this._points.get(b);
        if (p) points.push({ business: b, id: p.id.toString(), epoch: p.epoch.toString() });
      });
      this._tdirty.forEach((t) => {
        var p = this._topics.get(t);
        if (p) topics.push({ topic: t, id: p.id.toString(), epoch: p.epoch.toString() });
      });
      for (var i = 0, j = 0; i < points.length || j < topics.length; i += MAX_POINTS, j += MAX_TOPICS) {
        var ack = {};
        if (i < points.length) ack.points = points.slice(i, i + MAX_POINTS);
        if (j < topics.length) ack.topics = topics.slice(j, j + MAX_TOPICS);
        if (!this._send(l, { ack: ack })) return;
        this._s.acks++;
      }
      this._dirty.clear();
      this._tdirty.clear();
    }

    _save() {
      if (!this._unsaved) return true;
      try {
        var doc = { version: STATE_VERSION, user: this._owner, points: this.points() };
        if (this._topics.size) doc.topics = this.topicCursors();
        this._o.storage.setItem(this._o.storageKey, JSON.stringify(doc));
        this._unsaved = false;
        return true;
      } catch (e) {
        this._report({ code: "STORAGE", message: "saving sync points: " + (e && e.message || e), fatal: false });
        return false;
      }
    }

    _load() {
      var raw;
      try {
        raw = this._o.storage.getItem(this._o.storageKey);
      } catch (e) {
        this._report({ code: "STORAGE", message: "reading sync points: " + (e && e.message || e), fatal: false });
        return;
      }
      if (!raw) return;
      try {
        var doc = JSON.parse(raw);
        if (!doc || doc.version !== STATE_VERSION || typeof doc.points !== "object") {
          throw new Error("not version " + STATE_VERSION + " sync points");
        }
        if (doc.topics !== undefined && (!doc.topics || typeof doc.topics !== "object")) {
          throw new Error("topic cursors are not an object");
        }
        loadMarks(this._points, doc.points);
        loadMarks(this._topics, doc.topics); // absent in older clients' points
        this._owner = typeof doc.user === "string" ? doc.user : "";
      } catch (e) {
        // Unreadable: start from the gateway's recorded points.
        this._points.clear();
        this._topics.clear();
        this._report({ code: "STORAGE", message: "bad saved sync points: " + (e && e.message || e), fatal: false });
      }
    }
  }

  root.Sluice = { Client: Client, PROTOCOL: PROTOCOL, VERSION: VERSION };
})(typeof window !== "undefined" ? window : this);
