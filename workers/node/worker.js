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
//       [--report-every-s S] [--greeting TEXT]
//
// Env: MEETSTREAM_REDIS_URL, MEETSTREAM_KEY_PREFIX (default meetstream),
// MEETSTREAM_WORKER_GROUP (default node-greeter), MEETSTREAM_WORKER_INSTANCE
// (default host-pid), MEETSTREAM_LEASE_TTL_S (5), MEETSTREAM_LEASE_RENEW_S
// (a fifth of the TTL), MEETSTREAM_CLAIM_INTERVAL_S (0.5), MEETSTREAM_CONFORMANCE
// (1: the conformance kit's records and pongs, docs/WORKERS.md).
"use strict";

const os = require("node:os");
const Redis = require("ioredis");
const { encode } = require("@msgpack/msgpack");
const { WorkerGroup } = require("./group");

function parseArgs(argv) {
  const opts = { maxBots: 0, reportEveryS: 5, greeting: "Hello from a Node.js worker!" };
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i];
    if (a === "--max-bots") opts.maxBots = Number(argv[++i]);
    else if (a === "--report-every-s") opts.reportEveryS = Number(argv[++i]);
    else if (a === "--greeting") opts.greeting = argv[++i];
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

const redis = new Redis(env.MEETSTREAM_REDIS_URL || "redis://127.0.0.1:6379/0");
redis.on("error", (e) => log("redis error", { error: String(e) }));
let reported = 0;

async function postCounts(bot) {
  const s = bot.state;
  const text = `I have heard ${s.frames} audio frames from ${s.speakers.size} speaker(s).`;
  const payload = encode({ command: "sendchat", role: "assistant", text, is_final: true });
  await bot.send("msgpack", Buffer.from(payload.buffer, payload.byteOffset, payload.byteLength));
  s.postedFrames = s.frames;
}

const workerGroup = new WorkerGroup({
  redis,
  prefix: env.MEETSTREAM_KEY_PREFIX || "meetstream",
  group,
  instance,
  leaseTtlS,
  leaseRenewS: num("MEETSTREAM_LEASE_RENEW_S", leaseTtlS / 5),
  claimIntervalS: num("MEETSTREAM_CLAIM_INTERVAL_S", 0.5),
  conformance: ["1", "true", "yes", "on"].includes(String(env.MEETSTREAM_CONFORMANCE || "").toLowerCase()),
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
    onAudio(bot, frame) {
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
});

const timer = setInterval(() => {
  for (const runner of workerGroup.runners.values()) {
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
  stopping = workerGroup
    .stop()
    .catch((e) => log("stop failed", { error: String(e) }))
    .finally(() => {
      redis.disconnect();
      process.exit(0);
    });
  return stopping;
}

process.on("SIGTERM", stop);
process.on("SIGINT", stop);

workerGroup
  .start()
  .then(() => process.stdout.write(JSON.stringify({ ready: true, group, consumer: instance }) + "\n"))
  .catch((e) => {
    log("worker failed", { error: String(e) });
    process.exit(1);
  });
