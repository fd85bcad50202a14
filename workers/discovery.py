"""Discovery: fold the gateway's global stream into the group's registry of live bots.

Every instance of a group reads the whole global stream (discovery is broadcast,
ownership is not, ``docs/PROTOCOL.md``, "What every instance does", step 2): on
start it folds ``bootstrap_lookback_s`` of it into the registry hash
``{prefix}:workers:{group}:bots`` (``bot_id -> commands_key``), then follows it
with ``XREAD BLOCK`` and adds each ``connected`` as it comes. The registry is
the one place claim rounds look for bots; a bot's last owner takes it out when
its meeting ends (:meth:`Registry.forget`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any, cast

from redis.exceptions import RedisError

from gateway.logs import error_text
from workers.connections import Connections
from workers.constants import global_events_key, registry_key
from workers.metrics import WorkerMetrics
from workers.settings import WorkerSettings
from workers.stats import WorkerStats

log = logging.getLogger("workers.worker")  # the name the SDK's lines had before the split

#: Entries per read of the global stream.
READ_COUNT = 500
BOOTSTRAP_PAGE = 1000

#: One stream entry as redis-py returns it: (id, fields).
Entry = tuple[bytes | str, dict[bytes, bytes]]
#: An XREAD/XREADGROUP reply: (stream key, entries) per stream with any.
StreamReply = list[tuple[bytes, list[Entry]]]


def text(value: bytes | str) -> str:
    """A Redis reply field as text."""
    return value.decode() if isinstance(value, bytes) else value


def is_stale(fields: Mapping[str, str], latest_gateway: str) -> bool:
    """A ``disconnected`` or ``session_ended`` from another gateway than the one the bot
    connected to last: it speaks for a connection the bot has already replaced.

    ``session_ended`` is per gateway; events without a ``gateway`` field (older
    gateways) are taken as they come.
    """
    said_by = fields.get("gateway", "")
    return bool(said_by and latest_gateway and said_by != latest_gateway)


class Registry:
    """The group's registry hash: ``bot_id -> commands_key`` of every live bot it knows."""

    def __init__(self, client: Any, prefix: str, group: str) -> None:
        self.client = client
        self.key = registry_key(prefix, group)

    async def learn(self, bots: Mapping[str, str]) -> None:
        await self.client.hset(self.key, mapping=dict(bots))

    async def read(self) -> dict[str, str]:
        return {text(k): text(v) for k, v in (await self.client.hgetall(self.key)).items()}

    async def unknown(self, bot_ids: list[str]) -> set[str]:
        """Which of these bots the registry no longer holds (one pipeline)."""
        if not bot_ids:
            return set()
        pipe = self.client.pipeline(transaction=False)
        for bot_id in bot_ids:
            pipe.hexists(self.key, bot_id)
        return {b for b, known in zip(bot_ids, await pipe.execute(), strict=True) if not known}

    async def forget(self, bot_id: str) -> None:
        await self.client.hdel(self.key, bot_id)

    async def keep(self, bot_id: str, commands_key: str) -> None:
        await self.client.hset(self.key, bot_id, commands_key)


class Discovery:
    """The task that keeps the registry: :meth:`run` until :meth:`stop`."""

    def __init__(
        self,
        settings: WorkerSettings,
        conns: Connections,
        registry: Registry,
        stats: WorkerStats,
        metrics: WorkerMetrics,
        learned: Callable[[], None],
    ) -> None:
        self.settings = settings
        self.conns = conns
        self.registry = registry
        self.stats = stats
        self.metrics = metrics
        #: Called when the registry gained bots (a claim round should run at once).
        self.learned = learned
        self.key = global_events_key(settings.key_prefix)
        self._stopping = False

    def stop(self) -> None:
        """Stop after the read in progress (within one ``read_block_ms``)."""
        self._stopping = True

    async def run(self) -> None:
        s = self.settings
        key = self.key
        client = await self.conns.dedicated(key, s.read_block_ms)
        last_id: str | None = None
        try:
            while not self._stopping:
                try:
                    if last_id is None:
                        last_id = await self.bootstrap(client)
                    # Cancelling here loses nothing: on start, discovery reads back
                    # the registry and ``bootstrap_lookback_s`` of the stream.
                    reply = cast(
                        StreamReply,
                        await client.xread({key: last_id}, count=READ_COUNT, block=s.read_block_ms),
                    )
                    learned: dict[str, str] = {}
                    for _, entries in reply or ():
                        for entry_id, raw in entries:
                            last_id = text(entry_id)
                            f = {text(k): text(v) for k, v in raw.items()}
                            if f.get("type") == "connected" and f.get("commands_key"):
                                learned[f["bot_id"]] = f["commands_key"]
                    if learned:
                        await self.registry.learn(learned)
                        self.learned()
                except (RedisError, OSError) as exc:
                    self.stats.redis_errors += 1
                    self.metrics.redis_errors.inc()
                    log.warning("discovery read failed, reconnecting", extra={"error": error_text(exc)})
                    await asyncio.sleep(1.0)
                    # Its node may be gone (a failover: the replica serves the stream now,
                    # and the old primary answers MOVED once back): ask the cluster again
                    # and read from whoever serves the stream, as a new connection.
                    await client.aclose()
                    if self.conns.is_cluster:
                        with contextlib.suppress(RedisError, OSError):
                            await self.conns.client.nodes_manager.initialize()
                    client = await self.conns.dedicated(key, s.read_block_ms)
        finally:
            await client.aclose()

    async def bootstrap(self, client: Any) -> str:
        """Read back the lookback window: bots that connected and have not ended yet.

        Returns the id of the last entry read, where following the stream goes on.
        """
        start = f"{int((time.time() - self.settings.bootstrap_lookback_s) * 1000)}-0"
        alive: dict[str, str] = {}
        gateway_of: dict[str, str] = {}  # the gateway of each bot's latest ``connected``
        last = "0-0"
        while True:
            entries = await client.xrange(self.key, min=start, max="+", count=BOOTSTRAP_PAGE)
            for entry_id, raw in entries:
                last = text(entry_id)
                f = {text(k): text(v) for k, v in raw.items()}
                if f.get("type") == "connected" and f.get("commands_key"):
                    alive[f["bot_id"]] = f["commands_key"]
                    gateway_of[f["bot_id"]] = f.get("gateway", "")
                elif f.get("type") == "session_ended" and not is_stale(
                    f, gateway_of.get(f.get("bot_id", ""), "")
                ):
                    alive.pop(f.get("bot_id", ""), None)
            if len(entries) < BOOTSTRAP_PAGE:
                break
            start = "(" + last
        if alive:
            await self.registry.learn(alive)
        log.info("discovery bootstrapped", extra={"bots_alive": len(alive), "group": self.settings.group})
        self.learned()
        return last
