"""The audio hot path in isolation: CPU per frame from the bytes of a bot's socket to Redis.

The phases of ``bench.run`` measure the gateway whole, kernel and event loop included,
and move 10-20% from run to run. To see what a change to the per-frame Python code
buys, this drives one real gateway (in this process, on uvloop, against a real
redis-server) by handing its audio connection's ``data_received`` the bytes a bot
would send, one WebSocket frame per call (as at light load, one read per frame) or
several per call (as under load), in bursts, letting the writer run between bursts.

Reported per frame: the time inside ``data_received`` (split, unmask, decode, rate
check, encode, buffer: the path every frame takes) and the whole process's CPU,
which adds the writer (batching, the write syscall, replies). Every frame is checked
into Redis at the end. Bounded by ``--frames``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import time
from typing import Any

import redis.asyncio as aioredis
from prometheus_client import CollectorRegistry
from websockets.frames import Frame, Opcode

from gateway.app import Gateway
from gateway.embedded_redis import RedisServer, free_port
from gateway.protocol import AudioFrame
from gateway.settings import Settings
from gateway.testing.bot import SimulatedBot, tone
from gateway.ws_fast_path import BotWebSocket

BOT_ID = "hotpath-bot"


def masked_frame(payload: bytes) -> bytes:
    """A final binary frame as a client writes it (masked), by websockets' own serializer."""
    return Frame(Opcode.BINARY, payload).serialize(mask=True)


async def _server_socket(gw: Gateway, timeout_s: float = 10.0) -> BotWebSocket:
    assert gw.bots is not None
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        session = gw.bots.registry.get(BOT_ID)
        if session is not None and session.audio is not None:
            ws = session.audio.ws
            if isinstance(ws, BotWebSocket) and ws.on_binary is not None:
                return ws
        await asyncio.sleep(0.01)
    raise TimeoutError("the bot's audio channel did not come up")


async def measure(
    redis_url: str, frame_ms: int, frames: int, per_read: int, burst: int, speakers: int = 1
) -> dict[str, Any]:
    settings = Settings(
        host="127.0.0.1",
        port=0,
        metrics_host="127.0.0.1",
        metrics_port=free_port(),
        redis_url=redis_url,
        max_frames_per_s=1_000_000,  # the limiters are measured, not tripped
        bot_max_bytes_per_s=1 << 30,
        audio_maxlen=1000,
        log_level="warning",
    )
    gw = Gateway(settings, CollectorRegistry())
    await gw.start()
    bot = SimulatedBot(f"ws://127.0.0.1:{gw.port}", BOT_ID, record_sent=False)
    client = aioredis.Redis.from_url(redis_url)
    await client.delete(gw.keyspace.bot(BOT_ID).audio)  # stored_xlen counts this run only
    try:
        await bot.connect()
        ws = await _server_socket(gw)
        pcm = tone(440, 48 * frame_ms)
        # Speakers take turns frame by frame, as a bot interleaves the people talking.
        turns = [
            masked_frame(AudioFrame(f"spk-{i}", f"Speaker {i}", pcm).serialize()) for i in range(speakers)
        ]
        chunks = [b"".join(turns[(i + j) % speakers] for j in range(per_read)) for i in range(speakers)]
        calls = frames // per_read
        inside: list[float] = []
        await gw.publisher.flush(5)  # type: ignore[union-attr]
        cpu0, wall0 = time.process_time(), time.perf_counter()
        data_received = ws.data_received
        done = 0
        while done < calls:
            n = min(burst // per_read or 1, calls - done)
            t0 = time.perf_counter()
            for i in range(n):
                data_received(chunks[(done + i) % speakers])
            inside.append((time.perf_counter() - t0) / (n * per_read))
            done += n
            await asyncio.sleep(0)  # the writer takes the burst
        assert await gw.publisher.flush(30)  # type: ignore[union-attr]
        cpu_s, wall_s = time.process_time() - cpu0, time.perf_counter() - wall0
        sent = calls * per_read
        stored = await client.xlen(gw.keyspace.bot(BOT_ID).audio)
        published = gw.metrics.registry.get_sample_value(
            "meetstream_gateway_stream_entries_published_total", {"kind": "audio"}
        )
        return {
            "frame_ms": frame_ms,
            "frames_per_read": per_read,
            "speakers": speakers,
            "frames": sent,
            "published": published,
            "stored_xlen": stored,
            "inside_us_per_frame_median": statistics.median(inside) * 1e6,
            "process_cpu_us_per_frame": cpu_s / sent * 1e6,
            "frames_per_s": sent / wall_s,
        }
    finally:
        await client.aclose()
        await bot.close()
        await asyncio.wait_for(gw.stop(), 30)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=100_000)
    parser.add_argument("--burst", type=int, default=100, help="frames between the writer's turns")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--speakers", type=int, default=1, help="speakers taking turns, frame by frame")
    args = parser.parse_args(argv)
    import uvloop

    url = os.environ.get("MEETSTREAM_REDIS_URL")
    server = None if url else RedisServer().start()
    try:
        for frame_ms, per_read in ((20, 1), (20, 10), (100, 1)):
            rows = [
                uvloop.run(
                    measure(url or server.url, frame_ms, args.frames, per_read, args.burst, args.speakers)  # type: ignore[union-attr]
                )
                for _ in range(args.repeat)
            ]
            best = min(rows, key=lambda r: r["process_cpu_us_per_frame"])
            best["runs_process_cpu_us"] = [round(r["process_cpu_us_per_frame"], 2) for r in rows]
            best["runs_inside_us"] = [round(r["inside_us_per_frame_median"], 2) for r in rows]
            print(json.dumps(best))
    finally:
        if server is not None:
            server.stop()


if __name__ == "__main__":
    main()
