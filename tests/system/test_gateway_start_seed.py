"""Reproduction, found by the day: a gateway (or an SDK worker) whose seed Redis Cluster
node is loading its dataset, or unreachable with ``--redis-cluster yes``, exits at start
instead of retrying.

``gateway.redis_conn.open_client`` retries ``RedisError`` and ``OSError`` only, but
``RedisCluster.initialize()`` (in ``_open_once``) raises ``RedisClusterUnreachableError``,
which is neither (redis-py: ``RedisClusterException`` -> ``Exception``). In the full-size
day, the rolling restart's first new replica was given the old primary as its seed just
after that node had come back and was loading the full sync from its new primary
(``-LOADING``): it exited with a traceback, and the rollout stopped. Under Kubernetes the
pod would crash-loop until the node finished loading; the promise is "proves Redis with
PING, retrying, with a log line per retry" (docs/ARCHITECTURE.md, Lifecycle).

1. A seed that answers as a Cluster node still loading (INFO says cluster_enabled,
   CLUSTER SLOTS answers -LOADING), or nothing at all at ``cluster="yes"``.
2. ``open_client`` must retry ``attempts`` times and raise ``RedisUnavailable``.
   (It raised ``RedisClusterUnreachableError`` on the first attempt before.)
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import pytest

from gateway.embedded_redis import free_port
from gateway.exceptions import RedisUnavailable
from gateway.redis_conn import open_client

pytestmark = pytest.mark.system


async def _answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Just enough RESP: every request is an array of bulk strings."""
    with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError, ValueError):
        while line := await reader.readline():
            args = []
            for _ in range(int(line[1:])):
                size = int((await reader.readline())[1:])
                args.append((await reader.readexactly(size + 2))[:-2].upper())
            if args[0] == b"HELLO":  # RESP2 only, like a server before 6.0: the client falls back
                writer.write(b"-ERR unknown command 'HELLO'\r\n")
            elif args[0] == b"INFO":
                body = b"# Cluster\r\ncluster_enabled:1\r\n"
                writer.write(b"$%d\r\n%s\r\n" % (len(body), body))
            elif args[0] == b"CLUSTER":
                writer.write(b"-LOADING Redis is loading the dataset in memory\r\n")
            else:
                writer.write(b"+OK\r\n")
            await writer.drain()
    writer.close()


@contextlib.asynccontextmanager
async def loading_node() -> AsyncIterator[str]:
    server = await asyncio.start_server(_answer, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        server.close()
        await server.wait_closed()


@pytest.mark.parametrize("seed", ["loading", "down"])
async def test_start_retries_a_seed_node_that_is_loading_or_down(seed: str) -> None:
    async with contextlib.AsyncExitStack() as stack:
        if seed == "loading":
            url, cluster = await stack.enter_async_context(loading_node()), "auto"
        else:
            url, cluster = f"redis://127.0.0.1:{free_port()}/0", "yes"
        with pytest.raises(RedisUnavailable):
            await asyncio.wait_for(
                open_client(url, cluster, max_connections=4, socket_timeout_s=2, attempts=3, delay_s=0.05),
                30,
            )
