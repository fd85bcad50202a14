"""Small async helpers for tests that wait on real processes."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

T = TypeVar("T")


async def eventually(
    check: Callable[[], Awaitable[T] | T], timeout_s: float = 10.0, interval_s: float = 0.02
) -> T:
    """Poll ``check`` until it returns a truthy value; fail with its last value after the timeout."""
    deadline = time.monotonic() + timeout_s
    last: Any = None
    while True:
        last = check()
        if asyncio.iscoroutine(last) or isinstance(last, Awaitable):
            last = await last
        if last:
            return last
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout_s}s (last value: {last!r})")
        await asyncio.sleep(interval_s)


def fields_str(fields: dict[bytes, bytes]) -> dict[str, str]:
    """Decode an entry's fields for comparison, leaving binary ones (pcm) out."""
    return {k.decode(): v.decode() for k, v in fields.items() if k != b"pcm"}


async def events_of(client: Any, key: str) -> list[dict[str, str]]:
    return [fields_str(f) for _, f in await client.xrange(key)]
