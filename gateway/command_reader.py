"""Reading the command streams of every bot this gateway holds, with few connections.

One consumer group (``gateway``) per command stream; this process reads as
consumer ``gateway_id``. The streams of a *slot group* (all of them on a single
Redis; those sharing a shard hash tag on a Cluster) are read by one blocking
XREADGROUP on a dedicated connection, so connections grow with shards in use,
never with bots.

The set of streams changes as bots come and go. To change it without
cancelling a blocked read (which is how a blocked connection leaks back into
a pool), each group also reads a private *wake* stream in its slot; adding a
bot XADDs to it, and the blocked read returns at once.

Delivery is at least once: an entry is XACKed only after it was written to the
bot's socket. When a bot's control channel comes up, entries still pending from
an earlier connection (on this or a dead gateway) are claimed with XAUTOCLAIM
and delivered first, in stream order.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from redis.exceptions import RedisError, ResponseError

from gateway.keys import COMMAND_GROUP, BotKeys, KeySpace
from gateway.metrics import Metrics
from gateway.redis_conn import RedisBackend
from gateway.settings import Settings

log = logging.getLogger(__name__)

# Retry often enough that a Redis restart costs well under a second of extra
# buffering, rarely enough that a dead Redis sees at most a few attempts a second.
MAX_BACKOFF_S = 0.5

Entry = tuple[str, dict[bytes, bytes]]
#: Called with a bot and its entries, in stream order; must not block.
Deliver = Callable[[str, list[Entry]], None]
#: Called when another gateway took over a bot: (bot_id, our conn_id it replaces, new gateway_id).
Evict = Callable[[str, str, str], None]


async def ensure_group(client: Any, stream: str) -> None:
    """Create the gateway's group on ``stream`` from its start (idempotent).

    From id 0, not $: commands a worker wrote before the bot connected must be delivered.
    """
    try:
        await client.xgroup_create(stream, COMMAND_GROUP, id="0", mkstream=True)
    except ResponseError as exc:
        if "BUSYGROUP" not in str(exc):
            raise


def _decode_entries(raw: list[Any]) -> list[Entry]:
    out = []
    for entry_id, fields in raw:
        if fields is None:  # trimmed away while pending
            continue
        out.append((entry_id.decode() if isinstance(entry_id, bytes) else entry_id, fields))
    return out


@dataclass
class _Group:
    slot: int
    shard: int  # the shard whose tag the wake stream carries
    wake_key: str
    members: dict[str, str] = field(default_factory=dict)  # commands key -> bot_id
    paused: set[str] = field(default_factory=set)  # bot_ids
    task: asyncio.Task[None] | None = None
    wake_ready: bool = False


class CommandReader:
    """Reads command streams for the bots held by this process and hands entries to ``deliver``."""

    def __init__(
        self,
        backend: RedisBackend,
        keyspace: KeySpace,
        settings: Settings,
        metrics: Metrics,
        deliver: Deliver,
        evict: Evict | None = None,
    ) -> None:
        self.backend = backend
        self.keyspace = keyspace
        self.settings = settings
        self.metrics = metrics
        self.deliver = deliver
        self.evict = evict
        self._background: set[asyncio.Task[None]] = set()
        self.consumer = settings.gateway_id
        self._groups: dict[int, _Group] = {}
        self._bots: dict[str, BotKeys] = {}
        self._stopping = False

    @property
    def connections(self) -> int:
        """Dedicated reader connections open now (one per active slot group)."""
        return sum(1 for g in self._groups.values() if g.task is not None and not g.task.done())

    def _group_for(self, keys: BotKeys) -> _Group:
        slot = self.backend.slot(keys.commands)
        group = self._groups.get(slot)
        if group is None:
            group = _Group(slot, keys.shard, self.keyspace.shard_wake(keys.shard, self.consumer))
            self._groups[slot] = group
        return group

    async def add(self, keys: BotKeys) -> None:
        """Start delivering a bot's commands: its pending ones first, then new ones."""
        if self._stopping:
            return
        client = self.backend.client
        await ensure_group(client, keys.commands)
        pending = await self._claim_pending(keys)
        if pending:
            log.info("redelivering pending commands", extra={"bot_id": keys.bot_id, "count": len(pending)})
            self.deliver(keys.bot_id, pending)
        self._bots[keys.bot_id] = keys
        group = self._group_for(keys)
        group.members[keys.commands] = keys.bot_id
        if group.task is None or group.task.done():
            group.task = asyncio.create_task(self._read_loop(group), name=f"commands-slot-{group.slot}")
        else:
            await self._wake(group)

    async def _claim_pending(self, keys: BotKeys) -> list[Entry]:
        """Take over entries read but never acked by an earlier connection of this bot."""
        claimed: list[Entry] = []
        cursor = "0-0"
        started = time.perf_counter()
        for _ in range(1000):  # bounded: a PEL holds at most what was read, COUNT at a time
            reply = await self.backend.client.xautoclaim(
                keys.commands, COMMAND_GROUP, self.consumer, min_idle_time=0, start_id=cursor, count=100
            )
            cursor_raw, entries = reply[0], reply[1]
            claimed += _decode_entries(entries)
            cursor = cursor_raw.decode() if isinstance(cursor_raw, bytes) else cursor_raw
            if cursor == "0-0":
                break
        self.metrics.redis_latency.labels("claim").observe(time.perf_counter() - started)
        return claimed

    async def remove(self, bot_id: str) -> None:
        """Stop reading a bot's commands (unsent ones stay pending in Redis)."""
        keys = self._bots.pop(bot_id, None)
        if keys is None:
            return
        group = self._groups.get(self.backend.slot(keys.commands))
        if group is None:
            return
        group.members.pop(keys.commands, None)
        group.paused.discard(bot_id)
        await self._wake(group)

    def pause(self, bot_id: str) -> None:
        """Backpressure: the bot's outbox is full, read no more for it."""
        keys = self._bots.get(bot_id)
        if keys is not None:
            self._group_for(keys).paused.add(bot_id)

    async def resume(self, bot_id: str) -> None:
        keys = self._bots.get(bot_id)
        if keys is None:
            return
        group = self._group_for(keys)
        if bot_id in group.paused:
            group.paused.discard(bot_id)
            await self._wake(group)

    async def _wake(self, group: _Group) -> None:
        if group.task is None or group.task.done() or not group.wake_ready:
            return  # the loop picks up the new member set before it blocks
        try:
            await self.backend.client.xadd(group.wake_key, {b"w": b"1"}, maxlen=1, approximate=False)
        except RedisError as exc:
            # The read loop comes round within command_block_ms anyway.
            log.warning(
                "could not wake command reader", extra={"slot": group.slot, "error": type(exc).__name__}
            )

    async def _open(self, group: _Group, socket_timeout_s: float) -> Any:
        conn = await self.backend.dedicated(group.wake_key, socket_timeout_s)
        try:
            await ensure_group(conn, group.wake_key)
            await conn.expire(group.wake_key, self.settings.key_ttl_s)
            # Members may have come back while we were away: their groups must exist.
            for key in list(group.members):
                await ensure_group(conn, key)
        except BaseException:
            await conn.aclose()
            raise
        group.wake_ready = True
        return conn

    async def _read_loop(self, group: _Group) -> None:
        block_ms = self.settings.command_block_ms
        socket_timeout_s = block_ms / 1000 + 10
        conn = None
        backoff_s = 0.1
        try:
            while not self._stopping and group.members:
                if conn is None:
                    try:
                        conn = await self._open(group, socket_timeout_s)
                    except (RedisError, OSError) as exc:
                        self.metrics.redis_errors.labels("read_commands").inc()
                        log.warning(
                            "command reader cannot connect",
                            extra={"slot": group.slot, "error": repr(exc), "backoff_s": backoff_s},
                        )
                        await asyncio.sleep(backoff_s)
                        backoff_s = min(backoff_s * 2, MAX_BACKOFF_S)
                        continue
                streams = {group.wake_key: ">"}
                for key, bot_id in group.members.items():
                    if bot_id not in group.paused:
                        streams[key] = ">"
                started = time.perf_counter()
                try:
                    # Cancelling here could lose nothing but this connection: it is ours
                    # alone and is closed in the finally below, never pooled.
                    reply = await conn.xreadgroup(
                        COMMAND_GROUP,
                        self.consumer,
                        streams,
                        count=self.settings.command_read_count,
                        block=block_ms,
                    )
                except ResponseError as exc:
                    if "NOGROUP" in str(exc):
                        # A stream (or its group) was deleted under us: recreate and go on.
                        for key in list(streams):
                            await ensure_group(conn, key)
                        continue
                    error: Exception = exc
                except (RedisError, OSError) as exc:
                    error = exc
                else:
                    error = None  # type: ignore[assignment]
                if error is not None:
                    self.metrics.redis_errors.labels("read_commands").inc()
                    log.warning(
                        "command read failed, reconnecting",
                        extra={"slot": group.slot, "error": repr(error), "backoff_s": backoff_s},
                    )
                    with contextlib.suppress(Exception):
                        await conn.aclose()
                    conn = None
                    group.wake_ready = False
                    await asyncio.sleep(backoff_s)
                    backoff_s = min(backoff_s * 2, MAX_BACKOFF_S)
                    continue
                backoff_s = 0.1
                self.metrics.redis_latency.labels("read_commands").observe(time.perf_counter() - started)
                for stream_raw, entries in self._iter_reply(reply):
                    stream = stream_raw.decode() if isinstance(stream_raw, bytes) else stream_raw
                    decoded = _decode_entries(entries)
                    if stream == group.wake_key:
                        await conn.xack(group.wake_key, COMMAND_GROUP, *[e[0] for e in decoded])
                        self._on_signals(decoded)
                        continue
                    bot_id = group.members.get(stream)
                    if bot_id is None:
                        # The bot left while this read was in flight: the entries stay
                        # pending and are claimed when it comes back.
                        continue
                    self.deliver(bot_id, decoded)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("command reader crashed", extra={"slot": group.slot})
            raise
        finally:
            group.wake_ready = False
            if conn is not None:
                with contextlib.suppress(Exception):
                    await conn.delete(group.wake_key)
                with contextlib.suppress(Exception):
                    await conn.aclose()
            if group.members and not self._stopping:
                # A bot joined while this loop was winding down: carry on for it.
                group.task = asyncio.create_task(self._read_loop(group), name=f"commands-slot-{group.slot}")

    async def signal(self, gateway_id: str, keys: BotKeys, **fields: str) -> None:
        """Tell another gateway something about a bot, through its wake stream in the bot's shard slot."""
        wake = self.keyspace.shard_wake(keys.shard, gateway_id)
        pipe = self.backend.client.pipeline(transaction=False)
        pipe.xadd(wake, fields, maxlen=1000, approximate=True)
        pipe.expire(wake, self.settings.key_ttl_s)
        await pipe.execute()

    def _on_signals(self, entries: list[Entry]) -> None:
        for _, fields in entries:
            if b"evict" in fields and self.evict is not None:
                self.evict(
                    fields[b"evict"].decode(),
                    fields.get(b"conn", b"").decode(),
                    fields.get(b"by", b"").decode(),
                )
            elif b"reclaim" in fields:
                task = asyncio.create_task(self._reclaim(fields[b"reclaim"].decode()))
                self._background.add(task)
                task.add_done_callback(self._background.discard)

    async def _reclaim(self, bot_id: str) -> None:
        """The gateway we took a bot over from has let go: take what it left pending."""
        keys = self._bots.get(bot_id)
        if keys is None:
            return
        try:
            pending = await self._claim_pending(keys)
        except RedisError as exc:
            log.warning("reclaim failed", extra={"bot_id": bot_id, "error": repr(exc)})
            return
        if pending and bot_id in self._bots:
            log.info(
                "delivering commands left by the previous owner",
                extra={"bot_id": bot_id, "count": len(pending)},
            )
            self.deliver(bot_id, pending)

    @staticmethod
    def _iter_reply(reply: Any) -> list[tuple[Any, list[Any]]]:
        if not reply:
            return []
        if isinstance(reply, dict):  # RESP3
            return [
                (k, v[0] if v and isinstance(v[0], list) and len(v) == 1 else v) for k, v in reply.items()
            ]
        return [(item[0], item[1]) for item in reply]

    async def stop(self) -> None:
        """Stop all readers: wake them so they return from their blocking read."""
        self._stopping = True
        groups = list(self._groups.values())
        for group in groups:
            await self._wake(group)
        tasks = [g.task for g in groups if g.task is not None]
        if tasks:
            _, still = await asyncio.wait(tasks, timeout=self.settings.command_block_ms / 1000 + 2)
            for task in still:
                task.cancel()
            with contextlib.suppress(BaseException):
                await asyncio.gather(*tasks, return_exceptions=True)
