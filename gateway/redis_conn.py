"""Connecting to Redis, standalone or Cluster, and proving the connection at start."""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import hiredis
import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.connection import parse_url
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisClusterException, RedisError

from gateway.exceptions import RedisUnavailable
from gateway.logs import error_text
from gateway.resp import encode_commands
from gateway.settings import Settings, redact_url

log = logging.getLogger(__name__)

# redis-py 8 defaults to a 5 s socket timeout; writes must give up well before
# Kubernetes gives up on us, and blocking reads get their own, longer timeout.
WRITE_SOCKET_TIMEOUT_S = 10.0
#: Error replies that mean "not here (now)" on a Cluster: refresh the slot map and send again.
REDIRECT_ERRORS = ("MOVED", "ASK", "TRYAGAIN", "CLUSTERDOWN")
CONNECT_TIMEOUT_S = 5.0
#: Least time between two slot-map refreshes: a dead node fails every write sent to
#: it, and each failure asks for one until its replica takes over.
SLOT_REFRESH_MIN_S = 0.25
POOL_WAIT_S = 10.0


@dataclass
class RedisBackend:
    """The write client (a bounded pool) plus what readers need to open their own connection."""

    client: Any  # aioredis.Redis | RedisCluster
    url: str
    is_cluster: bool
    clock_offset_ms: int = 0  # Redis TIME minus our wall clock
    _refreshing: asyncio.Future[set[tuple[str, int]]] | None = field(default=None, repr=False)
    _refreshed_at: float = field(default=0.0, repr=False)

    def raw_params(self) -> dict[str, Any]:
        """Credentials and TLS options of the URL, for :class:`RawConnection`."""
        params: dict[str, Any] = dict(parse_url(self.url))
        conn_class = params.pop("connection_class", None)
        if conn_class is not None and "SSL" in conn_class.__name__:
            params["ssl"] = True
        if self.is_cluster:
            params.pop("db", None)
        return params

    def raw_connection(self, host: str | None = None, port: int | None = None) -> RawConnection:
        params = self.raw_params()
        host = host or params.get("host", "localhost")
        return RawConnection(host, port or int(params.get("port", 6379)), params)

    def node_of(self, key: str) -> tuple[str, int]:
        """Host and port of the node that serves ``key`` (a Cluster's current slot map)."""
        node = self.client.get_node_from_key(key)
        return node.host, node.port

    def slot_map_version(self) -> int:
        """Changes whenever the slot map was refreshed (by anyone: redis-py rebuilds it)."""
        return id(self.client.nodes_manager.slots_cache) if self.is_cluster else 0

    async def refresh_slots(self) -> set[tuple[str, int]] | None:
        """Ask the cluster for its slot map again; the primaries now, or None (not a
        Cluster, or refreshed a moment ago). One refresh at a time, shared by callers.

        A MOVED reply refreshes it too (redis-py), but a dead primary replies nothing:
        this is how writers and readers find the replica that took its slots over.
        """
        if not self.is_cluster:
            return None
        if self._refreshing is not None:
            return await asyncio.shield(self._refreshing)
        if time.monotonic() - self._refreshed_at < SLOT_REFRESH_MIN_S:
            return None
        self._refreshed_at = time.monotonic()
        self._refreshing = asyncio.ensure_future(self._refresh())
        try:
            return await asyncio.shield(self._refreshing)
        finally:
            self._refreshing = None

    async def _refresh(self) -> set[tuple[str, int]]:
        await self.client.nodes_manager.initialize()
        return {(node.host, node.port) for node in self.client.get_primaries()}

    def now_ms(self) -> int:
        """Redis server time in Unix ms, as our clock corrected by the offset seen at start."""
        return int(time.time() * 1000) + self.clock_offset_ms

    async def close(self) -> None:
        await self.client.aclose()


async def _detect_cluster(url: str) -> bool:
    probe = aioredis.Redis.from_url(
        url, socket_connect_timeout=CONNECT_TIMEOUT_S, socket_timeout=CONNECT_TIMEOUT_S
    )
    try:
        info = await probe.info("cluster")
        return bool(info.get("cluster_enabled"))
    finally:
        await probe.aclose()


def gate(client: Any, limit: int) -> asyncio.Semaphore:
    """Let at most ``limit`` commands or pipelines use a Cluster client at once; the rest wait.

    redis-py's Cluster client fails at once past a node's pool (``MaxConnectionsError``)
    where the standalone one waits (``BlockingConnectionPool``): a worker that took many
    bots at once gave them all away again on that error (200 bots in the day moved
    thousands of times), and a gateway's wake-ups failed during a drain. Every command
    goes through ``execute_command`` and every pipeline through its ``execute``; a
    Cluster pipeline holds at most one connection per node, so no pool is exceeded.
    """
    slots = asyncio.Semaphore(limit)
    execute_command = client.execute_command
    make_pipeline = client.pipeline

    async def gated_command(*args: Any, **kwargs: Any) -> Any:
        async with slots:
            return await execute_command(*args, **kwargs)

    def gated_pipeline(*args: Any, **kwargs: Any) -> Any:
        pipe = make_pipeline(*args, **kwargs)
        execute = pipe.execute

        async def gated_execute(*a: Any, **k: Any) -> Any:
            async with slots:
                return await execute(*a, **k)

        pipe.execute = gated_execute
        return pipe

    client.execute_command = gated_command
    client.pipeline = gated_pipeline
    client.slots_gate = slots
    return slots


async def _open_once(
    url: str, cluster: str, max_connections: int, socket_timeout_s: float
) -> tuple[Any, bool]:
    is_cluster = await _detect_cluster(url) if cluster == "auto" else cluster == "yes"
    common: dict[str, Any] = dict(
        socket_timeout=socket_timeout_s,
        socket_connect_timeout=CONNECT_TIMEOUT_S,
        max_connections=max_connections,
        decode_responses=False,
    )
    if is_cluster:
        client: Any = RedisCluster.from_url(url, **common)
        await client.initialize()
        gate(client, max_connections)
    else:
        # A burst of bots arriving at once must wait for a pooled connection, not fail.
        pool = aioredis.BlockingConnectionPool.from_url(url, timeout=POOL_WAIT_S, **common)
        client = aioredis.Redis.from_pool(pool)
    try:
        await client.ping()
    except BaseException:
        await client.aclose()
        raise
    return client, is_cluster


async def open_client(
    url: str,
    cluster: str,
    *,
    max_connections: int,
    socket_timeout_s: float,
    attempts: int = 10,
    delay_s: float = 0.5,
) -> tuple[Any, bool]:
    """A pooled client for ``url`` (``cluster``: auto, yes or no), proven with PING.

    Retries with a log line per retry, as arq does, then raises
    :class:`RedisUnavailable`. Shared by the gateway and the worker SDK: one place
    knows how to tell a Cluster from a single Redis and which timeouts to set.
    """
    shown = redact_url(url)
    last: Exception | None = None
    for attempt in range(1, attempts + 1):
        try:
            client, is_cluster = await _open_once(url, cluster, max_connections, socket_timeout_s)
            log.info("redis connected", extra={"redis_url": shown, "cluster": is_cluster})
            return client, is_cluster
        except (RedisError, RedisClusterException, OSError) as exc:
            # RedisClusterException is not a RedisError: a seed node still loading its
            # data after a restart, or unreachable, raises it from initialize().
            last = exc
            log.warning(
                "redis not reachable, retrying",
                extra={"redis_url": shown, "attempt": attempt, "of": attempts, "error": error_text(exc)},
            )
            await asyncio.sleep(min(delay_s * attempt, 5.0))
    raise RedisUnavailable(shown, attempts) from last


async def connect(settings: Settings, url: str, *, attempts: int = 10, delay_s: float = 0.5) -> RedisBackend:
    """Open the write client; measure Redis's clock against ours (command ages use it)."""
    client, is_cluster = await open_client(
        url,
        settings.redis_cluster,
        max_connections=settings.redis_max_connections,
        socket_timeout_s=WRITE_SOCKET_TIMEOUT_S,
        attempts=attempts,
        delay_s=delay_s,
    )
    backend = RedisBackend(client, url, is_cluster)
    backend.clock_offset_ms = await _clock_offset_ms(client, is_cluster)
    log.info("redis clock offset measured", extra={"clock_offset_ms": backend.clock_offset_ms})
    return backend


async def _clock_offset_ms(client: Any, is_cluster: bool) -> int:
    before = time.time()
    if is_cluster:
        reply = await client.time(target_nodes=RedisCluster.RANDOM)
    else:
        reply = await client.time()
    seconds, micros = reply
    after = time.time()
    ours = (before + after) / 2
    return int((seconds + micros / 1e6 - ours) * 1000)


class _Link(asyncio.Protocol):
    """One socket of a :class:`RawConnection`: requests go out in order, replies are
    matched to them in the order they come back (Redis answers in order)."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.parser = hiredis.Reader()
        self.pending: deque[_Request] = deque()
        self.lost: BaseException | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def submit(self, payload: bytes, replies: int) -> asyncio.Future[list[Any]]:
        if self.lost is not None or self.transport is None or self.transport.is_closing():
            raise RedisConnectionError("connection to Redis lost")
        request = _Request(replies, [], asyncio.get_running_loop().create_future())
        self.pending.append(request)
        self.transport.write(payload)
        return request.future

    def data_received(self, data: bytes) -> None:
        parser = self.parser
        parser.feed(data)
        pending = self.pending
        while pending:
            request = pending[0]
            out = request.replies
            while len(out) < request.expected:
                reply = parser.gets()
                if reply is False:
                    return
                out.append(reply)
            pending.popleft()
            if not request.future.done():
                request.future.set_result(out)
        if parser.gets() is not False:
            self.close(RedisConnectionError("Redis replied to nothing we asked"))

    def connection_lost(self, exc: BaseException | None) -> None:
        self.close(exc or RedisConnectionError("connection closed by Redis"))

    def close(self, exc: BaseException) -> None:
        if self.lost is None:
            self.lost = exc
        if self.transport is not None:
            self.transport.close()
        while self.pending:
            future = self.pending.popleft().future
            if not future.done():
                error = RedisConnectionError(f"connection to Redis lost: {exc!r}")
                error.__cause__ = exc
                future.set_exception(error)
                future.exception()  # retrieved: nobody may be waiting any more


@dataclass(slots=True)
class _Request:
    expected: int
    replies: list[Any]
    future: asyncio.Future[list[Any]]


class RawConnection:
    """One connection for RESP bytes out and hiredis-parsed replies in, pipelined.

    ``submit`` writes at once and returns a future of the replies, so a writer can
    keep several batches on the wire instead of idling a round trip per batch.
    Error replies come back as ``hiredis.ReplyError`` values, one per command, not
    raised. Any socket trouble, a timeout or a cancellation in :meth:`execute`
    leaves the connection in an unknown state, so it is closed (failing whatever
    else was on the wire) and the next call opens a new one.
    """

    def __init__(
        self, host: str, port: int, params: dict[str, Any], timeout_s: float = WRITE_SOCKET_TIMEOUT_S
    ) -> None:
        self.host = host
        self.port = port
        self.params = params
        self.timeout_s = timeout_s
        self._link: _Link | None = None

    @property
    def connected(self) -> bool:
        link = self._link
        return link is not None and link.lost is None and link.transport is not None

    async def connect(self) -> None:
        """Open the socket (and authenticate) unless it is open already."""
        if self.connected:
            return
        self.close()
        ssl_ctx = None
        if self.params.get("ssl"):
            ssl_ctx = ssl.create_default_context(cafile=self.params.get("ssl_ca_certs"))
            if self.params.get("ssl_cert_reqs") in ("none", ssl.CERT_NONE):
                ssl_ctx.check_hostname = False
                ssl_ctx.verify_mode = ssl.CERT_NONE
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(CONNECT_TIMEOUT_S):
            _, link = await loop.create_connection(_Link, self.host, self.port, ssl=ssl_ctx)
        self._link = link
        setup: list[tuple[Any, ...]] = []
        if self.params.get("password"):
            user = self.params.get("username")
            password = self.params["password"]
            setup.append(("AUTH", user, password) if user else ("AUTH", password))
        if self.params.get("db"):
            setup.append(("SELECT", self.params["db"]))
        if setup:
            for reply in await self.execute(encode_commands(setup), len(setup)):
                if isinstance(reply, hiredis.ReplyError):
                    self.close()
                    raise RedisError(f"connection setup refused: {reply}")

    def submit(self, payload: bytes, replies: int) -> asyncio.Future[list[Any]]:
        """Write now; the future resolves to the replies (or fails with the connection).

        Needs an open connection (:meth:`connect`): submitting never waits, so that
        what is submitted in order is written in order.
        """
        if self._link is None:
            raise RedisConnectionError("not connected")
        return self._link.submit(payload, replies)

    async def execute(self, payload: bytes, replies: int) -> list[Any]:
        await self.connect()
        try:
            async with asyncio.timeout(self.timeout_s):
                # Not shielded: a timeout or cancellation closes the connection below,
                # failing everything else on it anyway; and a shield costs a turn of
                # the event loop per reply, which under load is command latency.
                return await self.submit(payload, replies)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        if self._link is not None:
            self._link.close(RedisConnectionError("connection closed"))
        self._link = None
