"""Benchmark: interrupt latency and pacing while many bots play audio.

Runs, on 127.0.0.1 only: an embedded redis-server, the gateway as its own
process (``python -m gateway.cli run``), and in this process N simulated bots
plus one worker. Each bot plays ``--rounds`` utterances of 10 s at 16 kHz;
1.5 to 4 s into each, the worker XADDs an ``interrupt``. Measured:

- interrupt latency: worker's clock before XADD -> the bot's clock on receipt
  (the same process, so the same monotonic clock), p50/p99/max;
- audio after the interrupt: chunks the bot received after it (should be 0),
  and what a Zoom/Teams bot (which ignores interrupt) still plays (<= lead);
- pacing: gaps between chunks inside an utterance at the bot, the bot's queue
  depth at each arrival, and the gateway's own chunk lateness histogram.

    .venv/bin/python bench/interrupt_latency.py --bots 50,100,200

Bounded: about (rounds x 5 s + connect) per bot count; nothing listens beyond loopback.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import random
import re
import sys
import time
import urllib.request

import msgpack
import numpy as np
import redis.asyncio as aioredis

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from gateway.embedded_redis import RedisServer
from gateway.keys import KeySpace
from gateway.testing.bot import PlaybackModel, SimulatedBot
from gateway.testing.process import GatewayProcess

RATE_IN = 16_000
UTTERANCE_S = 10.0
CHUNK_S = 0.1


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def scrape(url: str) -> dict[str, float]:
    text = urllib.request.urlopen(url, timeout=5).read().decode()
    out = {}
    for line in text.splitlines():
        m = re.match(r"^(meetstream_gateway_playback_\S+|meetstream_gateway_chat\S+)\s+(\S+)$", line)
        if m:
            out[m.group(1)] = float(m.group(2))
    return out


async def run_bot(
    bot: SimulatedBot, client: aioredis.Redis, commands_key: str, rounds: int, pcm: bytes, rng: random.Random
) -> list[dict[str, float]]:
    """One bot's rounds: play, interrupt after a random 1.5-4 s, wait, again."""
    results = []
    model = bot.playback
    heard = asyncio.Event()
    bot.on_command = lambda _item: heard.set()

    async def until(check) -> None:  # type: ignore[no-untyped-def]
        while not check():
            heard.clear()
            await heard.wait()

    for r in range(rounds):
        first = len(model.chunks)
        fields = {"command": "sendaudio", "audiochunk": pcm, "sample_rate": RATE_IN, "utterance_id": f"r{r}"}
        await client.xadd(commands_key, {"msgpack": msgpack.packb(fields)})
        await until(lambda first=first: len(model.chunks) > first)
        started = model.chunks[first].arrived
        await asyncio.sleep(max(0.0, started + rng.uniform(1.5, 4.0) - time.monotonic()))
        n_interrupts = len(model.interrupts)
        written = time.monotonic()
        await client.xadd(commands_key, {"json": '{"command":"interrupt","action":"clear_audio_queue"}'})
        await until(lambda n=n_interrupts: len(model.interrupts) > n)
        arrived = model.interrupts[-1]
        await asyncio.sleep(0.6)  # audio that was still coming would have come
        chunks = model.chunks[first:]
        during = [c for c in chunks if c.arrived <= arrived]
        after = [c for c in chunks if c.arrived > arrived]
        gaps = [max(0.0, b.start - a.end) for a, b in itertools.pairwise(during)]
        # Just before each chunk lands (after the lead has filled): the bot's reserve.
        queued = [model.queued_s(c.arrived - 1e-9) for c in during[3:]]
        results.append(
            {
                "latency_s": arrived - written,
                "chunks_after": len(after),
                "heard_after_s": model.heard_after_s(arrived),
                "max_gap_s": max(gaps, default=0.0),
                "min_queued_s": min(queued, default=float("nan")),
                "max_queued_s": max((model.queued_s(c.arrived) for c in during[3:]), default=float("nan")),
                "intervals": [b.arrived - a.arrived for a, b in itertools.pairwise(during[3:])],
            }
        )
        # Let the Zoom-model queue drain so rounds do not overlap.
        await asyncio.sleep(max(0.0, model.queue_end - time.monotonic()))
    return results


async def bench(n_bots: int, rounds: int, gw_url: str, redis_url: str, metrics_url: str, pid: int) -> dict:
    keyspace = KeySpace("meetstream", 16)
    client = aioredis.Redis.from_url(redis_url, max_connections=n_bots + 16)
    t = np.arange(int(RATE_IN * UTTERANCE_S)) / RATE_IN
    pcm = (np.sin(2 * np.pi * 220 * t) * 0.3 * 32767).astype("<i2").tobytes()
    bots = [
        SimulatedBot(
            gw_url,
            f"bench-{n_bots}-{i}",
            record_sent=False,
            playback=PlaybackModel(honours_interrupt=False, keep_samples=False),
        )
        for i in range(n_bots)
    ]
    for bot in bots:
        await bot.connect_control()
    await asyncio.sleep(1.0)
    before = scrape(metrics_url)
    cpu0, wall0 = cpu_s(pid), time.monotonic()
    rng = random.Random(n_bots)
    per_bot = await asyncio.gather(
        *(
            run_bot(b, client, keyspace.bot(b.bot_id).commands, rounds, pcm, random.Random(rng.random()))
            for b in bots
        )
    )
    cpu1, wall1 = cpu_s(pid), time.monotonic()
    after = scrape(metrics_url)
    for bot in bots:
        await bot.close()
    await client.aclose()
    rows = [r for results in per_bot for r in results]
    lat = [r["latency_s"] * 1000 for r in rows]
    intervals = [i * 1000 for r in rows for i in r["intervals"]]
    late_n = after.get("meetstream_gateway_playback_chunk_lateness_seconds_count", 0) - before.get(
        "meetstream_gateway_playback_chunk_lateness_seconds_count", 0
    )
    late_sum = after.get("meetstream_gateway_playback_chunk_lateness_seconds_sum", 0) - before.get(
        "meetstream_gateway_playback_chunk_lateness_seconds_sum", 0
    )
    late_over = {}
    for le in ("0.01", "0.05", "0.1"):
        key = f'meetstream_gateway_playback_chunk_lateness_seconds_bucket{{le="{le}"}}'
        within = after.get(key, 0) - before.get(key, 0)
        late_over[le] = (late_n - within) / late_n if late_n else float("nan")
    return {
        "bots": n_bots,
        "interrupts": len(rows),
        "latency_ms_p50": pct(lat, 50),
        "latency_ms_p99": pct(lat, 99),
        "latency_ms_max": max(lat),
        "chunks_after_interrupt_total": sum(r["chunks_after"] for r in rows),
        "zoom_heard_after_ms_p50": pct([r["heard_after_s"] * 1000 for r in rows], 50),
        "zoom_heard_after_ms_max": max(r["heard_after_s"] for r in rows) * 1000,
        "gap_ms_max": max(r["max_gap_s"] for r in rows) * 1000,
        "gaps_over_0ms": sum(r["max_gap_s"] > 0.0005 for r in rows),
        "bot_queue_before_chunk_ms_min": min(r["min_queued_s"] for r in rows) * 1000,
        "bot_queue_after_chunk_ms_max": max(r["max_queued_s"] for r in rows) * 1000,
        "chunk_interval_ms_p50": pct(intervals, 50),
        "chunk_interval_ms_p1": pct(intervals, 1),
        "chunk_interval_ms_p99": pct(intervals, 99),
        "gateway_lateness_ms_mean": late_sum / late_n * 1000 if late_n else float("nan"),
        "gateway_lateness_share_over_10ms": late_over["0.01"],
        "gateway_lateness_share_over_50ms": late_over["0.05"],
        "gateway_lateness_share_over_100ms": late_over["0.1"],
        "gateway_underruns": after.get("meetstream_gateway_playback_underruns_total", 0)
        - before.get("meetstream_gateway_playback_underruns_total", 0),
        "gateway_cpu_share": (cpu1 - cpu0) / (wall1 - wall0),
        "wall_s": wall1 - wall0,
    }


def main(args: argparse.Namespace) -> None:
    """Start Redis and the gateway process, run each bot count, stop both."""
    redis_server = RedisServer().start()
    gw = GatewayProcess(
        redis_server.url, "--command-block-ms", "1000", "--playback-lead-ms", str(args.lead_ms)
    )
    try:
        gw.start()
        metrics_url = f"http://127.0.0.1:{gw.metrics_port}/metrics"
        for n in args.bots:
            result = asyncio.run(bench(n, args.rounds, gw.url, redis_server.url, metrics_url, gw.proc.pid))
            shown = {k: round(v, 3) if isinstance(v, float) else v for k, v in result.items()}
            print(json.dumps(shown), flush=True)
    finally:
        gw.stop()
        redis_server.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bots", default="50,100,200", type=lambda s: [int(x) for x in s.split(",")])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--lead-ms", type=int, default=300)
    main(parser.parse_args())
