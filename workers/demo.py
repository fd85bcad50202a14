"""``python -m workers.demo`` (``./dev demo``): the whole system in one terminal, on 127.0.0.1.

Brings up the gateway on its embedded redis-server, two example worker
processes (greeter and recorder, two recorder instances so one group shares the
bots), and a few simulated bots with two speakers each. Prints what flows
through Redis (bots, speakers, frames, commands), then stops everything by
itself after ``--seconds``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, cast

import redis.asyncio as aioredis
from prometheus_client import CollectorRegistry
from redis.typing import KeyT, StreamIdT

from gateway.app import Gateway
from gateway.embedded_redis import RedisServer, free_port
from gateway.settings import Settings
from gateway.testing.bot import SimulatedBot, Speaker


def _worker(name: str, redis_url: str, *extra: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "workers", name, "--redis-url", redis_url, "--log-level", "warning", *extra],
        stdin=subprocess.DEVNULL,
    )


async def _watch(redis_url: str, until: float) -> dict[str, dict[str, Any]]:
    """Tail the lifecycle stream and every bot's audio and command streams; print as it flows."""
    client = aioredis.Redis.from_url(redis_url)
    seen: dict[str, dict[str, Any]] = defaultdict(
        lambda: {"frames": 0, "speakers": set(), "commands": defaultdict(int)}
    )
    cursors: dict[KeyT, StreamIdT] = {"meetstream:events": "0-0"}
    try:
        while time.monotonic() < until:
            reply = cast(
                "list[tuple[bytes, list[tuple[bytes, dict[bytes, bytes]]]]]",
                await client.xread(cursors, count=500, block=200),
            )
            for stream, entries in reply or ():
                key = stream.decode()
                cursors[key] = entries[-1][0].decode()
                for _, raw in entries:
                    f = {k.decode(): v for k, v in raw.items()}
                    if key == "meetstream:events":
                        bot, kind = f["bot_id"].decode(), f["type"].decode()
                        print(f"  [{bot}] {kind} ({f['channel'].decode()})", flush=True)
                        if kind == "connected":
                            for k in ("audio_key", "commands_key"):
                                cursors.setdefault(f[k].decode(), "0-0")
                    elif key.endswith(":audio"):
                        bot = key.split("{")[1].split("}")[0]
                        s = seen[bot]
                        s["frames"] += 1
                        name = f["speaker_name"].decode()
                        if name not in s["speakers"]:
                            s["speakers"].add(name)
                            print(f"  [{bot}] new speaker {name!r}", flush=True)
                        if s["frames"] % 50 == 0:
                            print(f"  [{bot}] {s['frames']} audio frames", flush=True)
                    else:
                        bot = key.split(":")[-2]
                        body = f.get("json") or b"<msgpack>"
                        cmd = json.loads(body)["command"] if "json" in f else "msgpack"
                        seen[bot]["commands"][cmd] += 1
                        print(
                            f"  [{bot}] command from a worker: {body[:90].decode(errors='replace')}",
                            flush=True,
                        )
    finally:
        await client.aclose()
    return seen


async def _bot(url: str, bot_id: str, seconds: float) -> None:
    speakers = [Speaker("spk-1", "Ada", 220), Speaker("spk-2", "Grace", 330)]
    async with SimulatedBot(url, bot_id, record_sent=False) as bot:
        await bot.stream_speech(speakers, seconds)
        await asyncio.sleep(0.5)


async def _stop_workers(procs: list[subprocess.Popen[bytes]], timeout_s: float = 15.0) -> None:
    """SIGTERM each worker and wait for all of them off the event loop.

    The gateway shares this loop: a blocking ``wait()`` here froze it for as long
    as the workers took to hand their bots back, and its overload watch rightly
    read that as a lagging loop ("overloaded: shedding audio") at every demo's end.
    """

    def wait(p: subprocess.Popen[bytes]) -> None:
        try:
            p.wait(timeout_s)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()

    for p in procs:
        p.terminate()
    await asyncio.gather(*(asyncio.to_thread(wait, p) for p in procs))


async def main_async(args: argparse.Namespace) -> int:
    redis = RedisServer().start()
    out = Path(args.out or tempfile.mkdtemp(prefix="meetstream-demo-"))
    procs: list[subprocess.Popen[bytes]] = []
    gw = Gateway(
        Settings(
            host="127.0.0.1",
            port=0,
            metrics_host="127.0.0.1",
            metrics_port=free_port(),
            redis_url=redis.url,
            log_level="warning",
            log_format="text",
        ),
        CollectorRegistry(),
    )
    try:
        await gw.start()
        url = f"ws://127.0.0.1:{gw.port}"
        print(f"gateway on {url}, redis on {redis.url}; recordings in {out}", flush=True)
        procs = [
            _worker("greeter", redis.url),
            _worker("recorder", redis.url, "--out", str(out)),
            _worker("recorder", redis.url, "--out", str(out)),
        ]
        await asyncio.sleep(1.5)  # let the workers connect
        speak_s = max(1.0, args.seconds - 4)
        watch = asyncio.create_task(_watch(redis.url, time.monotonic() + args.seconds))
        await asyncio.gather(*(_bot(url, f"demo-bot-{i}", speak_s) for i in range(args.bots)))
        seen = await watch
        print("\nsummary", flush=True)
        for bot, s in sorted(seen.items()):
            print(
                f"  {bot}: {s['frames']} frames, speakers {sorted(s['speakers'])}, "
                f"commands {dict(s['commands'])}",
                flush=True,
            )
        wavs = sorted(str(p.relative_to(out)) for p in out.rglob("*.wav"))  # noqa: ASYNC240 (a demo, at the end)
        print(f"  recorder wrote {len(wavs)} WAV files: {', '.join(wavs)}", flush=True)
    finally:
        await _stop_workers(procs)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(gw.stop(), 30)
        redis.stop()
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m workers.demo", description=__doc__)
    p.add_argument("--seconds", type=float, default=12.0, help="stop everything after this long")
    p.add_argument("--bots", type=int, default=3)
    p.add_argument("--out", help="directory for the recordings (default: a temporary one)")
    args = p.parse_args(argv)
    os.environ.setdefault("MEETSTREAM_LOG_FORMAT", "text")
    return asyncio.run(main_async(args))


if __name__ == "__main__":
    raise SystemExit(main())
