"""Worker fixtures: fast leases, and workers that are always stopped."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import shutil
import subprocess
import time
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from workers.worker import Worker, WorkerSettings

NODE_DIR = Path(__file__).resolve().parents[2] / "workers" / "node"
NODE_FILES = ("package.json", "package-lock.json", "worker.js", "group.js")

needs_node = pytest.mark.skipif(
    shutil.which("node") is None or shutil.which("npm") is None,
    reason="node and npm are not installed: the Node.js worker cannot run here",
)


@pytest.fixture(scope="session")
def node_worker_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of workers/node with its locked dependencies installed by ``npm ci``."""
    target = tmp_path_factory.mktemp("node-worker")
    for name in NODE_FILES:
        shutil.copy(NODE_DIR / name, target / name)
    subprocess.run(
        ["npm", "ci", "--no-audit", "--no-fund", "--loglevel=error"],
        cwd=target,
        check=True,
        timeout=180,
        capture_output=True,
    )
    return target


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


def scrape_metrics(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """A worker's /metrics as {(name, sorted labels): value} (blocking: call it in a thread)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
