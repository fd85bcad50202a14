"""A worker writing commands at a set rate, and a tap timing audio on its way into Redis.

Commands: ``sendmsg`` whose ``message`` is ``time.time_ns()`` taken just before the XADD, written
round-robin over the bots' command streams (``json`` field, ``MAXLEN ~ 1000``, as PROTOCOL.md asks
of workers); the bots time the receipt, so latency is worker XADD -> bot receipt.

Tap: a blocking XREAD on the audio streams of a few bots, from ``$``: each frame's stamp (see
:mod:`bench.loadgen`) gives bot send -> readable in Redis; counter gaps are frames lost on the way.
Runs in its own process, on the same clock as the generators.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import multiprocessing as mp
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from redis.asyncio import Redis

from bench.loadgen import read_stamp
from gateway.keys import KeySpace


@dataclass
class CommanderSpec:
    redis_url: str
    bot_ids: list[str]
    rate_per_s: float = 100.0
    window_start_s: float = 2.0  # commands are written in the window only
    window_end_s: float = 10.0
    tap_bots: int = 8
    duration_s: float = 10.0
    tick_s: float = 0.005
    key_prefix: str = "meetstream"


@dataclass
class CommanderResult:
    commands_written: int = 0
    write_errors: int = 0
    tap_entries: int = 0
    tap_latency_ms: list[float] = field(default_factory=list)
    tap_gaps: int = 0
    tap_errors: int = 0
    error: str = ""


async def _write_commands(spec: CommanderSpec, start: float, res: CommanderResult) -> None:
    if spec.rate_per_s <= 0 or not spec.bot_ids:
        return
    keyspace = KeySpace(spec.key_prefix)
    keys = [keyspace.bot(b).commands for b in spec.bot_ids]
    t0, t1 = start + spec.window_start_s, start + spec.window_end_s
    r = Redis.from_url(spec.redis_url)
    try:
        await asyncio.sleep(max(0.0, t0 - time.time()))
        i = 0
        max_ticks = int((t1 - t0) / spec.tick_s) + 10
        for _ in range(max_ticks):
            now = time.time()
            if now >= t1:
                break
            due = int((now - t0) * spec.rate_per_s) - res.commands_written
            if due > 0:
                pipe = r.pipeline(transaction=False)
                stamp = str(time.time_ns())
                body = json.dumps({"command": "sendmsg", "message": stamp})
                for _ in range(due):
                    pipe.xadd(keys[i % len(keys)], {"json": body}, maxlen=1000, approximate=True)
                    i += 1
                try:
                    await pipe.execute()
                    res.commands_written += due
                except Exception:
                    res.write_errors += due
                    res.commands_written += due  # counted as attempted, to keep the rate
            await asyncio.sleep(spec.tick_s)
    finally:
        await r.aclose()


async def _tap(spec: CommanderSpec, start: float, res: CommanderResult) -> None:
    if spec.tap_bots <= 0 or not spec.bot_ids:
        return
    keyspace = KeySpace(spec.key_prefix)
    step = max(1, len(spec.bot_ids) // spec.tap_bots)
    streams = {keyspace.bot(b).audio: "$" for b in spec.bot_ids[::step][: spec.tap_bots]}
    last: dict[str, int] = {}
    t0, t1 = start + spec.window_start_s, start + spec.window_end_s
    r = Redis.from_url(spec.redis_url, socket_timeout=10)
    try:
        await asyncio.sleep(max(0.0, t0 - time.time()))
        # Read from now on: entries ids first, so a later read continues where this one stopped.
        for key in streams:
            info = await r.xinfo_stream(key) if await r.exists(key) else None
            streams[key] = info["last-generated-id"] if info else "0-0"
        for _ in range(1_000_000):
            if time.time() >= t1:
                break
            try:
                reply = await r.xread(streams, count=200, block=200)
            except Exception:
                res.tap_errors += 1
                await asyncio.sleep(0.05)
                continue
            now = time.time_ns()
            for key, entries in reply or []:
                k = key.decode()
                for entry_id, fields in entries:
                    streams[k] = entry_id
                    pcm = fields.get(b"pcm")
                    if pcm is None or len(pcm) < 12:
                        continue
                    sent_ns, counter = read_stamp(pcm)
                    res.tap_entries += 1
                    res.tap_latency_ms.append((now - sent_ns) / 1e6)
                    prev = last.get(k)
                    if prev is not None and counter > prev + 1:
                        res.tap_gaps += counter - prev - 1
                    last[k] = counter
    finally:
        await r.aclose()


async def run_commander(spec: CommanderSpec, start: float) -> CommanderResult:
    res = CommanderResult()
    try:
        async with asyncio.timeout(spec.duration_s + 30):
            await asyncio.gather(_write_commands(spec, start, res), _tap(spec, start, res))
    except Exception as exc:
        res.error = repr(exc)[:500]
    return res


def _child(spec: CommanderSpec, out: Any, go: Any, start_at: Any, go_timeout_s: float) -> None:
    try:
        if not go.wait(go_timeout_s):
            raise TimeoutError("no go from the runner")
        res = asyncio.run(run_commander(spec, start_at.value))
    except BaseException as exc:
        res = CommanderResult(error=repr(exc)[:500])
    out.put(asdict(res))


class Commander:
    """:func:`run_commander` in a child process, started by the same go as the generators."""

    def __init__(self, spec: CommanderSpec, go: Any, start_at: Any, go_timeout_s: float = 300) -> None:
        self.ctx = mp.get_context("spawn")
        self.out = self.ctx.Queue()
        self.proc = self.ctx.Process(
            target=_child, args=(spec, self.out, go, start_at, go_timeout_s), daemon=True
        )

    def start(self) -> Commander:
        self.proc.start()
        return self

    def result(self, timeout_s: float) -> dict[str, Any]:
        try:
            return self.out.get(timeout=timeout_s)
        except Exception:
            return asdict(CommanderResult(error="no result from the commander process"))

    def stop(self) -> None:
        self.proc.join(5)
        if self.proc.is_alive():
            self.proc.terminate()
            self.proc.join(5)
        with contextlib.suppress(Exception):
            if self.proc.is_alive():
                self.proc.kill()
                self.proc.join()
