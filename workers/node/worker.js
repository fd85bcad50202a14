#!/usr/bin/env node
// A Meetstream worker in Node.js, written from docs/PROTOCOL.md alone.
//
// It discovers bots on the global lifecycle stream (with a consumer group, as
// the document suggests), greets each bot in the chat when it is ready, counts
// the audio frames and speakers on the bot's audio stream, posts the counts in
// the chat as a MessagePack `sendchat`, and prints one JSON report line per
// bot when its session ends.
//
//   MEETSTREAM_REDIS_URL=redis://127.0.0.1:6379/0 node worker.js [--max-bots N]
//       [--report-every-s S] [--greeting TEXT]
//
// Env: MEETSTREAM_REDIS_URL, MEETSTREAM_KEY_PREFIX (default meetstream),
// MEETSTREAM_WORKER_GROUP (default node-greeter).
"use strict";

const os = require("node:os");
const Redis = require("ioredis");
const { encode } = require("@msgpack/msgpack");

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

const opts = parseArgs(process.argv.slice(2));
const url = process.env.MEETSTREAM_REDIS_URL || "redis://127.0.0.1:6379/0";
const prefix = process.env.MEETSTREAM_KEY_PREFIX || "meetstream";
const group = process.env.MEETSTREAM_WORKER_GROUP || "node-greeter";
const consumer = `${os.hostname()}-${process.pid}`;
const globalKey = `${prefix}:events`;
const BLOCK_MS = 1000;

const redis = new Redis(url); // commands (non-blocking)
const bots = new Map(); // bot_id -> state
let reported = 0;
let stopping = false;

function log(msg, extra = {}) {
  process.stderr.write(JSON.stringify({ ts: Date.now() / 1000, msg, ...extra }) + "\n");
}

// Stream entries come as [id, [field, value, ...]]; make a map of strings
// (or of Buffers, for audio, where `pcm` is raw bytes).
function fieldMap(flat, asBuffer = false) {
  const out = {};
  for (let i = 0; i < flat.length; i += 2) out[flat[i].toString()] = asBuffer ? flat[i + 1] : flat[i + 1].toString();
  return out;
}

async function command(bot, field, value) {
  // XADD ... MAXLEN ~ 1000: the document asks workers to cap their command streams.
  await redis.xadd(bot.commandsKey, "MAXLEN", "~", "1000", "*", field, value);
}

async function greet(bot) {
  await command(bot, "json", JSON.stringify({ command: "sendmsg", message: opts.greeting }));
  log("greeted", { bot_id: bot.id });
}

async function postCounts(bot) {
  const text = `I have heard ${bot.frames} audio frames from ${bot.speakers.size} speaker(s).`;
  const payload = encode({ command: "sendchat", role: "assistant", text, is_final: true });
  await command(bot, "msgpack", Buffer.from(payload.buffer, payload.byteOffset, payload.byteLength));
  bot.postedFrames = bot.frames;
}

function botState(id, fields) {
  let bot = bots.get(id);
  if (!bot) {
    bot = { id, frames: 0, speakers: new Set(), lastId: "0", ready: false, ended: false, postedFrames: -1 };
    bots.set(id, bot);
  }
  if (fields.commands_key) bot.commandsKey = fields.commands_key;
  if (fields.audio_key) bot.audioKey = fields.audio_key;
  return bot;
}

async function readAudio(bot) {
  // A blocking read needs a connection of its own.
  const conn = redis.duplicate();
  try {
    while (!stopping) {
      const reply = await conn.xreadBuffer("COUNT", 500, "BLOCK", bot.ended ? 1 : BLOCK_MS, "STREAMS", bot.audioKey, bot.lastId);
      if (!reply) {
        if (bot.ended) break; // the session is over and nothing is left to read
        continue;
      }
      for (const [, entries] of reply) {
        for (const [id, flat] of entries) {
          const f = fieldMap(flat, true);
          bot.lastId = id.toString();
          bot.frames += 1;
          bot.speakers.add(f.speaker_name.toString());
        }
      }
    }
  } finally {
    conn.disconnect();
  }
}

async function report(bot) {
  await bot.audioDone;
  const line = { bot_id: bot.id, frames: bot.frames, speakers: [...bot.speakers].sort() };
  process.stdout.write(JSON.stringify(line) + "\n");
  bots.delete(bot.id);
  reported += 1;
  if (opts.maxBots && reported >= opts.maxBots) stop();
}

async function onLifecycle(f) {
  const bot = botState(f.bot_id, f);
  switch (f.type) {
    case "connected":
      bot.ended = false;
      if (bot.audioKey && !bot.audioDone) bot.audioDone = readAudio(bot).catch((e) => log("audio read failed", { bot_id: bot.id, error: String(e) }));
      break;
    case "ready":
      if (!bot.ready && bot.commandsKey) {
        bot.ready = true;
        await greet(bot);
      }
      break;
    case "session_ended":
      bot.ended = true;
      report(bot).catch((e) => log("report failed", { error: String(e) }));
      break;
    default:
      break;
  }
}

async function discover() {
  const conn = redis.duplicate();
  try {
    await conn.xgroup("CREATE", globalKey, group, "$", "MKSTREAM");
  } catch (e) {
    if (!String(e).includes("BUSYGROUP")) throw e;
  }
  process.stdout.write(JSON.stringify({ ready: true, group, consumer }) + "\n");
  while (!stopping) {
    const reply = await conn.xreadgroup("GROUP", group, consumer, "COUNT", 100, "BLOCK", BLOCK_MS, "STREAMS", globalKey, ">");
    if (!reply) continue;
    for (const [, entries] of reply) {
      const ids = [];
      for (const [id, flat] of entries) {
        await onLifecycle(fieldMap(flat));
        ids.push(id);
      }
      await conn.xack(globalKey, group, ...ids);
    }
  }
  conn.disconnect();
}

let timer = null;
function stop() {
  if (stopping) return;
  stopping = true;
  clearInterval(timer);
  setTimeout(() => {
    redis.disconnect();
    process.exit(0);
  }, BLOCK_MS + 200).unref();
}

process.on("SIGTERM", stop);
process.on("SIGINT", stop);

timer = setInterval(() => {
  for (const bot of bots.values()) {
    if (bot.ready && !bot.ended && bot.frames !== bot.postedFrames) {
      postCounts(bot).catch((e) => log("post failed", { bot_id: bot.id, error: String(e) }));
    }
  }
}, opts.reportEveryS * 1000);

discover().catch((e) => {
  log("worker failed", { error: String(e) });
  process.exit(1);
});
