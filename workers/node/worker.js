#!/usr/bin/env node
// A Meetstream worker in Node.js, written from docs/PROTOCOL.md alone.
//
// It joins a worker group (group.js: the ownership protocol of the contract, so
// Python SDK instances and this worker may share one group), greets each bot it
// owns in the chat when the bot is ready, counts the bot's audio frames and
// speakers, posts the counts as a MessagePack `sendchat`, and prints one JSON
// report line per bot when its session ends.
//
//   MEETSTREAM_REDIS_URL=redis://127.0.0.1:6379/0 node worker.js [--max-bots N]
//       [--report-every-s S] [--greeting TEXT] [--lag-sample-s S] [--read-count N]
//       [--audio-delay-ms MS]   (a handler slower than the audio: to watch the lag metrics)
//
// Env: MEETSTREAM_REDIS_URL, MEETSTREAM_KEY_PREFIX (default meetstream),
// MEETSTREAM_WORKER_GROUP (default node-greeter), MEETSTREAM_WORKER_INSTANCE
// (default host-pid), MEETSTREAM_LEASE_TTL_S (5), MEETSTREAM_LEASE_RENEW_S
// (a fifth of the TTL), MEETSTREAM_CLAIM_INTERVAL_S (0.5), MEETSTREAM_CONFORMANCE
// (1: the conformance kit's records and pongs, docs/WORKERS.md), MEETSTREAM_REDIS_CLUSTER
// (auto: a Cluster when the URL's server says cluster_enabled; yes; no), MEETSTREAM_BOT_NAME
// (its own voice is left out of onAudio), MEETSTREAM_WORKER_METRICS_PORT (0 or unset: no
// server) and MEETSTREAM_WORKER_METRICS_HOST (0.0.0.0): /metrics (the SDK's
// meetstream_worker_* series), /healthz (200 while the event loop answers) and /readyz
// (503 once stopping), as the Python SDK serves them.
"use strict";

const http = require("node:http");
const os = require("node:os");
const { encode } = require("@msgpack/msgpack");
const { WorkerGroup, WorkerMetrics, openRedis } = require("./group");

function parseArgs(argv) {
  const opts = { maxBots: 0, reportEveryS: 5, greeting: "Hello from a Node.js worker!", lagSampleS: 5, readCount: 64, audioDelayMs: 0 };
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i];
    if (a === "--max-bots") opts.maxBots = Number(argv[++i]);
    else if (a === "--report-every-s") opts.reportEveryS = Number(argv[++i]);
    else if (a === "--greeting") opts.greeting = argv[++i];
    else if (a === "--lag-sample-s") opts.lagSampleS = Number(argv[++i]);
    else if (a === "--read-count") opts.readCount = Number(argv[++i]);
    else if (a === "--audio-delay-ms") opts.audioDelayMs = Number(argv[++i]);
    else throw new Error(`unknown argument ${a}`);
  }
  return opts;
}

const env = process.env;
const num = (name, fallback) => (env[name] ? Number(env[name]) : fallback);
const opts = parseArgs(process.argv.slice(2));
const group = env.MEETSTREAM_WORKER_GROUP || "node-greeter";
const instance = env.MEETSTREAM_WORKER_INSTANCE || `${os.hostname()}-${process.pid}`;
const leaseTtlS = num("MEETSTREAM_LEASE_TTL_S", 5);

function log(msg, extra = {}) {
  process.stderr.write(JSON.stringify({ ts: Date.now() / 1000, msg, instance, ...extra }) + "\n");
}

let redis = null; // opened in main(): a single Redis or a Cluster (MEETSTREAM_REDIS_CLUSTER)
let workerGroup = null;
const metrics = new WorkerMetrics(group); // served before Redis is reached
let reported = 0;

async function postCounts(bot) {
  const s = bot.state;
  const text = `I have heard ${s.frames} audio frames from ${s.speakers.size} speaker(s).`;
  const payload = encode({ command: "sendchat", role: "assistant", text, is_final: true });
  await bot.send("msgpack", Buffer.from(payload.buffer, payload.byteOffset, payload.byteLength));
  s.postedFrames = s.frames;
}

const groupOptions = {
  metrics,
  prefix: env.MEETSTREAM_KEY_PREFIX || "meetstream",
  group,
  instance,
  leaseTtlS,
  leaseRenewS: num("MEETSTREAM_LEASE_RENEW_S", leaseTtlS / 5),
  claimIntervalS: num("MEETSTREAM_CLAIM_INTERVAL_S", 0.5),
  conformance: ["1", "true", "yes", "on"].includes(String(env.MEETSTREAM_CONFORMANCE || "").toLowerCase()),
  botName: env.MEETSTREAM_BOT_NAME || null,
  lagSampleS: opts.lagSampleS,
  readCount: opts.readCount,
  log,
  handlers: {
    onStart(bot) {
      bot.state = { frames: 0, speakers: new Set(), greeted: false, postedFrames: -1 };
    },
    async onEvent(bot, event) {
      // Greet once per owner; a takeover does not greet again a bot that was ready before.
      if (event.type === "ready" && !bot.state.greeted && !bot.takenOver) {
        bot.state.greeted = true;
        await bot.send("json", JSON.stringify({ command: "sendmsg", message: opts.greeting }));
        log("greeted", { bot_id: bot.id });
      }
    },
    async onAudio(bot, frame) {
      if (opts.audioDelayMs) await new Promise((resolve) => setTimeout(resolve, opts.audioDelayMs));
      bot.state.frames += 1;
      bot.state.speakers.add(frame.speakerName);
    },
    onStop(bot, reason) {
      if (reason !== "session_ended") return;
      const line = { bot_id: bot.id, frames: bot.state.frames, speakers: [...bot.state.speakers].sort() };
      process.stdout.write(JSON.stringify(line) + "\n");
      reported += 1;
      if (opts.maxBots && reported >= opts.maxBots) setImmediate(stop);
    },
  },
};

const timer = setInterval(() => {
  for (const runner of workerGroup ? workerGroup.runners.values() : []) {
    const bot = runner.bot;
    if (bot.ready && bot.state.frames !== bot.state.postedFrames) {
      postCounts(bot).catch((e) => log("post failed", { bot_id: bot.id, error: String(e) }));
    }
  }
}, opts.reportEveryS * 1000);

let stopping = null;
function stop() {
  if (stopping) return stopping;
  clearInterval(timer);
  // Before the group started there is nothing to hand back.
  stopping = (workerGroup ? workerGroup.stop() : Promise.resolve())
    .catch((e) => log("stop failed", { error: String(e) }))
    .finally(() => {
      if (redis) redis.disconnect();
      if (server) server.close();
      process.exit(0);
    });
  return stopping;
}

// /metrics, /healthz and /readyz on MEETSTREAM_WORKER_METRICS_PORT, before Redis is
// reached (as the SDK does): the liveness probe answers from this event loop, so a loop
// blocked for good fails it.
let server = null;
function serveMetrics(port, host) {
  const registry = metrics.registry;
  server = http.createServer((req, res) => {
    const path = (req.url || "").split("?", 1)[0];
    if (req.method !== "GET" && req.method !== "HEAD") {
      res.writeHead(405).end();
    } else if (path === "/metrics") {
      registry.metrics().then(
        (text) => res.writeHead(200, { "Content-Type": registry.contentType }).end(text),
        (e) => res.writeHead(500).end(String(e)),
      );
    } else if (path === "/healthz") {
      res.writeHead(200, { "Content-Type": "text/plain" }).end("ok\n");
    } else if (path === "/readyz") {
      const ok = !stopping;
      res.writeHead(ok ? 200 : 503, { "Content-Type": "text/plain" }).end(ok ? "ready\n" : "stopping\n");
    } else {
      res.writeHead(404).end();
    }
  });
  return new Promise((resolve, reject) => {
    server.once("error", reject);
    server.listen(port, host, () => resolve(server.address().port));
  });
}

process.on("SIGTERM", stop);
process.on("SIGINT", stop);

async function main() {
  const port = num("MEETSTREAM_WORKER_METRICS_PORT", 0);
  const metricsPort = port ? await serveMetrics(port, env.MEETSTREAM_WORKER_METRICS_HOST || "0.0.0.0") : null;
  if (metricsPort) log("metrics served", { port: metricsPort });
  const opened = await openRedis(env.MEETSTREAM_REDIS_URL || "redis://127.0.0.1:6379/0", {
    cluster: (env.MEETSTREAM_REDIS_CLUSTER || "auto").toLowerCase(),
    onError: (e) => log("redis error", { error: String(e) }),
  });
  redis = opened.redis;
  log("redis connected", { cluster: opened.isCluster });
  if (stopping) return; // SIGTERM while connecting
  workerGroup = new WorkerGroup({ ...groupOptions, redis });
  await workerGroup.start();
  process.stdout.write(JSON.stringify({ ready: true, group, consumer: instance, metrics_port: metricsPort }) + "\n");
}

main().catch((e) => {
  log("worker failed", { error: String(e) });
  process.exit(1);
});
