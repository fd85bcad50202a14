"""The per-bot runner: one owned bot's two streams, read in the group's consumer group, handled in order.

``docs/PROTOCOL.md``, "What every instance does", steps 5 and 6: a ``start``
record, the consumer groups, what a previous owner left unacknowledged, then
``XREADGROUP`` on ``{BOT}:events`` and ``{BOT}:audio``, the two merged by entry
id and handled one entry at a time, the lease's local validity checked before
each; ``XACK`` after the handlers returned. When the bot is let go: the
``on_bot_stop`` handlers, a ``stop`` record, the lease released.

A :class:`BotRunner` sees nothing of the :class:`~workers.worker.Worker` that
started it but the :class:`RunnerContext` it is handed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from redis.asyncio.connection import Connection
from redis.exceptions import RedisError, ResponseError

from gateway.logs import error_text
from workers import commands
from workers.audio import AudioFrame
from workers.bot import Bot, Event
from workers.connections import Connections
from workers.constants import PLAYBACK_EVENTS, bot_audio_key, bot_events_key, lease_key
from workers.discovery import Entry, Registry, is_stale, text
from workers.handlers import Handlers
from workers.leases import Journal
from workers.metrics import WorkerMetrics
from workers.settings import WorkerSettings
from workers.stats import WorkerStats

log = logging.getLogger("workers.worker")  # the name the SDK's lines had before the split

_START_EVENTS = (b"connected", b"ready", b"audio_handshake")
#: Events read back when a bot is taken, to know its state (ready, playing...) now.
RESTORE_LOOKBACK = 200


def _pack(*args: str | int) -> bytes:
    """One command in RESP, as redis-py would send it (its packer is a tenth of a read's cost)."""
    out = [b"*%d\r\n" % len(args)]
    for arg in args:
        data = str(arg).encode()
        out.append(b"$%d\r\n%b\r\n" % (len(data), data))
    return b"".join(out)


def _fields(flat: Any) -> dict[bytes, bytes]:
    """An entry's fields from a raw reply: a flat [field, value, ...] list (or a map)."""
    if isinstance(flat, dict):
        return flat
    it = iter(flat or ())
    return dict(zip(it, it, strict=False))


def id_key(entry_id: str) -> tuple[int, int]:
    """A stream entry id as (milliseconds, sequence), to compare and sort."""
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


@dataclass(frozen=True, slots=True)
class RunnerContext:
    """Everything a :class:`BotRunner` may use of the instance that owns the bot.

    ``conns``: the shared pool (the bot's commands, the journal, the registry)
    and a dedicated client per runner for its blocking reads. ``release`` deletes
    leases that are still ours; ``runner_done(runner, reason)`` is called once,
    last, when the runner has let its bot go.
    """

    settings: WorkerSettings
    conns: Connections
    handlers: Handlers
    stats: WorkerStats
    metrics: WorkerMetrics
    journal: Journal
    registry: Registry
    release: Callable[[list[str]], Awaitable[None]]
    runner_done: Callable[[BotRunner, str], None]


class BotRunner:
    """One owned bot: reads its two streams in its consumer group and dispatches in order."""

    def __init__(self, ctx: RunnerContext, bot_id: str, commands_key: str, valid_until: float) -> None:
        s = ctx.settings
        self.ctx = ctx
        self.events_key = bot_events_key(s.key_prefix, bot_id)
        self.audio_key = bot_audio_key(s.key_prefix, bot_id)
        self.lease = lease_key(s.key_prefix, bot_id, s.group)
        self.valid_until = valid_until
        self.bot = Bot(
            bot_id,
            commands_key,
            ctx.conns.client,
            command_maxlen=s.command_maxlen,
            say_chunk_s=s.say_chunk_s,
            name=s.bot_name,
            _owned=self.owned,
        )
        self.task: asyncio.Task[None] | None = None
        self.reading = False
        self.stop_reason: str | None = None
        self.started_at = time.monotonic()
        #: The last read of a stream came back full: we may be behind its head.
        self.behind = False
        #: A handler of one of its entries is running (cancelled if the lease is found lost).
        self.handling = False
        self._groups: set[str] = set()
        self._last_seq: dict[str, int] = {}
        self._last_frame: tuple[str, int, int] | None = None  # conn, seq, entry ms
        self._last_event_ms = 0
        self._last_event_id = ""
        self._gateway = ""  # the gateway of the bot's latest ``connected``
        self._held: dict[str, list[Entry]] = {}
        self._ended = False
        self._records: list[dict[str, str]] = []  # journal records to write before the XACK
        #: Handled, to be acknowledged with the next read (:meth:`_ack_and_read`).
        self._unacked: dict[str, list[str]] = {}
        self._read_at = 0.0  # when the last paced read began (read_interval_ms)
        self._read_commands: dict[tuple[str | int | None, ...], bytes] = {}  # packed once

    @property
    def bot_id(self) -> str:
        return self.bot.bot_id

    def owned(self) -> bool:
        """Whether the lease is still ours by our own clock (the fence on ``Bot.send``)."""
        return time.monotonic() <= self.valid_until

    def lease_lost(self) -> None:
        """Another instance may own the bot now: stop, and cut short a handler that is
        running (its commands are refused anyway: :class:`~workers.bot.LeaseLost`)."""
        self.valid_until = 0.0
        self.request_stop("lease_lost")
        if self.handling and self.task is not None:
            self.task.cancel()

    def request_stop(self, reason: str) -> None:
        # The run loop sees this within one read_block_ms. (Were it cancelled in a
        # read, nothing would be lost either: entries delivered to us and not yet
        # handled stay pending in the group, and the next owner claims them.)
        if self.stop_reason is None:
            self.stop_reason = reason

    def lag(self, audio_head: list[Any], events_head: list[Any]) -> tuple[int, float, float]:
        """How far the streams' heads (``XREVRANGE ... COUNT 1`` replies) are ahead of us:
        audio entries (by ``seq``; a head of a newer connection counts its ``seq`` + 1,
        a lower bound), and seconds of entry time on each stream."""
        entries, audio_s, events_s = 0, 0.0, 0.0
        if audio_head and self._last_frame is not None:
            head_id, raw = audio_head[0]
            conn, seq, ms = self._last_frame
            head_seq = int(raw.get(b"seq", b"0"))
            same = text(raw.get(b"conn", b"")) == conn
            entries = max(0, head_seq - seq) if same else head_seq + 1
            audio_s = max(0.0, (id_key(text(head_id))[0] - ms) / 1000)
        if events_head and self._last_event_ms:
            events_s = max(0.0, (id_key(text(events_head[0][0]))[0] - self._last_event_ms) / 1000)
        return entries, audio_s, events_s

    async def run(self) -> None:
        ctx = self.ctx
        s = ctx.settings
        client = await ctx.conns.dedicated(self.events_key, s.read_block_ms)
        reason = "released"
        try:
            await client.initialize()
            conn = client.connection
            assert conn is not None  # a single-connection client has it once initialized
            # Before anything of the bot is handled: the journal shows who handled it when.
            await ctx.journal.write("start", bot_id=self.bot.bot_id)
            await self._ensure_groups(client)
            # Start handlers see the bot as it is now (ready, taken over), not as new.
            await self._restore(client)
            for fn in ctx.handlers.start:
                await ctx.handlers.call(fn, self.bot)
            if self.events_key not in self._groups:
                self.stop_reason = "expired"  # its keys are gone: the bot left long ago
            if self.stop_reason is None:
                await self._claim_pending(client)
            if self.bot.taken_over:
                ctx.stats.takeovers += 1
                ctx.metrics.takeovers.inc()
            while self.stop_reason is None:
                if time.monotonic() > self.valid_until:
                    self.stop_reason = "lease_lost"
                    break
                if self.audio_key not in self._groups:
                    await self._ensure_groups(client)
                streams = [k for k in (self.events_key, self.audio_key) if k in self._groups]
                block = None if self._ended else s.read_block_ms
                if s.read_interval_ms and not self.behind and not self._ended:
                    await self._pace(s.read_interval_ms / 1000)
                self.reading = True
                try:
                    batches = await self._ack_and_read(conn, streams, block)
                finally:
                    self.reading = False
                if self._ended and not any(batches.values()) and not any(self._held.values()):
                    self.stop_reason = "session_ended"
                    break
                full = {k: len(v) >= s.read_count for k, v in batches.items()}
                self.behind = any(full.values())
                await self._process(batches, full=full)
            # What was handled and not yet acknowledged (the loop ended after a batch).
            await self._ack_and_read(conn, [], None)
            reason = self.stop_reason or "released"
        except asyncio.CancelledError:
            reason = self.stop_reason or "released"
            if self.stop_reason is None:
                raise
        except (RedisError, OSError) as exc:
            ctx.stats.redis_errors += 1
            ctx.metrics.redis_errors.inc()
            reason = "error"
            log.warning(
                "bot stream failed; releasing it", extra={"bot_id": self.bot.bot_id, "error": error_text(exc)}
            )
        finally:
            await asyncio.shield(self._finish(client, reason))

    async def _finish(self, client: Any, reason: str) -> None:
        ctx = self.ctx
        for fn in ctx.handlers.stop:
            await ctx.handlers.call(fn, self.bot, reason)
        # From here the bot may be another instance's: whatever still holds this Bot
        # (a task a handler spawned) can no longer send for it.
        self.valid_until = 0.0
        with contextlib.suppress(RedisError, OSError):
            if reason in ("session_ended", "expired"):
                await self._forget(client)
            # Before the release: the next owner's ``start`` comes after this in the journal.
            await ctx.journal.write("stop", bot_id=self.bot.bot_id, reason=reason)
        with contextlib.suppress(RedisError, OSError):
            if reason != "lease_lost":
                await ctx.release([self.bot.bot_id])
        await client.aclose()
        ctx.runner_done(self, reason)
        log.info("bot let go", extra={"bot_id": self.bot.bot_id, "reason": reason})

    async def _forget(self, client: Any) -> None:
        """The meeting ended: drop the bot from the group's registry, unless it came back."""
        registry = self.ctx.registry
        await registry.forget(self.bot.bot_id)
        # A reconnect's ``connected`` lands on the bot's stream before the global one,
        # so anything newer than what we handled means: it is back, keep it known.
        newest = await client.xrevrange(self.events_key, count=1)
        if newest and text(newest[0][0]) != self._last_event_id:
            await registry.keep(self.bot.bot_id, self.bot.commands_key)

    async def _ensure_groups(self, client: Any) -> None:
        for key in (self.events_key, self.audio_key):
            if key in self._groups:
                continue
            try:
                # From 0: a group that meets a bot for the first time handles what is retained.
                await client.xgroup_create(key, self.ctx.settings.group, id="0")
            except ResponseError as exc:
                message = str(exc)
                if "BUSYGROUP" in message:
                    self.bot.taken_over = True  # someone of this group handled the bot before
                elif "no such key" in message.lower() or "requires the key to exist" in message:
                    continue  # no audio yet; tried again on each round
                else:
                    raise
            self._groups.add(key)

    async def _claim_pending(self, client: Any) -> None:
        """Take over what a previous owner read but did not acknowledge."""
        ctx = self.ctx
        s = ctx.settings
        claimed: dict[str, list[Entry]] = {self.events_key: [], self.audio_key: []}
        for key in list(self._groups):
            cursor = "0-0"
            while True:
                reply = await client.xautoclaim(
                    key, s.group, s.instance_id, min_idle_time=0, start_id=cursor, count=s.read_count
                )
                cursor = text(reply[0])
                for entry in reply[1]:
                    if entry and entry[1]:
                        claimed[key].append(entry)
                    elif entry and entry[0]:  # trimmed away since it was read: nothing to hand over
                        await client.xack(key, s.group, entry[0])
                if cursor == "0-0":
                    break
            await self._drop_idle_consumers(client, key)
        n = sum(len(v) for v in claimed.values())
        if n:
            ctx.stats.entries_claimed += n
            ctx.metrics.entries_claimed.inc(n)
            self.bot.taken_over = True
            log.info("claimed unacknowledged entries", extra={"bot_id": self.bot.bot_id, "entries": n})
            await self._process(claimed, full={})

    async def _drop_idle_consumers(self, client: Any, key: str) -> None:
        s = self.ctx.settings
        with contextlib.suppress(ResponseError):
            for c in await client.xinfo_consumers(key, s.group):
                name = text(c["name"])
                if name != s.instance_id and int(c["pending"]) == 0:
                    await client.xgroup_delconsumer(key, s.group, name)

    async def _ack_and_read(
        self, conn: Connection, streams: list[str], block: int | None
    ) -> dict[str, list[Entry]]:
        """``XACK`` what was handled, then ``XREADGROUP`` ``streams`` (none: only acknowledge),
        in one round trip on the bot's own connection.

        The acknowledgements of a batch go out with the next read, which follows at once:
        still after the handlers returned, and a round trip per read saved, the cost that
        dominates a bot that keeps up (a read takes one or two entries).
        """
        s = self.ctx.settings
        unacked, self._unacked = self._unacked, {}
        commands = [_pack("XACK", key, s.group, *ids) for key, ids in unacked.items()]
        if streams:
            read = self._read_commands.get((*streams, block))
            if read is None:
                args: tuple[str | int, ...] = ("XREADGROUP", "GROUP", s.group, s.instance_id)
                args += ("COUNT", s.read_count) + (("BLOCK", block) if block is not None else ())
                read = self._read_commands[(*streams, block)] = _pack(
                    *args, "STREAMS", *streams, *(">" for _ in streams)
                )
            commands.append(read)
        batches: dict[str, list[Entry]] = {self.events_key: [], self.audio_key: []}
        if not commands:
            return batches
        try:
            await conn.send_packed_command(commands, check_health=False)
            for _ in unacked:
                await conn.read_response()
            reply = await conn.read_response() if streams else None
        except BaseException:
            # Replies may be left unread on the socket: never use it again as it is.
            # (Entries read and not handled stay pending; the next owner claims them.)
            await conn.disconnect(nowait=True)
            raise
        if isinstance(reply, dict):  # RESP3: a map of stream -> entries
            reply = list(reply.items())
        for key, entries in reply or ():
            batches[text(key)] = [(eid, _fields(flat)) for eid, flat in entries]
        return batches

    async def _process(self, batches: dict[str, list[Entry]], full: Mapping[str, bool]) -> None:
        """Merge the two streams by entry id and dispatch, holding back what may be
        overtaken: past the end of a stream's full batch, the other stream could have
        older entries we have not read yet."""
        ctx = self.ctx
        merged: list[tuple[tuple[int, int, int], str, str, Any]] = []
        for key in (self.events_key, self.audio_key):
            entries = self._held.pop(key, []) + list(batches.get(key, ()))
            merged += [(self._order(key, text(eid), raw), key, text(eid), raw) for eid, raw in entries]
        marks = [(id_key(text(batches[k][-1][0]))[0], 1) for k, f in full.items() if f and batches.get(k)]
        mark = min(marks) if marks else None
        merged.sort(key=lambda t: t[0])
        done: dict[str, list[str]] = {self.events_key: [], self.audio_key: []}
        for idk, key, eid, raw in merged:
            if mark is not None and idk[:2] > mark:
                self._held.setdefault(key, []).append((eid, raw))
                continue
            if time.monotonic() > self.valid_until:
                # Our lease may be gone: stop before a new owner could handle the same entry.
                self._held.clear()
                self.stop_reason = "lease_lost"
                break
            stream = "events" if key == self.events_key else "audio"
            began = time.perf_counter()
            self.handling = True
            try:
                if key == self.events_key:
                    await self._dispatch_event(eid, raw)
                else:
                    await self._dispatch_audio(eid, raw)
            finally:
                self.handling = False
            ctx.metrics.handler_seconds[stream].observe(time.perf_counter() - began)
            done[key].append(eid)
        for key, ids in done.items():
            if ids:
                ctx.metrics.entries["events" if key == self.events_key else "audio"].inc(len(ids))
        if not any(done.values()):
            return
        if self._records:
            # Records first: a record may then be written for an entry that comes again
            # (handled twice), never an entry acknowledged without its record. (On the
            # shared pool: in a cluster the journal may live on another node than the bot.)
            records, self._records = self._records, []
            await ctx.journal.write_all(records)
        for key, ids in done.items():
            if ids:
                self._unacked.setdefault(key, []).extend(ids)

    def _order(self, key: str, entry_id: str, raw: Mapping[bytes, bytes]) -> tuple[int, int, int]:
        """Sort key across the two streams. Entry ids are times only to the millisecond
        (the sequence part counts per stream), so within one millisecond a connection's
        start events go before audio, and everything else (ends included) after it."""
        ms, seq = id_key(entry_id)
        if key == self.audio_key:
            return ms, 1, seq
        return ms, 0 if raw.get(b"type") in _START_EVENTS else 2, seq

    async def _pace(self, interval_s: float) -> None:
        """Wait out what is left of ``read_interval_ms`` since the last read began."""
        now = time.monotonic()
        wait_s = self._read_at + interval_s - now
        if wait_s > 0:
            await asyncio.sleep(wait_s)
            now = time.monotonic()
        self._read_at = now

    async def _restore(self, client: Any) -> None:
        """Set the bot's state from the tail of its events stream, handlers untouched.

        A new owner reads on from where the group left off: without this it would never
        see a ``ready`` (or the bot's name, or a playback) an earlier owner handled, and
        a bot whose ``session_ended`` was handled by an owner that died before letting
        it go would be waited on for good. Entries the group has not handled yet come
        again through the handlers as usual; their state is the same.
        """
        if self.events_key not in self._groups:
            return
        tail = await client.xrevrange(self.events_key, count=RESTORE_LOOKBACK)
        for entry_id, raw in reversed(tail):
            f = {text(k): text(v) for k, v in raw.items()}
            self._note(Event(f.get("type", ""), self.bot.bot_id, f, text(entry_id)))
        if tail:
            # What "newer than handled" is measured from when the bot is let go (_forget):
            # a bot whose meeting ended before we took it has not come back.
            self._last_event_id = text(tail[0][0])

    def _note(self, event: Event) -> bool:
        """What a lifecycle event says about the bot; False for a stale one (to be ignored)."""
        bot, f, t = self.bot, event.fields, event.type
        if t in ("disconnected", "session_ended") and is_stale(f, self._gateway):
            # From a gateway the bot has already left for another (a drain, a reconnect):
            # the bot goes on there. Its handlers are not told the meeting ended.
            return False
        if t == "connected":
            bot.connected = True
            self._ended = False
            self._gateway = f.get("gateway") or self._gateway
            bot.commands_key = f.get("commands_key") or bot.commands_key
        elif t == "ready":
            bot.ready = True
            data = event.data or {}
            for name_field in ("bot_name", "display_name", "name"):
                if isinstance(data.get(name_field), str) and not self.ctx.settings.bot_name:
                    bot.name = data[name_field]
                    break
        elif t == "disconnected" and f.get("channel") == "control":
            bot.ready = False
        elif t == "session_ended":
            bot.ready = bot.connected = False
            self._ended = True
        elif t in PLAYBACK_EVENTS:
            bot.note_playback(event)
        return True

    async def _dispatch_event(self, entry_id: str, raw: Mapping[bytes, bytes]) -> None:
        ctx, bot = self.ctx, self.bot
        f = {text(k): text(v) for k, v in raw.items()}
        event = Event(f.get("type", ""), bot.bot_id, f, entry_id)
        self._last_event_id = entry_id
        self._last_event_ms = id_key(entry_id)[0]
        ctx.stats.events += 1
        t = event.type
        if not self._note(event):
            return
        if t == "message" and ctx.settings.conformance:
            await self._answer_ping(event)
        for fn in ctx.handlers.for_event(t):
            await ctx.handlers.call(fn, bot, event)

    async def _answer_ping(self, event: Event) -> None:
        """Conformance mode: ``{"type": "ping", "id": ID}`` from the bot is answered ``pong:ID``."""
        data = event.data or {}
        if data.get("type") == "ping" and isinstance(data.get("id"), str):
            await self.bot.send(commands.sendmsg(f"pong:{data['id']}"))

    async def _dispatch_audio(self, entry_id: str, raw: Mapping[bytes, bytes]) -> None:
        ctx, bot = self.ctx, self.bot
        stats, metrics = ctx.stats, ctx.metrics
        get = raw.get
        frame = AudioFrame(
            bot_id=bot.bot_id,
            speaker_id=text(get(b"speaker_id", b"")),
            speaker_name=text(get(b"speaker_name", b"")),
            pcm=get(b"pcm", b""),
            sample_rate=int(get(b"sample_rate", b"48000")),
            seq=int(get(b"seq", b"-1")),
            conn=text(get(b"conn", b"")),
            ts_ms=int(get(b"ts", b"0")),
            entry_id=entry_id,
        )
        stats.frames += 1
        self._last_frame = (frame.conn, frame.seq, id_key(entry_id)[0])
        if ctx.settings.conformance:
            self._records.append(
                ctx.journal.record(
                    "frame",
                    bot_id=bot.bot_id,
                    conn=frame.conn,
                    seq=frame.seq,
                    entry_id=entry_id,
                    at=int(time.time() * 1000),
                )
            )
        last = self._last_seq.get(frame.conn)
        if last is not None:
            if frame.seq > last + 1:
                stats.seq_gaps += frame.seq - last - 1
                metrics.seq_gaps.inc(frame.seq - last - 1)
                log.warning(
                    "audio frames missing",
                    extra={
                        "bot_id": bot.bot_id,
                        "conn": frame.conn,
                        "after_seq": last,
                        "missing": frame.seq - last - 1,
                    },
                )
            elif frame.seq <= last:
                stats.seq_repeats += 1
                metrics.seq_repeats.inc()
        self._last_seq[frame.conn] = max(frame.seq, last if last is not None else -1)
        if ctx.settings.exclude_own_voice and bot.name and frame.speaker_name == bot.name:
            stats.own_voice_skipped += 1
            metrics.own_voice_skipped.inc()
            return
        for fn in ctx.handlers.audio:
            await ctx.handlers.call(fn, bot, frame)


async def sample_lag(client: Any, runners: list[BotRunner]) -> tuple[int, dict[str, float]]:
    """How far these runners' streams are ahead of what they handled (one pipeline):
    the most audio entries, and the most seconds per stream."""
    entries, seconds = 0, {"audio": 0.0, "events": 0.0}
    if not runners:
        return entries, seconds
    pipe = client.pipeline(transaction=False)
    for r in runners:
        pipe.xrevrange(r.audio_key, count=1)
        pipe.xrevrange(r.events_key, count=1)
    heads = await pipe.execute()
    for i, r in enumerate(runners):
        n, audio_s, events_s = r.lag(heads[2 * i], heads[2 * i + 1])
        entries = max(entries, n)
        seconds["audio"] = max(seconds["audio"], audio_s)
        seconds["events"] = max(seconds["events"], events_s)
    return entries, seconds
