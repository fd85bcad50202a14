"""Hostile and buggy neighbours beside well-behaved bots, on one real gateway process.

1. Three well-behaved bots stream two speakers of 20 ms frames in real time and
   receive a command every 200 ms, for six seconds.
2. Meanwhile: a ping flood, a flood of tiny frames, a reconnect storm, oversized
   text before and after the handshake, poison command entries written for a
   connected bot, and large commands for a bot that never reads.
3. The well-behaved bots lose nothing (every frame stored, in order; every
   command delivered, in order), ``/healthz`` answers throughout, the gateway's
   memory stays within what its budgets allow, and every attack was counted.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
import urllib.request

import msgpack
import redis.asyncio as aioredis
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidState, InvalidStatus

from gateway.keys import KeySpace
from gateway.testing.bot import SimulatedBot, Speaker
from gateway.testing.process import GatewayProcess
from tests.faults.conftest import report

MIB = 1 << 20
SECONDS = 6.0
BUDGETS = {
    "--max-frames-per-s": "250",
    "--rate-burst-s": "2",
    "--bot-connects-per-min": "30",
    "--audio-text-max-bytes": str(64 << 10),
    "--publish-buffer-bytes": str(16 * MIB),
    "--publish-control-buffer-bytes": str(8 * MIB),
    "--outbox-max-bytes": str(2 * MIB),
    "--commands-max-held-bytes": str(8 * MIB),
    "--ws-write-buffer-max-bytes": str(1 * MIB),
    # A read takes up to this many entries of a stream before any bound is checked:
    # with 1 MB commands, 8 MB a read (docs/SECURITY.md, "what a read holds").
    "--command-read-count": "8",
}
#: What the budgets above allow the process to hold beyond its idle size, with room for
#: the interpreter's own churn: publish 16 + control 8 + commands 8 + a read's entries
#: (8 x 1 MB, held as the reply, the decoded JSON and the text to send).
MEMORY_ALLOWANCE = 120 * MIB


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


class Watch(threading.Thread):
    """Samples the gateway's memory and its /healthz every 100 ms, off the event loop."""

    def __init__(self, gw: GatewayProcess) -> None:
        super().__init__(daemon=True)
        self.gw, self.stop_at = gw, time.monotonic() + 60
        self.peak_rss, self.health_failures, self.health_max_s = 0, 0, 0.0
        self.done = threading.Event()

    def run(self) -> None:
        assert self.gw.proc is not None
        while not self.done.is_set() and time.monotonic() < self.stop_at:
            self.peak_rss = max(self.peak_rss, rss_bytes(self.gw.proc.pid))
            started = time.monotonic()
            try:
                url = f"http://127.0.0.1:{self.gw.metrics_port}/healthz"
                with urllib.request.urlopen(url, timeout=5) as reply:
                    ok = reply.status == 200
            except OSError:
                ok = False
            self.health_max_s = max(self.health_max_s, time.monotonic() - started)
            self.health_failures += not ok
            self.done.wait(0.1)


async def good_bot(url: str, bot_id: str, redis: aioredis.Redis, keys: KeySpace) -> dict[str, int]:
    bot = SimulatedBot(url, bot_id, record_sent=False)
    await bot.connect()
    commands = keys.bot(bot_id).commands

    async def write_commands() -> int:
        n = 0
        started = time.monotonic()
        while time.monotonic() - started < SECONDS:
            await redis.xadd(
                commands, {"json": json.dumps({"command": "sendmsg", "message": f"{bot_id}:{n}"})}
            )
            n += 1
            await asyncio.sleep(0.2)
        return n

    speakers = [Speaker("s1", "Ada", 220.0), Speaker("s2", "Bo", 330.0)]
    sent, written = await asyncio.gather(bot.stream_speech(speakers, SECONDS, frame_ms=20), write_commands())
    await bot.wait_commands(written, timeout=10)
    got = [c["message"] for c in bot.commands("sendmsg")]
    await bot.close()
    assert got == [f"{bot_id}:{n}" for n in range(written)], f"{bot_id}: commands out of order or lost"
    return {"frames_sent": sent, "commands": written}


async def ping_flood(url: str) -> int | None:
    async with connect(f"{url}/evil_ping/control") as ws:
        await ws.send(json.dumps({"type": "ready", "bot_id": "evil_ping"}))
        with contextlib.suppress(ConnectionClosed):
            for _ in range(20_000):
                await ws.ping()
        with contextlib.suppress(ConnectionClosed):
            await asyncio.wait_for(ws.wait_closed(), 10)
        return ws.close_code


async def tiny_frames(url: str) -> int | None:
    async with connect(f"{url}/evil_tiny/audio") as ws:
        with contextlib.suppress(ConnectionClosed, InvalidState):
            for _ in range(200):  # 7-byte frames, as fast as the socket takes them
                for _ in range(100):
                    ws.protocol.send_binary(b"\x01" * 7)
                ws.send_data()
                await asyncio.sleep(0)
        with contextlib.suppress(ConnectionClosed):
            await asyncio.wait_for(ws.wait_closed(), 10)
        return ws.close_code


async def reconnect_storm(url: str) -> dict[int, int]:
    statuses: dict[int, int] = {}
    started = time.monotonic()
    while time.monotonic() - started < SECONDS - 1:
        try:
            async with connect(f"{url}/evil_storm/control") as ws:
                await ws.send(json.dumps({"type": "ready", "bot_id": "evil_storm"}))
            statuses[101] = statuses.get(101, 0) + 1
        except InvalidStatus as exc:
            statuses[exc.response.status_code] = statuses.get(exc.response.status_code, 0) + 1
        await asyncio.sleep(0.02)
    return statuses


async def oversized_text(url: str) -> None:
    big = json.dumps({"type": "note", "padding": "x" * (128 << 10)})
    with contextlib.suppress(ConnectionClosed):
        async with connect(f"{url}/evil_text/control", max_size=None) as ws:
            for _ in range(20):  # before ready: dropped (too_large), never published
                await ws.send(big)
            await ws.send(json.dumps({"type": "ready", "bot_id": "evil_text"}))
            for _ in range(20):
                await ws.send(big)
            await asyncio.sleep(0.5)


async def poisoned(url: str, redis: aioredis.Redis, keys: KeySpace) -> int:
    bot = SimulatedBot(url, "evil_poison")
    await bot.connect_control()
    stream = keys.bot("evil_poison").commands
    poison = [
        {b"\xff": b"x"},
        {"json": "[" * 100_000 + "]" * 100_000},
        {"msgpack": msgpack.packb({b"command": "sendmsg"})},
        {"json": '{"command":"sendmsg","message":"\\ud83d"}'},
        {"json": '{"command":"sendaudio","audiochunk":"AAAA","sample_rate":16000,"utterance_id":"\\ud83d"}'},
    ]
    for fields in poison * 4:
        await redis.xadd(stream, fields)
    await redis.xadd(stream, {"json": json.dumps({"command": "sendmsg", "message": "still here"})})
    command = await bot.next_command(timeout=10)
    await bot.close()
    assert command["message"] == "still here"
    return len(poison) * 4


async def never_reads(url: str, redis: aioredis.Redis, keys: KeySpace) -> None:
    async with connect(f"{url}/evil_sink/control", max_size=None) as ws:
        await ws.send(json.dumps({"type": "ready", "bot_id": "evil_sink"}))
        stream = keys.bot("evil_sink").commands
        for n in range(40):
            await redis.xadd(
                stream, {"json": json.dumps({"command": "sendmsg", "message": f"{n}" * 1_000_000})}
            )
        await asyncio.sleep(SECONDS - 2)


async def test_hostile_neighbours_cost_the_others_nothing(redis_url):
    keys = KeySpace("meetstream", 16)
    redis = aioredis.Redis.from_url(redis_url)
    gw = GatewayProcess(redis_url, *[x for kv in BUDGETS.items() for x in kv]).start()
    watch = Watch(gw)
    try:
        await asyncio.sleep(0.5)
        assert gw.proc is not None
        idle_rss = rss_bytes(gw.proc.pid)
        watch.start()
        good = [good_bot(gw.url, f"good{i}", redis, keys) for i in range(3)]
        results = await asyncio.gather(
            *good,
            ping_flood(gw.url),
            tiny_frames(gw.url),
            reconnect_storm(gw.url),
            oversized_text(gw.url),
            poisoned(gw.url, redis, keys),
            never_reads(gw.url, redis, keys),
        )
        watch.done.set()
        watch.join(10)
        good_results, (ping_code, tiny_code, storm, _, poison_n, _) = results[:3], results[3:]
        # The well-behaved bots lost nothing: every frame stored, seq without a gap.
        for i, figures in enumerate(good_results):
            entries = await redis.xrange(keys.bot(f"good{i}").audio)
            seqs = [int(f[b"seq"]) for _, f in entries]
            assert seqs == list(range(figures["frames_sent"])), f"good{i}: frames lost or reordered"
        dropped = {
            reason: gw.sample("meetstream_gateway_frames_dropped_total", reason=reason)
            for reason in ("rate_limited", "bot_budget", "too_large", "overload", "buffer_full")
        }
        refused = gw.sample("meetstream_gateway_connections_refused_total", reason="reconnect_rate")
        rejected = sum(
            v
            for (name, labels), v in gw.metrics().items()
            if name == "meetstream_gateway_commands_rejected_total"
        )
        report(
            "hostile neighbours",
            good=good_results,
            ping_close=ping_code,
            tiny_close=tiny_code,
            storm=storm,
            dropped=dropped,
            rejected=rejected,
            idle_rss_mib=round(idle_rss / MIB, 1),
            peak_rss_mib=round(watch.peak_rss / MIB, 1),
            healthz_max_s=round(watch.health_max_s, 3),
        )
        assert ping_code == 1008 and tiny_code == 1008
        assert storm.get(429, 0) > 0 and refused == storm[429]
        assert dropped["too_large"] >= 10 and dropped["overload"] == 0 and dropped["buffer_full"] == 0
        assert rejected >= poison_n
        assert watch.health_failures == 0
        assert watch.peak_rss - idle_rss <= MEMORY_ALLOWANCE
        assert gw.proc.poll() is None  # never restarted, never crashed
    finally:
        watch.done.set()
        gw.stop()
        await redis.aclose()
