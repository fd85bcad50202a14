"""A stand-in for a Kubernetes Service in front of the gateway replicas.

The driver publishes the replicas in an *endpoints file* (as the control plane
keeps an EndpointSlice): a replica is added once started and removed when it is
being terminated (as Kubernetes does for a terminating pod, before its
``preStop`` hook and SIGTERM). A replica that crashes stays listed until it is
replaced: only its readiness probe failing keeps traffic away from it, as with
a crashed container. Each bot process polls every listed replica's ``/readyz``
and routes a new connection to a random one among those that answered 200.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path

#: How often readiness is probed. Kubernetes' default period is 10 s (the chart uses 5 s);
#: the day is compressed, so its probes are too.
PROBE_INTERVAL_S = 0.5
PROBE_TIMEOUT_S = 1.0


@dataclass(frozen=True)
class Endpoint:
    replica: str  # the gateway's --gateway-id
    url: str  # ws://127.0.0.1:PORT
    metrics_port: int


def write_endpoints(path: Path, endpoints: list[Endpoint]) -> None:
    """Replace the endpoints file atomically (readers never see half a file)."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps([e.__dict__ for e in endpoints]))
    os.replace(tmp, path)


def read_endpoints(path: Path) -> list[Endpoint]:
    try:
        return [Endpoint(**e) for e in json.loads(path.read_text())]
    except (OSError, ValueError):
        return []


async def probe_ready(metrics_port: int, timeout_s: float = PROBE_TIMEOUT_S) -> bool:
    """GET /readyz: True on 200; a refused or silent replica is not ready."""
    writer = None
    try:
        async with asyncio.timeout(timeout_s):
            reader, writer = await asyncio.open_connection("127.0.0.1", metrics_port)
            writer.write(b"GET /readyz HTTP/1.1\r\nHost: probe\r\nConnection: close\r\n\r\n")
            status = await reader.readline()
        return status.split(b" ", 2)[1:2] == [b"200"]
    except (OSError, TimeoutError, IndexError):
        return False
    finally:
        if writer is not None:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()


class Service:
    """Routes to a random ready replica; probes all of them every ``interval_s``."""

    def __init__(self, endpoints_file: Path, interval_s: float = PROBE_INTERVAL_S, seed: int = 0) -> None:
        self.endpoints_file = endpoints_file
        self.interval_s = interval_s
        self.ready: list[Endpoint] = []
        self._rng = random.Random(seed)
        self._changed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._probe_loop(), name="service-probes")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _probe_loop(self) -> None:
        while True:
            listed = read_endpoints(self.endpoints_file)
            results = await asyncio.gather(*(probe_ready(e.metrics_port) for e in listed))
            self.ready = [e for e, ok in zip(listed, results, strict=True) if ok]
            if self.ready:
                self._changed.set()
            await asyncio.sleep(self.interval_s)

    async def pick(self, deadline: float) -> Endpoint | None:
        """A random ready replica; waits (until ``deadline``, monotonic) while none is."""
        while True:
            if self.ready:
                return self._rng.choice(self.ready)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), min(remaining, self.interval_s))
