// The ownership protocol of docs/PROTOCOL.md ("Sharing bots among worker instances"),
// in Node.js, written from the document: a WorkerGroup joins a group of worker
// instances, in any language (the Python SDK's included), and shares the group's
// bots with them: each bot is handled by one instance at a time, a crashed
// instance's bots move within leaseTtlS + claimIntervalS, a stopping one hands
// its bots back at once, and no audio frame is skipped.
//
//   const group = new WorkerGroup({ redis, group: "notes", instance: "w1", handlers });
//   await group.start();   ...   await group.stop();
//
// handlers (all optional, may be async): onStart(bot), onStop(bot, reason),
// onEvent(bot, event), onAudio(bot, frame). An entry is acknowledged only after
// its handler returned; a handler that throws or overstays handlerTimeoutS is logged
// and counted, and its entry is still acknowledged (as in the Python SDK).
// `bot.send(field, value)` XADDs a command.
//
// `group.metrics` (WorkerMetrics) holds the Python SDK's `meetstream_worker_*` series,
// same names, labels and meaning (docs/WORKERS.md, Metrics), in `group.metrics.registry`.
"use strict";

const zlib = require("node:zlib");
const Redis = require("ioredis");
const prom = require("prom-client");

// Extend or delete the lease only if we still hold it.
const RENEW = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('pexpire', KEYS[1], ARGV[2]) end return 0";
const RELEASE = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end return 0";
// Stay in the member set with an expiry on Redis's clock; drop expired members; return the live ones.
const HEARTBEAT = `
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if tonumber(ARGV[2]) > 0 then
  redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
  redis.call('PEXPIRE', KEYS[1], 3600000)
end
return redis.call('ZRANGE', KEYS[1], 0, -1)
`;
const START_TYPES = new Set(["connected", "ready", "audio_handshake"]);
const JOURNAL_MAXLEN = "10000";
const STOP_REASONS = ["session_ended", "released", "lease_lost", "expired", "error"];
const STREAMS = ["audio", "events"];
const HANDLER_OUTCOMES = ["error", "timeout"];
// Handler time per entry: from a millisecond to the default handler timeout (the SDK's buckets).
const HANDLER_BUCKETS = [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60];

const TIMED_OUT = Symbol("timed out");
const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));
const now = () => performance.now() / 1000; // monotonic seconds
const idMs = (id) => Number(String(id).split("-")[0]);
const idKey = (id) => String(id).split("-").map(Number); // [ms, seq]

function fieldMap(flat, keepBuffers = false) {
  const out = {};
  for (let i = 0; i < flat.length; i += 2) {
    const name = flat[i].toString();
    out[name] = keepBuffers && name === "pcm" ? flat[i + 1] : flat[i + 1].toString();
  }
  return out;
}

function crc32(text) {
  return zlib.crc32 ? zlib.crc32(text) : [...text].reduce((h, c) => (h * 31 + c.charCodeAt(0)) >>> 0, 7);
}

// The Python SDK's metrics (workers/metrics.py), same names, types, labels and meaning:
// every series carries `group`; the other labels come from closed sets, never a bot_id.
// Every series exists from the first scrape (pre-initialised at 0).
// Open the command client for a redis:// or rediss:// URL: a single Redis, or a Redis
// Cluster seeded by the URL's node. cluster: "auto" (ask the server: INFO cluster, as the
// Python SDK and the gateway do), "yes" or "no". Resolves to { redis, isCluster }; blocking
// reads use its duplicate()s (on a Cluster: routed by key slot, so a bot's two streams,
// which share its hash tag, are read from the node that serves them).
async function openRedis(url, { cluster = "auto", onError = () => {}, attempts = 10 } = {}) {
  if (!["auto", "yes", "no"].includes(cluster)) throw new Error(`cluster must be auto, yes or no, not ${cluster}`);
  let isCluster = cluster === "yes";
  // Auto: asked until the server answers (attempts, as the SDK's open_client), and
  // only then the client opened; yes or no: opened at once, it connects (and queues
  // commands) in the background.
  for (let attempt = 1; cluster === "auto"; attempt++) {
    const probe = new Redis(url, { lazyConnect: true, retryStrategy: () => null, connectTimeout: 5000 });
    probe.on("error", () => {});
    try {
      await probe.connect();
      isCluster = /cluster_enabled:1/.test(await probe.info("cluster"));
      break;
    } catch (e) {
      if (attempt >= attempts) throw e;
      onError(e);
      await sleep(Math.min(500 * attempt, 5000));
    } finally {
      probe.disconnect();
    }
  }
  let redis;
  if (isCluster) {
    const u = new URL(url);
    const redisOptions = {};
    if (u.username) redisOptions.username = decodeURIComponent(u.username);
    if (u.password) redisOptions.password = decodeURIComponent(u.password);
    if (u.protocol === "rediss:") redisOptions.tls = {};
    redis = new Redis.Cluster([{ host: u.hostname, port: Number(u.port || 6379) }], {
      redisOptions,
      enableAutoPipelining: true, // commands of a batch() go to each node together
    });
  } else redis = new Redis(url);
  redis.on("error", onError);
  return { redis, isCluster };
}

class WorkerMetrics {
  constructor(group, registry = new prom.Registry()) {
    this.registry = registry;
    const NS = "meetstream_worker";
    const make = (Kind, name, help, labels = [], extra = {}) =>
      new Kind({ name: `${NS}_${name}`, help, labelNames: ["group", ...labels], registers: [registry], ...extra });
    const one = (metric) => {
      const child = metric.labels({ group });
      if (child.inc) child.inc(0);
      else child.set(0);
      return child;
    };
    const by = (metric, label, values) =>
      Object.fromEntries(
        values.map((v) => {
          const child = metric.labels({ group, [label]: v });
          if (child.inc) child.inc(0);
          else child.set(0);
          return [v, child];
        }),
      );
    this.botsOwned = one(make(prom.Gauge, "bots_owned", "Bots this instance owns now"));
    this.botsKnown = one(make(prom.Gauge, "bots_known", "Live bots of the group (its registry) as this instance last read it"));
    this.members = one(make(prom.Gauge, "group_members", "Live instances of the group as this instance last saw them"));
    this.botsStarted = one(make(prom.Counter, "bots_started_total", "Bots this instance took"));
    this.takeovers = one(
      make(
        prom.Counter,
        "takeovers_total",
        "Bots this instance took that an instance of the group had handled before " +
          "(after a crash, a hand-back, a rebalance or a reconnect)",
      ),
    );
    this.botsStopped = by(make(prom.Counter, "bots_stopped_total", "Bots this instance let go, by why", ["reason"]), "reason", STOP_REASONS);
    this.botsShed = one(make(prom.Counter, "bots_handed_over_total", "Bots handed back to balance the group"));
    this.entries = by(make(prom.Counter, "entries_handled_total", "Stream entries dispatched to handlers", ["stream"]), "stream", STREAMS);
    this.entriesClaimed = one(
      make(prom.Counter, "entries_claimed_total", "Entries a previous owner read and did not acknowledge, taken over (they may repeat)"),
    );
    const seconds = make(prom.Histogram, "handler_seconds", "Time all handlers took for one entry", ["stream"], { buckets: HANDLER_BUCKETS });
    this.handlerSeconds = Object.fromEntries(
      STREAMS.map((stream) => {
        seconds.zero({ group, stream });
        return [stream, seconds.labels({ group, stream })];
      }),
    );
    this.handlerFailures = by(
      make(prom.Counter, "handler_failures_total", "Handlers that raised or timed out", ["outcome"]),
      "outcome",
      HANDLER_OUTCOMES,
    );
    this.lagEntries = by(
      make(
        prom.Gauge,
        "stream_lag_entries",
        "Most entries between what this instance handled and the head of an owned bot's stream " +
          "(audio only: counted by seq); past the gateway's audio MAXLEN, unread audio is trimmed",
        ["stream"],
      ),
      "stream",
      ["audio"],
    ).audio;
    this.lagSeconds = by(
      make(prom.Gauge, "stream_lag_seconds", "Most time between the last entry this instance handled and the head of an owned bot's stream", ["stream"]),
      "stream",
      STREAMS,
    );
    this.seqGaps = one(
      make(
        prom.Counter,
        "audio_seq_gaps_total",
        "Audio frames missing under one connection before this instance read them " +
          "(trimmed by the gateway's MAXLEN, or lost upstream)",
      ),
    );
    this.seqRepeats = one(make(prom.Counter, "audio_seq_repeats_total", "Audio frames seen again (handled twice after a takeover)"));
    this.ownVoiceSkipped = one(make(prom.Counter, "own_voice_frames_skipped_total", "Frames of the bot's own voice not passed to onAudio"));
    this.maxBotsHit = one(make(prom.Counter, "max_bots_hit_total", "Claim rounds that left free bots because max_bots was reached"));
    this.redisErrors = one(make(prom.Counter, "redis_errors_total", "Redis operations that failed (retried, or the bot was let go)"));
  }
}

class Bot {
  constructor(group, id, commandsKey) {
    this.id = id;
    this.commandsKey = commandsKey;
    this.state = {}; // the application's own per-bot state
    this.ready = false;
    this.takenOver = false;
    this.name = group.botName; // its display name: set by botName, else from its ready handshake
    this._group = group;
  }

  // XADD one command (field "json" or "msgpack") to the bot's command stream, capped.
  // Refused once this instance's lease may have lapsed: a handler that ran on past it
  // must not act beside the bot's new owner.
  async send(field, value) {
    if (this._owned && !this._owned()) throw new Error(`${this.id}: the lease on this bot has lapsed; command not sent`);
    return this._group.redis.xadd(this.commandsKey, "MAXLEN", "~", "1000", "*", field, value);
  }
}

class WorkerGroup {
  constructor(opts) {
    this.redis = opts.redis; // an ioredis client or Cluster (commands); blocking reads use duplicates
    this.isCluster = Boolean(this.redis.isCluster);
    this.prefix = opts.prefix || "meetstream";
    this.group = opts.group;
    this.instance = opts.instance;
    this.leaseTtlS = opts.leaseTtlS ?? 5;
    this.leaseRenewS = opts.leaseRenewS ?? this.leaseTtlS / 5;
    this.claimIntervalS = opts.claimIntervalS ?? 0.5;
    this.balanceStepS = opts.balanceStepS ?? 0.5;
    this.maxBots = opts.maxBots ?? 1000;
    this.readCount = opts.readCount ?? 64;
    this.blockMs = opts.blockMs ?? 1000;
    this.lookbackS = opts.lookbackS ?? 3600;
    this.gracefulS = opts.gracefulS ?? 20;
    this.conformance = Boolean(opts.conformance);
    this.handlers = opts.handlers || {};
    this.log = opts.log || (() => {});
    this.handlerTimeoutS = opts.handlerTimeoutS ?? 60; // 0: none
    this.lagSampleS = opts.lagSampleS ?? 5;
    this.botName = opts.botName || null; // the bot's display name: its own voice comes back under it
    this.excludeOwnVoice = opts.excludeOwnVoice ?? true;
    this.metrics = opts.metrics || new WorkerMetrics(this.group);
    if (this.leaseRenewS * 2 >= this.leaseTtlS) throw new Error("leaseRenewS must be under half of leaseTtlS");

    this.keys = {
      global: `${this.prefix}:events`,
      registry: `${this.prefix}:workers:${this.group}:bots`,
      members: `${this.prefix}:workers:${this.group}:instances`,
      journal: `${this.prefix}:workers:${this.group}:journal`,
    };
    this.memberTtlMs = Math.max(1, Math.round((this.leaseTtlS - this.leaseRenewS) * 1000));
    this.runners = new Map(); // bot_id -> runner
    this.members = [this.instance];
    this.freeSince = new Map();
    this.shedUntil = new Map();
    this.lastShed = 0;
    this.stopping = false;
    this._wake = null;
    this._loops = [];
  }

  // Commands that may touch keys of many slots, sent together: one pipeline on a single
  // Redis; in a cluster each on its own (auto-pipelined per node by the Cluster client).
  // Resolves to [[error, reply], ...] in order, as a pipeline's exec().
  async batch(commands) {
    if (!commands.length) return [];
    if (!this.isCluster) return this.redis.pipeline(commands).exec();
    return Promise.all(
      commands.map(([name, ...args]) =>
        this.redis[name](...args).then(
          (reply) => [null, reply],
          (err) => [err, null],
        ),
      ),
    );
  }

  // A connection of its own for blocking reads (XREAD, XREADGROUP ... BLOCK): on a single
  // Redis one more connection; on a Cluster one more Cluster client, whose commands go to
  // the node serving their key's slot (and follow MOVED when a slot moves), unbatched.
  dedicated() {
    return this.isCluster ? this.redis.duplicate([], { enableAutoPipelining: false }) : this.redis.duplicate();
  }

  leaseKey(botId) {
    return `${this.prefix}:{${botId}}:lease:${this.group}`;
  }

  get bots() {
    return [...this.runners.keys()];
  }

  async journal(type, fields = {}) {
    const flat = ["type", type, "instance", this.instance];
    for (const [k, v] of Object.entries(fields)) flat.push(k, String(v));
    await this.redis.xadd(this.keys.journal, "MAXLEN", "~", JOURNAL_MAXLEN, "*", ...flat);
  }

  async start() {
    await this.heartbeat();
    await this.journal("hello", {
      lease_ttl_ms: Math.round(this.leaseTtlS * 1000),
      claim_interval_ms: Math.round(this.claimIntervalS * 1000),
      impl: "node",
    });
    this._loops = [this._discoveryLoop(), this._claimLoop(), this._renewLoop(), this._lagLoop()];
  }

  // Stop claiming, leave the member set (the others then take our bots at once),
  // let each bot's handlers finish (bounded), hand every bot back.
  async stop() {
    if (this.stopping) return;
    this.stopping = true;
    this.wake();
    if (this._stopLag) this._stopLag();
    await this.redis.zrem(this.keys.members, this.instance).catch(() => {});
    const runners = [...this.runners.values()];
    for (const r of runners) r.requestStop("released");
    const all = Promise.all(runners.map((r) => r.done));
    await Promise.race([all, sleep(this.gracefulS * 1000)]);
    await Promise.race([Promise.all(this._loops), sleep(this.blockMs + 2000)]);
    await this.journal("bye", { handed_back: runners.length }).catch(() => {});
  }

  wake() {
    if (this._wake) this._wake();
  }

  // -- discovery: every instance reads the whole lifecycle stream -------------------

  async _discoveryLoop() {
    const conn = this.dedicated();
    let last = null;
    try {
      while (!this.stopping) {
        try {
          if (last === null) last = await this._bootstrap(conn);
          const reply = await conn.xread("COUNT", 500, "BLOCK", this.blockMs, "STREAMS", this.keys.global, last);
          const learned = {};
          for (const [, entries] of reply || []) {
            for (const [id, flat] of entries) {
              last = id;
              const f = fieldMap(flat);
              if (f.type === "connected" && f.commands_key) learned[f.bot_id] = f.commands_key;
            }
          }
          if (Object.keys(learned).length) {
            await this.redis.hset(this.keys.registry, learned);
            this.wake();
          }
        } catch (e) {
          this.metrics.redisErrors.inc();
          this.log("discovery read failed, retrying", { error: String(e) });
          await sleep(1000);
        }
      }
    } finally {
      conn.disconnect();
    }
  }

  // Rebuild the set of live bots: fold the retained lifecycle stream (connected adds,
  // session_ended removes), then read on from the last id folded, never from "$".
  async _bootstrap(conn) {
    let start = this.lookbackS > 0 ? `${Date.now() - Math.round(this.lookbackS * 1000)}-0` : "-";
    let last = "0-0";
    const alive = {};
    for (;;) {
      const entries = await conn.xrange(this.keys.global, start, "+", "COUNT", 1000);
      for (const [id, flat] of entries) {
        last = id;
        const f = fieldMap(flat);
        if (f.type === "connected" && f.commands_key) alive[f.bot_id] = f.commands_key;
        else if (f.type === "session_ended") delete alive[f.bot_id];
      }
      if (entries.length < 1000) break;
      start = `(${last}`;
    }
    if (Object.keys(alive).length) await this.redis.hset(this.keys.registry, alive);
    this.log("discovery bootstrapped", { bots_alive: Object.keys(alive).length });
    this.wake();
    return last;
  }

  // -- ownership ---------------------------------------------------------------------

  async heartbeat() {
    const ttl = this.stopping ? 0 : this.memberTtlMs;
    const live = await this.redis.eval(HEARTBEAT, 1, this.keys.members, this.instance, ttl);
    this.members = [...new Set([...live.map(String), ...(ttl ? [this.instance] : [])])].sort();
    this.metrics.members.set(this.members.length);
    return this.members;
  }

  async _claimLoop() {
    while (!this.stopping) {
      try {
        await this._claimRound();
      } catch (e) {
        this.metrics.redisErrors.inc();
        this.log("claim round failed", { error: String(e) });
      }
      await Promise.race([sleep(this.claimIntervalS * 1000), new Promise((r) => (this._wake = r))]);
      this._wake = null;
    }
  }

  async _claimRound() {
    const members = await this.heartbeat();
    const registry = await this.redis.hgetall(this.keys.registry);
    this.metrics.botsKnown.set(Object.keys(registry).length);
    const t = now();
    for (const [bot, until] of this.shedUntil) if (until <= t) this.shedUntil.delete(bot);
    const candidates = Object.keys(registry).filter((b) => !this.runners.has(b));
    for (const b of [...this.freeSince.keys()]) if (!candidates.includes(b)) this.freeSince.delete(b);
    const held = new Map([[this.instance, this.runners.size]]);
    const free = new Map(); // bot -> seconds seen free
    if (candidates.length) {
      const replies = await this.batch(candidates.map((b) => ["get", this.leaseKey(b)]));
      candidates.forEach((b, i) => {
        const [err, holder] = replies[i];
        if (err) throw err;
        if (holder !== null) {
          held.set(holder, (held.get(holder) || 0) + 1);
          this.freeSince.delete(b);
        } else if (!this.shedUntil.has(b)) {
          if (!this.freeSince.has(b)) this.freeSince.set(b, t);
          free.set(b, t - this.freeSince.get(b));
        }
      });
    }
    const bots = Object.keys(registry).length;
    const fair = Math.ceil(bots / Math.max(1, members.length));
    if (free.size && !this.stopping) await this._take(free, registry, fair);
    this._maybeShed(bots, members, held, fair);
  }

  // Below the fair share: take free bots at once, up to it; a bot free for a whole
  // claim interval is anyone's. Lost races are retried further down the list.
  async _take(free, registry, fair) {
    const room = Math.max(0, this.maxBots - this.runners.size);
    if (!room) {
      this.metrics.maxBotsHit.inc();
      this.log("max_bots reached, leaving free bots to other instances", { max_bots: this.maxBots, free: free.size });
      return;
    }
    const atOnce = Math.max(0, fair - this.runners.size);
    const ranked = [...free.keys()].sort(
      (a, b) => free.get(b) - free.get(a) || crc32(`${this.instance}/${a}`) - crc32(`${this.instance}/${b}`),
    );
    const overdue = ranked.filter((b) => free.get(b) >= this.claimIntervalS);
    const fresh = ranked.filter((b) => free.get(b) < this.claimIntervalS);
    let won = 0;
    let wonFresh = 0;
    while (!this.stopping) {
      const roomLeft = room - won - wonFresh;
      const batch = overdue.splice(0, Math.max(0, roomLeft));
      const freshLeft = Math.min(roomLeft - batch.length, atOnce - wonFresh);
      const freshBatch = fresh.splice(0, Math.max(0, freshLeft));
      if (!batch.length && !freshBatch.length) return;
      const sent = now();
      const ttlMs = Math.round(this.leaseTtlS * 1000);
      const replies = await this.batch([...batch, ...freshBatch].map((b) => ["set", this.leaseKey(b), this.instance, "PX", ttlMs, "NX"]));
      const gone = await this._leftMeanwhile([...batch, ...freshBatch].filter((b, i) => replies[i][1] === "OK"));
      [...batch, ...freshBatch].forEach((b, i) => {
        const got = replies[i][1] === "OK" && !gone.has(b);
        this.freeSince.delete(b);
        if (i < batch.length) won += got;
        else wonFresh += got;
        if (got && !this.stopping) this._startRunner(b, registry[b], sent + this.leaseTtlS * 0.8);
      });
    }
  }

  // A lease won after the bot's last owner forgot it (HDEL comes before its release):
  // the bot left meanwhile and nobody would read past its session_ended. Release it.
  async _leftMeanwhile(won) {
    const gone = new Set();
    if (!won.length) return gone;
    const known = await this.batch(won.map((b) => ["hexists", this.keys.registry, b]));
    won.forEach((b, i) => {
      if (!known[i][1]) gone.add(b);
    });
    if (gone.size) {
      await this.batch([...gone].map((b) => ["eval", RELEASE, 1, this.leaseKey(b), this.instance]));
      this.log("bots left while being claimed; leases released", { bots: [...gone] });
    }
    return gone;
  }

  // Above the fair share while another member holds two fewer: hand one bot back.
  _maybeShed(bots, members, held, fair) {
    const t = now();
    if (this.stopping || this.balanceStepS <= 0 || t - this.lastShed < this.balanceStepS) return;
    const running = [...this.runners.values()].filter((r) => !r.stopReason);
    if (running.length <= fair) return;
    const others = members.filter((m) => m !== this.instance).map((m) => held.get(m) || 0);
    if (!others.length || running.length - Math.min(...others) < 2) return;
    const runner = running.reduce((a, b) => (b.startedAt > a.startedAt ? b : a));
    this.lastShed = t;
    this.shedUntil.set(runner.bot.id, t + this.leaseTtlS);
    this.metrics.botsShed.inc();
    this.log("handing a bot back to balance the group", { bot_id: runner.bot.id });
    runner.requestStop("released");
  }

  async _renewLoop() {
    while (!this.stopping || this.runners.size) {
      await sleep(this.leaseRenewS * 1000);
      const runners = [...this.runners.values()];
      if (!runners.length) continue;
      const sent = now();
      let replies;
      try {
        const ttlMs = Math.round(this.leaseTtlS * 1000);
        replies = await this.batch(
          runners.flatMap((r) => [
            ["eval", RENEW, 1, this.leaseKey(r.bot.id), this.instance, ttlMs],
            ["exists", r.eventsKey],
          ]),
        );
      } catch (e) {
        this.metrics.redisErrors.inc();
        this.log("lease renewal failed", { error: String(e) }); // runners stop when their validity runs out
        continue;
      }
      runners.forEach((r, i) => {
        if (replies[2 * i][0] || replies[2 * i + 1][0]) {
          // Not an answer (a node unreachable, a slot moving): the lease's validity runs out
          // unless a later renewal gets through.
          this.metrics.redisErrors.inc();
          return;
        }
        const renewed = replies[2 * i][1];
        const exists = replies[2 * i + 1][1];
        if (!renewed) {
          r.validUntil = 0;
          r.requestStop("lease_lost");
        } else if (!exists) r.requestStop("expired");
        else r.validUntil = sent + this.leaseTtlS * 0.8;
      });
    }
  }

  // Every lagSampleS: how far the owned bots' streams are ahead of what we handled.
  // Only bots whose last read came back full can be behind (a short read took
  // everything there was), so a group that keeps up costs no Redis call here.
  async _lagLoop() {
    while (!this.stopping) {
      await Promise.race([sleep(this.lagSampleS * 1000), new Promise((r) => (this._stopLag = r))]);
      if (this.stopping) break;
      const behind = [...this.runners.values()].filter((r) => r.behind && !r.stopReason);
      let entries = 0;
      const seconds = { audio: 0, events: 0 };
      try {
        // One XREVRANGE ... COUNT 1 per stream; separate commands, not one pipeline:
        // in a cluster each bot's keys may live on another node.
        const heads = await Promise.all(
          behind.map((r) =>
            Promise.all([
              this.redis.xrevrange(r.audioKey, "+", "-", "COUNT", 1),
              this.redis.xrevrange(r.eventsKey, "+", "-", "COUNT", 1),
            ]),
          ),
        );
        behind.forEach((r, i) => {
          const [n, audioS, eventsS] = r.lag(heads[i][0], heads[i][1]);
          entries = Math.max(entries, n);
          seconds.audio = Math.max(seconds.audio, audioS);
          seconds.events = Math.max(seconds.events, eventsS);
        });
      } catch (e) {
        this.metrics.redisErrors.inc();
        this.log("lag sample failed", { error: String(e) });
        continue;
      }
      this.metrics.lagEntries.set(entries);
      for (const s of STREAMS) this.metrics.lagSeconds[s].set(seconds[s]);
    }
  }

  // Run one handler for a bot: bounded by handlerTimeoutS, a failure logged and counted,
  // never thrown (the entry is acknowledged all the same: a handler that always fails on
  // an entry must not stop the bot's stream forever). A promise cannot be cancelled: one
  // that overstays runs on in the background while the bot goes on.
  async callHandler(name, bot, ...args) {
    const fn = this.handlers[name];
    if (!fn) return;
    let timer = null;
    try {
      const result = fn(bot, ...args);
      if (result && typeof result.then === "function") {
        if (this.handlerTimeoutS > 0) {
          const timeout = new Promise((resolve) => {
            timer = setTimeout(() => resolve(TIMED_OUT), this.handlerTimeoutS * 1000);
          });
          const outcome = await Promise.race([result, timeout]);
          if (outcome === TIMED_OUT) {
            result.catch(() => {});
            this.metrics.handlerFailures.timeout.inc();
            this.log("handler timed out", { bot_id: bot.id, handler: name, handler_timeout_s: this.handlerTimeoutS });
          }
        } else await result;
      }
    } catch (e) {
      this.metrics.handlerFailures.error.inc();
      this.log("handler failed", { bot_id: bot.id, handler: name, error: String((e && e.stack) || e) });
    } finally {
      if (timer) clearTimeout(timer);
    }
  }

  _startRunner(botId, commandsKey, validUntil) {
    const runner = new Runner(this, botId, commandsKey, validUntil);
    this.runners.set(botId, runner);
    this.metrics.botsStarted.inc();
    this.metrics.botsOwned.set(this.runners.size);
    runner.done = runner.run().catch((e) => this.log("bot runner failed", { bot_id: botId, error: String(e) }));
    this.log("bot taken", { bot_id: botId });
  }
}

// One owned bot: reads its events and audio in the group's consumer group, dispatches
// in order, acknowledges after the handlers returned.
class Runner {
  constructor(group, botId, commandsKey, validUntil) {
    this.g = group;
    this.bot = new Bot(group, botId, commandsKey);
    this.bot._owned = () => now() <= this.validUntil;
    this.eventsKey = `${group.prefix}:{${botId}}:events`;
    this.audioKey = `${group.prefix}:{${botId}}:audio`;
    this.validUntil = validUntil;
    this.startedAt = now();
    this.stopReason = null;
    this.groups = new Set();
    this.held = new Map(); // stream key -> entries read past what may be overtaken
    this.lastSeq = new Map();
    this.lastEventId = "";
    this.ended = false;
    this.records = [];
    this.behind = false; // the last read of a stream came back full: we may be behind its head
    this.lastFrame = null; // [conn, seq, entry ms] of the last frame handled
    this.lastEventMs = 0;
  }

  // How far the streams' heads (XREVRANGE ... COUNT 1 replies) are ahead of us: audio
  // entries (by seq; a head of a newer connection counts its seq + 1, a lower bound),
  // and seconds of entry time on each stream. As the SDK's BotRunner.lag.
  lag(audioHead, eventsHead) {
    let entries = 0;
    let audioS = 0;
    let eventsS = 0;
    if (audioHead && audioHead.length && this.lastFrame) {
      const [headId, flat] = audioHead[0];
      const f = fieldMap(flat);
      const [conn, seq, ms] = this.lastFrame;
      const headSeq = Number(f.seq || 0);
      entries = f.conn === conn ? Math.max(0, headSeq - seq) : headSeq + 1;
      audioS = Math.max(0, (idMs(headId) - ms) / 1000);
    }
    if (eventsHead && eventsHead.length && this.lastEventMs) {
      eventsS = Math.max(0, (idMs(eventsHead[0][0]) - this.lastEventMs) / 1000);
    }
    return [entries, audioS, eventsS];
  }

  requestStop(reason) {
    if (!this.stopReason) this.stopReason = reason;
  }

  async run() {
    const g = this.g;
    const conn = g.dedicated();
    let reason = "released";
    try {
      await g.journal("start", { bot_id: this.bot.id }); // before anything of the bot is handled
      await g.callHandler("onStart", this.bot);
      await this._ensureGroups(conn);
      if (!this.groups.has(this.eventsKey)) this.stopReason = "expired";
      else await this._claimPending(conn);
      if (this.bot.takenOver) g.metrics.takeovers.inc();
      while (!this.stopReason) {
        if (now() > this.validUntil) {
          this.stopReason = "lease_lost";
          break;
        }
        if (!this.groups.has(this.audioKey)) await this._ensureGroups(conn);
        const keys = [this.eventsKey, this.audioKey].filter((k) => this.groups.has(k));
        const block = this.ended ? [] : ["BLOCK", g.blockMs];
        const reply = await conn.xreadgroupBuffer(
          "GROUP", g.group, g.instance, "COUNT", g.readCount, ...block, "STREAMS", ...keys, ...keys.map(() => ">"),
        );
        const batches = new Map([[this.eventsKey, []], [this.audioKey, []]]);
        for (const [key, entries] of reply || []) batches.set(key.toString(), entries);
        const empty = [...batches.values()].every((v) => !v.length) && [...this.held.values()].every((v) => !v.length);
        if (this.ended && empty) {
          this.stopReason = "session_ended";
          break;
        }
        const full = new Map([...batches].map(([k, v]) => [k, v.length >= g.readCount]));
        this.behind = [...full.values()].some(Boolean);
        await this._process(conn, batches, full);
      }
      reason = this.stopReason || "released";
    } catch (e) {
      reason = "error";
      g.metrics.redisErrors.inc();
      g.log("bot stream failed; releasing it", { bot_id: this.bot.id, error: String(e) });
    } finally {
      await this._finish(conn, reason);
    }
  }

  async _finish(conn, reason) {
    const g = this.g;
    await g.callHandler("onStop", this.bot, reason);
    this.validUntil = 0; // from here the bot may be another instance's
    try {
      if (reason === "session_ended" || reason === "expired") {
        // Forget the bot unless it has come back (its stream holds something newer).
        await g.redis.hdel(g.keys.registry, this.bot.id);
        const newest = await conn.xrevrange(this.eventsKey, "+", "-", "COUNT", 1);
        if (newest.length && newest[0][0] !== this.lastEventId) await g.redis.hset(g.keys.registry, this.bot.id, this.bot.commandsKey);
      }
      await g.journal("stop", { bot_id: this.bot.id, reason }); // before the release
      if (reason !== "lease_lost") await g.redis.eval(RELEASE, 1, g.leaseKey(this.bot.id), g.instance);
    } catch (e) {
      g.log("letting a bot go failed", { bot_id: this.bot.id, error: String(e) });
    }
    conn.disconnect();
    if (g.runners.get(this.bot.id) === this) g.runners.delete(this.bot.id);
    g.metrics.botsStopped[reason].inc();
    g.metrics.botsOwned.set(g.runners.size);
    g.log("bot let go", { bot_id: this.bot.id, reason });
    g.wake();
  }

  async _ensureGroups(conn) {
    for (const key of [this.eventsKey, this.audioKey]) {
      if (this.groups.has(key)) continue;
      try {
        // From 0, and never MKSTREAM: a stream we created would have no expiry.
        await conn.xgroup("CREATE", key, this.g.group, "0");
      } catch (e) {
        const text = String(e);
        if (text.includes("BUSYGROUP")) this.bot.takenOver = true;
        else if (/no such key|requires the key to exist/i.test(text)) continue;
        else throw e;
      }
      this.groups.add(key);
    }
  }

  // Take over what a previous owner read and did not acknowledge, handle it first.
  async _claimPending(conn) {
    const g = this.g;
    const claimed = new Map([[this.eventsKey, []], [this.audioKey, []]]);
    for (const key of this.groups) {
      let cursor = "0-0";
      do {
        const reply = await conn.xautoclaimBuffer(key, g.group, g.instance, 0, cursor, "COUNT", g.readCount);
        cursor = reply[0].toString();
        for (const entry of reply[1]) {
          if (entry && entry[1]) claimed.get(key).push(entry);
          else if (entry && entry[0]) await conn.xack(key, g.group, entry[0]); // trimmed since: nothing to hand over
        }
      } while (cursor !== "0-0");
      // Consumers with nothing pending are gone instances: tidy them away.
      const consumers = await conn.xinfo("CONSUMERS", key, g.group);
      for (const c of consumers) {
        const info = fieldMap(c);
        if (info.name !== g.instance && Number(info.pending) === 0) await conn.xgroup("DELCONSUMER", key, g.group, info.name);
      }
    }
    const n = [...claimed.values()].reduce((sum, v) => sum + v.length, 0);
    if (n) {
      g.metrics.entriesClaimed.inc(n);
      this.bot.takenOver = true;
      await this._process(conn, claimed, new Map());
    }
  }

  // Within one millisecond a connection's start events go before audio, the rest after it.
  _order(key, id, f) {
    const [ms, seq] = idKey(id);
    if (key === this.audioKey) return [ms, 1, seq];
    return [ms, START_TYPES.has(f.type) ? 0 : 2, seq];
  }

  async _process(conn, batches, full) {
    const g = this.g;
    const merged = [];
    for (const key of [this.eventsKey, this.audioKey]) {
      const entries = [...(this.held.get(key) || []), ...(batches.get(key) || [])];
      this.held.set(key, []);
      for (const [rawId, flat] of entries) {
        const id = rawId.toString();
        const f = fieldMap(flat, key === this.audioKey);
        merged.push({ order: this._order(key, id, f), key, id, f, raw: [rawId, flat] });
      }
    }
    // Past the end of a full batch, the other stream may hold older entries not read yet.
    const marks = [...full].filter(([k, isFull]) => isFull && batches.get(k).length).map(([k]) => idMs(batches.get(k).at(-1)[0]));
    const mark = marks.length ? Math.min(...marks) : null;
    merged.sort((a, b) => a.order[0] - b.order[0] || a.order[1] - b.order[1] || a.order[2] - b.order[2]);
    const done = new Map([[this.eventsKey, []], [this.audioKey, []]]);
    for (const e of merged) {
      if (mark !== null && (e.order[0] > mark || (e.order[0] === mark && e.order[1] > 1))) {
        this.held.get(e.key).push(e.raw);
        continue;
      }
      if (now() > this.validUntil) {
        // Our lease may be gone: stop before a new owner could handle the same entry.
        this.held.clear();
        this.stopReason = "lease_lost";
        break;
      }
      const began = performance.now();
      if (e.key === this.eventsKey) await this._event(e.id, e.f);
      else await this._audio(e.id, e.f);
      g.metrics.handlerSeconds[e.key === this.eventsKey ? "events" : "audio"].observe((performance.now() - began) / 1000);
      done.get(e.key).push(e.id);
    }
    for (const [key, ids] of done) if (ids.length) g.metrics.entries[key === this.eventsKey ? "events" : "audio"].inc(ids.length);
    if (![...done.values()].some((v) => v.length)) return;
    // Records before acknowledgements: an entry may be recorded twice, never acked unrecorded.
    const records = this.records.map((flat) => ["xadd", g.keys.journal, "MAXLEN", "~", JOURNAL_MAXLEN, "*", ...flat]);
    this.records = [];
    const acks = [...done].filter(([, ids]) => ids.length).map(([key, ids]) => ["xack", key, g.group, ...ids]);
    // One pipeline on a single Redis; in a cluster the journal may live on another node
    // than the bot's streams: the records first, then the acknowledgements.
    const steps = g.isCluster ? [records, acks] : [[...records, ...acks]];
    for (const step of steps) {
      for (const [err] of await g.batch(step)) if (err) throw err;
    }
  }

  async _event(id, f) {
    const g = this.g;
    const bot = this.bot;
    this.lastEventId = id;
    this.lastEventMs = idMs(id);
    if (f.type === "connected") {
      this.ended = false;
      if (f.commands_key) bot.commandsKey = f.commands_key;
    } else if (f.type === "ready") {
      bot.ready = true;
      if (!g.botName) {
        // The bot's display name from its ready handshake: its own voice comes back under it.
        let data = null;
        try {
          data = JSON.parse(f.data || "null");
        } catch {
          data = null;
        }
        const named = data && ["bot_name", "display_name", "name"].find((k) => typeof data[k] === "string");
        if (named) bot.name = data[named];
      }
    }
    else if (f.type === "disconnected" && f.channel === "control") bot.ready = false;
    else if (f.type === "session_ended") {
      bot.ready = false;
      this.ended = true;
    } else if (f.type === "message" && g.conformance) {
      let data = null;
      try {
        data = JSON.parse(f.data);
      } catch {
        data = null;
      }
      if (data && data.type === "ping" && typeof data.id === "string") {
        await bot.send("json", JSON.stringify({ command: "sendmsg", message: `pong:${data.id}` }));
      }
    }
    await g.callHandler("onEvent", bot, { id, type: f.type, fields: f });
  }

  async _audio(id, f) {
    const g = this.g;
    const frame = { id, conn: f.conn, seq: Number(f.seq), speakerId: f.speaker_id, speakerName: f.speaker_name, pcm: f.pcm, ts: Number(f.ts) };
    this.lastFrame = [frame.conn, frame.seq, idMs(id)];
    const last = this.lastSeq.get(frame.conn);
    if (last !== undefined && frame.seq > last + 1) {
      g.metrics.seqGaps.inc(frame.seq - last - 1);
      g.log("audio frames missing", { bot_id: this.bot.id, conn: frame.conn, after_seq: last, missing: frame.seq - last - 1 });
    } else if (last !== undefined && frame.seq <= last) g.metrics.seqRepeats.inc();
    this.lastSeq.set(frame.conn, Math.max(frame.seq, last ?? -1));
    if (g.conformance) {
      this.records.push([
        "type", "frame", "instance", g.instance, "bot_id", this.bot.id,
        "conn", frame.conn, "seq", String(frame.seq), "entry_id", id, "at", String(Date.now()),
      ]);
    }
    if (g.excludeOwnVoice && this.bot.name && frame.speakerName === this.bot.name) {
      g.metrics.ownVoiceSkipped.inc();
      return;
    }
    await g.callHandler("onAudio", this.bot, frame);
  }
}

module.exports = { WorkerGroup, WorkerMetrics, openRedis, Bot, RENEW, RELEASE, HEARTBEAT, STOP_REASONS };
