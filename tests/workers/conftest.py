"""Worker fixtures: fast leases, and workers that are always stopped."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from workers.worker import Worker, WorkerSettings


def fast_settings(redis_url: str, group: str = "test", **overrides: object) -> WorkerSettings:
    values: dict[str, object] = dict(
        redis_url=redis_url,
        group=group,
        lease_ttl_s=2.0,
        lease_renew_s=0.4,
        claim_interval_s=0.2,
        read_block_ms=200,
        graceful_timeout_s=5.0,
    )
    values.update(overrides)
    return WorkerSettings(**values)  # type: ignore[arg-type]


@pytest.fixture
def worker_settings(redis_url: str) -> Callable[..., WorkerSettings]:
    return lambda group="test", **kw: fast_settings(redis_url, group, **kw)


@contextlib.asynccontextmanager
async def running(*workers: Worker) -> AsyncIterator[None]:
    for w in workers:
        await w.start()
    try:
        yield
    finally:
        for w in workers:
            await asyncio.wait_for(w.stop(), 30)


async def eventually(
    check: Callable[[], bool | Awaitable[bool]], timeout_s: float = 10.0, what: str = "condition"
) -> None:
    """Poll ``check`` until true; fail with ``what`` after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        result = check()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)
