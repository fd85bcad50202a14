"""Reading the command streams of every bot this gateway holds, with few connections.

One consumer group (``gateway``) per command stream; this process reads as
consumer ``gateway_id``. The streams of one shard (sharing its hash tag, hence
one slot on a Cluster) are read by blocking XREADGROUPs on dedicated
connections, each waiting on at most ``command_read_streams`` of them: Redis
registers every key of a blocking read again each time it returns, so a
command costs Redis in proportion to the keys of the read it wakes (figures
in docs/BENCHMARKS.md, "Figures behind the code"). So
connections grow with the shards in use and one per ``command_read_streams``
bots of a shard, never one per bot. A read is encoded once per change of its
stream set and sent raw; hiredis parses the reply.

The set of streams changes as bots come and go. To change it without
cancelling a blocked read (which is how a blocked connection leaks back into
a pool), each reader also reads a private *wake* stream in its slot; adding a
bot XADDs to it, and the blocked read returns at once. Every reader of a shard
also reads the shard's *signal* stream, where other gateways write (a bot
taken over, pending commands to reclaim): whichever of them it wakes handles it.

Entries go to a :class:`Sink` (:class:`gateway.delivery.Delivery`), which
returns the acks of what it wrote to sockets in the reader's own turn: they go
out in the same write as the shard's next read, with no pipeline of the
publisher's and no round trip of their own. When a bot's control channel comes
up, entries still pending from an earlier connection (on this or a dead
gateway) are claimed with XAUTOCLAIM and delivered first, in stream order.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

import hiredis
from redis.exceptions import RedisError, ResponseError

from gateway.keys import COMMAND_GROUP, BotKeys, KeySpace
from gateway.logs import error_text
from gateway.metrics import Metrics
from gateway.redis_conn import REDIRECT_ERRORS, RawConnection, RedisBackend
from gateway.resp import encode_commands
from gateway.settings import Settings

log = logging.getLogger(__name__)

# Retry often enough that a Redis restart costs well under a second of extra
# buffering, rarely enough that a dead Redis sees at most a few attempts a second.
MAX_BACKOFF_S = 0.5

Entry = tuple[str, dict[bytes, bytes]]
#: An XACK still to send: (stream, entry ids, owner); with an owner (owner key,
#: token), only while that key holds that token (see :func:`ack_args`).
Ack = tuple[str, tuple[str, ...], tuple[str, str] | None]


class Sink(Protocol):
    """Where the reader's entries and signals go; no method may block."""

    def deliver(self, bot_id: str, entries: list[Entry]) -> list[Ack]:
        """A bot's entries, in stream order; returns acks of what it wrote at once."""

    def evict(self, bot_id: str, conn_id: str, by: str) -> None:
        """Another gateway took over a bot: our conn_id it replaces, the new gateway_id."""

    def ack_elsewhere(self, acks: list[Ack]) -> None:
        """Acks no read of ours will carry (or whose fate is unknown): send them another way."""


#: KEYS: commands stream, owner key; ARGV: group, expected owner, ids. -1: not the owner.
ACK_IF_OWNER = """
local owner = redis.call('GET', KEYS[2])
if owner and owner ~= ARGV[2] then return -1 end
return redis.call('XACK', KEYS[1], ARGV[1], unpack(ARGV, 3))
"""


def ack_args(stream: str, entry_ids: tuple[str, ...], owner: tuple[str, str] | None) -> tuple[Any, ...]:
    """The command that acks ``entry_ids``; with ``owner``, only if the bot is still ours.

    A connection that lost its bot to a newer one (maybe on another gateway) may have
    written to a half-open socket: its acks are refused, the entries stay pending, and
    the new owner claims and sends them. A repeat, never a silent loss.
    """
    if owner is None:
        return ("XACK", stream, COMMAND_GROUP, *entry_ids)
    return ("EVAL", ACK_IF_OWNER, 2, stream, owner[0], COMMAND_GROUP, owner[1], *entry_ids)


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
        if isinstance(fields, list):  # hiredis: a flat [field, value, ...] list
            fields = dict(zip(fields[::2], fields[1::2], strict=True))
        out.append((entry_id.decode() if isinstance(entry_id, bytes) else entry_id, fields))
    return out


async def _call(conn: RawConnection, *args: Any) -> Any:
    """One command on a raw connection; an error reply raises ``ResponseError``."""
    (reply,) = await conn.execute(encode_commands([args]), 1)
    if isinstance(reply, hiredis.ReplyError):
        raise ResponseError(str(reply))
    return reply


async def _ensure_group_raw(conn: RawConnection, stream: str) -> None:
    try:
        await _call(conn, "XGROUP", "CREATE", stream, COMMAND_GROUP, "0", "MKSTREAM")
    except ResponseError as exc:
        if "BUSYGROUP" not in str(exc):
            raise


@dataclass
class _Group:
    """Some bots of one command shard, read by one blocking XREADGROUP."""

    shard: int
    index: int  # which of the shard's readers
    signal_key: str  # the shard's signal stream, read by every reader of the shard
    wake_key: str  # this reader's own: a change of its members wakes its read
    members: dict[str, str] = field(default_factory=dict)  # commands key -> bot_id
    paused: set[str] = field(default_factory=set)  # bot_ids
    task: asyncio.Task[None] | None = None
    wake_ready: bool = False
    version: int = 0  # bumped whenever the set of streams to read changes
    acks: list[Ack] = field(default_factory=list)  # to send with the next read
    _encoded: tuple[int, bytes] = (-1, b"")

    def changed(self) -> None:
        self.version += 1

    def read_command(self, consumer: str, count: int, block_ms: int) -> bytes:
        """The encoded XREADGROUP, rebuilt only when the streams change.

        Rebuilt on every read, encoding it dominated the gateway's CPU with hundreds of
        bots per shard.
        """
        if self._encoded[0] != self.version:
            readable = [k for k, b in self.members.items() if b not in self.paused]
            keys = [self.signal_key, self.wake_key, *readable]
            args = [
                "XREADGROUP",
                "GROUP",
                COMMAND_GROUP,
                consumer,
                "COUNT",
                count,
                "BLOCK",
                block_ms,
                "STREAMS",
                *keys,
                *([">"] * len(keys)),
            ]
            self._encoded = (self.version, encode_commands([args]))
        return self._encoded[1]


class CommandReader:
    """Reads command streams for the bots held by this process and hands entries to ``deliver``."""

    def __init__(
        self,
        backend: RedisBackend,
        keyspace: KeySpace,
        settings: Settings,
        metrics: Metrics,
        sink: Sink,
    ) -> None:
        self.backend = backend
        self.keyspace = keyspace
        self.settings = settings
        self.metrics = metrics
        self.sink = sink
        self._read_latency = metrics.redis_latency.labels("read_commands")
        self._background: set[asyncio.Task[None]] = set()
        self.consumer = settings.gateway_id
        self._groups: dict[tuple[int, int], _Group] = {}  # (shard, reader index)
        self._group_of: dict[str, _Group] = {}  # bot_id -> the reader that reads its commands
        self._bots: dict[str, BotKeys] = {}
        self._stopping = False

    @property
    def connections(self) -> int:
        """Dedicated reader connections open now (per shard with bots, one per
        ``command_read_streams`` of its bots)."""
        return sum(1 for g in self._groups.values() if g.task is not None and not g.task.done())

    def _group_for(self, keys: BotKeys) -> _Group:
        """The reader of a bot's commands: the one it has, or the shard's first with room."""
        group = self._group_of.get(keys.bot_id)
        if group is not None:
            return group
        # Even on a single Redis, where one read could span every shard, reads stay
        # small (the module docstring says why).
        limit = self.settings.command_read_streams
        index = 0
        while (group := self._groups.get((keys.shard, index))) is not None:
            if len(group.members) < limit:
                return group
            index += 1
        group = _Group(
            keys.shard,
            index,
            self.keyspace.shard_wake(keys.shard, self.consumer),
            self.keyspace.reader_wake(keys.shard, self.consumer, index),
        )
        self._groups[(keys.shard, index)] = group
        return group

    def _start(self, group: _Group) -> None:
        group.task = asyncio.create_task(self._read_loop(group), name=f"commands-{group.shard}-{group.index}")

    async def add(self, keys: BotKeys) -> None:
        """Start delivering a bot's commands: its pending ones first, then new ones."""
        if self._stopping:
            return
        client = self.backend.client
        await ensure_group(client, keys.commands)
        pending = await self._claim_pending(keys)
        if pending:
            log.info("redelivering pending commands", extra={"bot_id": keys.bot_id, "count": len(pending)})
            self._return_acks(self.sink.deliver(keys.bot_id, pending))
        self._bots[keys.bot_id] = keys
        group = self._group_of[keys.bot_id] = self._group_for(keys)
        group.members[keys.commands] = keys.bot_id
        group.changed()
        if group.task is None or group.task.done():
            self._start(group)
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

    def _return_acks(self, acks: list[Ack]) -> None:
        """Acks whose fate is unknown (or that were redirected) go another way: an XACK
        twice is harmless, a lost one would deliver the command again."""
        if acks:
            self.sink.ack_elsewhere(acks)

    def _settle_acks(self, acks: list[Ack], replies: list[Any]) -> None:
        redirected: list[Ack] = []
        for ack, reply in zip(acks, replies, strict=True):
            if reply == -1:
                self.metrics.acks_refused.inc()
                log.info("ack refused: the bot is owned by another connection now", extra={"key": ack[0]})
            elif isinstance(reply, hiredis.ReplyError):
                if str(reply).startswith(REDIRECT_ERRORS):
                    redirected.append(ack)
                    continue
                self.metrics.redis_errors.labels("ack").inc()
                log.error("redis refused an ack", extra={"key": ack[0], "error": str(reply)})
        self._return_acks(redirected)

    async def remove(self, bot_id: str) -> None:
        """Stop reading a bot's commands (unsent ones stay pending in Redis)."""
        keys = self._bots.pop(bot_id, None)
        group = self._group_of.pop(bot_id, None)
        if keys is None or group is None:
            return
        group.members.pop(keys.commands, None)
        group.paused.discard(bot_id)
        group.changed()
        await self._wake(group)

    def pause(self, bot_id: str) -> None:
        """Backpressure: the bot's outbox is full, read no more for it."""
        group = self._group_of.get(bot_id)
        if group is not None:
            group.paused.add(bot_id)
            group.changed()

    async def resume(self, bot_id: str) -> None:
        group = self._group_of.get(bot_id)
        if group is None:
            return
        if bot_id in group.paused:
            group.paused.discard(bot_id)
            group.changed()
            await self._wake(group)

    async def _wake(self, group: _Group) -> None:
        if group.task is None or group.task.done() or not group.wake_ready:
            return  # the loop picks up the new member set before it blocks
        try:
            await self.backend.client.xadd(group.wake_key, {b"w": b"1"}, maxlen=1, approximate=False)
        except RedisError as exc:
            # The read loop comes round within command_block_ms anyway.
            log.warning(
                "could not wake command reader",
                extra={"shard": group.shard, "reader": group.index, "error": error_text(exc)},
            )

    async def _open(self, group: _Group, socket_timeout_s: float) -> RawConnection:
        """A connection of this group's own, to the node that serves its shard."""
        host, port = self.backend.node_of(group.wake_key) if self.backend.is_cluster else (None, None)
        conn = self.backend.raw_connection(host, port)
        conn.timeout_s = socket_timeout_s
        try:
            for key in (group.signal_key, group.wake_key):
                await _ensure_group_raw(conn, key)
                await _call(conn, "EXPIRE", key, self.settings.key_ttl_s)
            # Members may have come back while we were away: their groups must exist.
            for key in list(group.members):
                await _ensure_group_raw(conn, key)
        except BaseException:
            conn.close()
            raise
        group.wake_ready = True
        return conn

    async def _read_loop(self, group: _Group) -> None:
        block_ms = self.settings.command_block_ms
        count = self.settings.command_read_count
        socket_timeout_s = block_ms / 1000 + 10
        conn: RawConnection | None = None
        backoff_s = 0.1
        try:
            while not self._stopping and group.members:
                error: Exception | None = None
                try:
                    if conn is None:
                        conn = await self._open(group, socket_timeout_s)
                    started = time.perf_counter()
                    read = group.read_command(self.consumer, count, block_ms)
                    acks, group.acks = group.acks, []
                    if acks:
                        read = encode_commands(ack_args(*ack) for ack in acks) + read
                    # Cancelling here could lose nothing but this connection: it is ours
                    # alone and is closed in the finally below, never pooled.
                    try:
                        *ack_replies, reply = await conn.execute(read, len(acks) + 1)
                    except BaseException:
                        self._return_acks(acks)
                        raise
                    if acks:
                        self._settle_acks(acks, ack_replies)
                    if isinstance(reply, hiredis.ReplyError):
                        raise ResponseError(str(reply))
                except ResponseError as exc:
                    if "NOGROUP" in str(exc) and conn is not None:
                        # A stream (or its group) was deleted under us: recreate and go on.
                        for key in [group.signal_key, group.wake_key, *group.members]:
                            await _ensure_group_raw(conn, key)
                        continue
                    error = exc
                except (RedisError, OSError, TimeoutError) as exc:
                    error = exc
                if error is not None and self.backend.is_cluster:
                    # The slot moved (MOVED), or its node is gone: a dead primary says
                    # nothing, so ask the cluster which node serves the shard now.
                    with contextlib.suppress(RedisError, OSError, TimeoutError):
                        await self.backend.refresh_slots()
                if error is not None:
                    self.metrics.redis_errors.labels("read_commands").inc()
                    log.warning(
                        "command read failed, reconnecting",
                        extra={
                            "shard": group.shard,
                            "reader": group.index,
                            "error": error_text(error),
                            "backoff_s": backoff_s,
                        },
                    )
                    if conn is not None:
                        conn.close()
                    conn = None
                    group.wake_ready = False
                    await asyncio.sleep(backoff_s)
                    backoff_s = min(backoff_s * 2, MAX_BACKOFF_S)
                    continue
                backoff_s = 0.1
                self._read_latency.observe(time.perf_counter() - started)
                for stream_raw, entries in reply or ():
                    stream = stream_raw.decode()
                    decoded = _decode_entries(entries)
                    if stream in (group.signal_key, group.wake_key):
                        if decoded:
                            group.acks.append((stream, tuple(e[0] for e in decoded), None))
                        if stream == group.signal_key:
                            self._on_signals(decoded)
                        continue
                    bot_id = group.members.get(stream)
                    if bot_id is None:
                        # The bot left while this read was in flight: the entries stay
                        # pending and are claimed when it comes back.
                        continue
                    try:
                        # What it wrote in this turn is acked with the read that follows.
                        group.acks += self.sink.deliver(bot_id, decoded)
                    except Exception:
                        # deliver() contains its own failures; this is the last line that
                        # keeps one bot's trouble from stopping every bot of the shard.
                        log.exception("delivering commands failed", extra={"bot_id": bot_id})
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("command reader crashed", extra={"shard": group.shard, "reader": group.index})
            raise
        finally:
            group.wake_ready = False
            acks, group.acks = group.acks, []
            self._return_acks(acks)
            if conn is not None:
                with contextlib.suppress(Exception):
                    await _call(conn, "DEL", group.wake_key)
                    if not self._shard_read_elsewhere(group):
                        await _call(conn, "DEL", group.signal_key)
                conn.close()
            if group.members and not self._stopping:
                # A bot joined while this loop was winding down: carry on for it.
                self._start(group)

    def _shard_read_elsewhere(self, group: _Group) -> bool:
        """Whether another reader of the group's shard still reads the shard's signal stream."""
        return any(
            other is not group
            and other.shard == group.shard
            and other.task is not None
            and not other.task.done()
            for other in self._groups.values()
        )

    async def signal(self, gateway_id: str, keys: BotKeys, **fields: str) -> None:
        """Tell another gateway something about a bot, through its wake stream in the bot's shard slot."""
        wake = self.keyspace.shard_wake(keys.shard, gateway_id)
        pipe = self.backend.client.pipeline(transaction=False)
        pipe.xadd(wake, fields, maxlen=1000, approximate=True)
        pipe.expire(wake, self.settings.key_ttl_s)
        await pipe.execute()

    def _on_signals(self, entries: list[Entry]) -> None:
        for entry_id, fields in entries:
            try:
                self._on_signal(fields)
            except Exception:
                # Anyone who can write to Redis can write here: one bad entry is logged
                # (and acked with the rest), never the end of the shard's reader.
                log.exception("could not handle a signal", extra={"entry_id": entry_id})

    def _on_signal(self, fields: dict[bytes, bytes]) -> None:
        if b"evict" in fields:
            self.sink.evict(
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
            log.warning("reclaim failed", extra={"bot_id": bot_id, "error": error_text(exc)})
            return
        if pending and bot_id in self._bots:
            log.info(
                "delivering commands left by the previous owner",
                extra={"bot_id": bot_id, "count": len(pending)},
            )
            self._return_acks(self.sink.deliver(bot_id, pending))

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
