"""The outbound path: Redis → command reader → validation → outbox and pacing → bot socket.

:class:`Delivery` is told only that a bot's control channel became ready
(:meth:`Delivery.attach`) or went away (:meth:`Delivery.detach`). Between the
two it owns everything about the bot's commands: ownership across gateways
(and eviction of an older owner), the reader's entries, validation and expiry,
the outbox with its pacing, writing to the socket, and acknowledgement.

Delivery is at least once: an entry is XACKed only after it was written to
the socket. Entries written in the reader's own turn of the event loop are
returned to it as acks, which it sends in the same write as its next read;
everything else is acked through the publisher's pipeline.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Mapping
from typing import Any

from redis.exceptions import RedisError
from websockets.exceptions import ConnectionClosed, InvalidState
from websockets.frames import CloseCode

from gateway.close_codes import CloseReason, GatewayCloseCode
from gateway.closing import Closer
from gateway.command_reader import Ack, CommandReader, Entry
from gateway.commands import command_label, entry_time_ms, parse_command
from gateway.exceptions import CommandRejected
from gateway.keys import BotKeys, KeySpace
from gateway.logs import error_text
from gateway.metrics import Metrics
from gateway.outbox import Outbox
from gateway.playback import Outgoing, PlaybackConfig
from gateway.protocol import BOT_SAMPLE_RATE
from gateway.publisher import Publisher
from gateway.redis_conn import RedisBackend
from gateway.sessions import BotConnection, CommandOutbound, SessionRegistry
from gateway.settings import Settings
from gateway.ws_fast_path import BotWebSocket

log = logging.getLogger(__name__)

SETUP_ATTEMPTS = 3


class DeliveryUnavailable(Exception):
    """Redis trouble kept delivery from being set up for a bot; it should come back later."""


class Delivery:
    """Delivers workers' commands to the bots whose control channels this process holds."""

    def __init__(
        self,
        settings: Settings,
        keyspace: KeySpace,
        metrics: Metrics,
        backend: RedisBackend,
        publisher: Publisher,
        registry: SessionRegistry,
        closer: Closer,
    ) -> None:
        self.settings = settings
        self.keyspace = keyspace
        self.metrics = metrics
        self.backend = backend
        self.publisher = publisher
        self.registry = registry
        self.closer = closer
        self.reader = CommandReader(backend, keyspace, settings, metrics, self)
        self.held_bytes = 0  # commands and audio held for all bots (Outbox.reported_bytes summed)
        # Leave a few pooled connections for the health check and wake-ups.
        self._setup_gate = asyncio.Semaphore(max(1, settings.redis_max_connections - 4))
        self._max_age_ms = int(settings.command_max_age_s * 1000)
        self._delivered: dict[str, Any] = {}

    # -- a control channel comes and goes -----------------------------------------

    async def attach(self, conn: BotConnection, keys: BotKeys) -> CommandOutbound:
        """Take the bot over and start delivering its commands to ``conn``.

        Setups are bounded in number (a reconnect storm must queue here, not exhaust
        the pool). Redis trouble is retried; if it persists, :class:`DeliveryUnavailable`:
        a bot is never left connected without command delivery.
        """
        outbound = conn.outbound = CommandOutbound(
            keys,
            Outbox(
                self.settings.outbox_max_commands,
                keys.bot_id,
                PlaybackConfig.from_settings(self.settings),
                limit_bytes=self.settings.outbox_max_bytes,
            ),
        )
        for attempt in range(1, SETUP_ATTEMPTS + 1):
            try:
                async with self._setup_gate:
                    await self._take_ownership(conn, outbound)
                    if outbound.sender is None:
                        outbound.sender = asyncio.create_task(
                            self._send_commands(conn, outbound), name=f"send-{keys.bot_id}"
                        )
                    await self.reader.add(keys)
                # The command stream may have been made just now (by its group): its expiry,
                # set when the bot connected, only applies from now on.
                self.publisher.expire((keys.commands,), self.settings.key_ttl_s)
                return outbound
            except (RedisError, OSError) as exc:
                log.warning(
                    "command delivery setup failed",
                    extra={"bot_id": keys.bot_id, "attempt": attempt, "error": error_text(exc)},
                )
                await asyncio.sleep(0.2 * attempt)
        raise DeliveryUnavailable(keys.bot_id)

    async def detach(self, conn: BotConnection) -> None:
        """The control channel is gone: stop sending; what is unacked stays pending in Redis.

        Called while the connection is still registered: whether it is the bot's current
        control channel (not one a newer connection replaced) is decided here, after the
        last await that could let a newer one in.
        """
        outbound = conn.outbound
        if outbound is None:
            return
        if outbound.sender is not None:
            outbound.sender.cancel()
            # The sender handles its own errors; nothing it raises may keep this attached.
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await outbound.sender
        keys = outbound.keys
        session = self.registry.get(keys.bot_id)
        if session is not None and session.control is conn:
            try:
                await self.reader.remove(keys.bot_id)
            except Exception as exc:
                self.closer.fail(conn, "unbind", exc)
        if outbound.evicted_by is not None:
            # Our unsent or unacked commands are pending under our name: the new owner claims them.
            try:
                await self.reader.signal(outbound.evicted_by, keys, reclaim=keys.bot_id)
            except RedisError as exc:
                log.warning(
                    "could not signal the new owner", extra={"bot_id": keys.bot_id, "error": error_text(exc)}
                )

    async def stop(self) -> None:
        await self.reader.stop()

    async def _take_ownership(self, conn: BotConnection, outbound: CommandOutbound) -> None:
        """Record this connection as the bot's owner; evict the previous one on another gateway."""
        keys = outbound.keys
        owner_key = self.keyspace.owner(keys.bot_id)
        token = f"{self.settings.gateway_id}/{conn.conn_id}"
        outbound.owner = (owner_key, token)
        # Failing here is retried by the caller: delivery must not start unowned.
        previous = await self.backend.client.set(owner_key, token, ex=self.settings.key_ttl_s, get=True)
        if not previous:
            return
        prev_gateway, _, prev_conn = previous.decode().partition("/")
        if prev_gateway != self.settings.gateway_id:
            log.info(
                "taking bot over from another gateway", extra={"bot_id": keys.bot_id, "from": prev_gateway}
            )
            try:
                await self.reader.signal(
                    prev_gateway, keys, evict=keys.bot_id, conn=prev_conn, by=self.settings.gateway_id
                )
            except RedisError as exc:
                log.warning(
                    "could not signal the previous owner",
                    extra={"bot_id": keys.bot_id, "error": error_text(exc)},
                )

    # -- what the command reader hands over (gateway.command_reader.Sink) ------------

    def deliver(self, bot_id: str, entries: list[Entry]) -> list[Ack]:
        """Validate entries into the bot's outbox and write what is due at once.

        Returns the acks of what was written here, for the reader's next read to carry.
        """
        session = self.registry.get(bot_id)
        conn = session.control if session is not None else None
        outbound = conn.outbound if conn is not None else None
        if conn is None or outbound is None:
            return []  # unacked: the entries stay pending and are claimed on reconnect
        outbox = outbound.outbox
        acks: list[Ack] = []
        try:
            now_ms = self.backend.now_ms()
            for entry_id, fields in entries:
                self._accept(outbound.keys, outbox, entry_id, fields, now_ms)
            self._send_due_now(conn, outbound, acks)
            outbox.settle()
            # An interrupt among the entries has dropped audio: say so now, not at the next send.
            self._playback_report(outbound)
            if outbox.full:
                self.metrics.playback_bound_hits.labels(
                    "commands" if outbox.scheduler.command_bytes < outbox.limit_bytes else "command_bytes"
                ).inc()
                self.reader.pause(bot_id)
            elif self.held_bytes > self.settings.commands_max_held_bytes:
                # All bots together hold too much: this one, adding more, waits (unread
                # entries stay in Redis) until the process has room again.
                self.metrics.playback_bound_hits.labels("process_bytes").inc()
                self.reader.pause(bot_id)
                self._resume_when_room(bot_id)
        except Exception as exc:
            # Not one entry's fault (those are rejected in _accept): this bot's state is
            # unknown now. Close it; what was not acked is delivered on its next connection.
            self.closer.fail(conn, "deliver", exc)
            self.closer.close_soon(conn, CloseCode.INTERNAL_ERROR, CloseReason.ERROR, "internal error")
        return acks

    def evict(self, bot_id: str, conn_id: str, by: str) -> None:
        """Another gateway took this bot over: close our (probably half-open) control socket."""
        session = self.registry.get(bot_id)
        conn = session.control if session is not None else None
        if conn is None or conn.conn_id != conn_id:
            return
        log.info("bot taken over by another gateway", extra={"bot_id": bot_id, "by": by})
        if conn.outbound is not None:
            conn.outbound.evicted_by = by
        self.closer.close_for(
            conn, CloseReason.REPLACED, GatewayCloseCode.REPLACED, "replaced by a newer connection"
        )

    def ack_elsewhere(self, acks: list[Ack]) -> None:
        """Acks that no read of the reader carries go with the publisher's writes."""
        for stream, entry_ids, owner in acks:
            self.publisher.ack(stream, entry_ids, owner=owner)

    # -- validation ---------------------------------------------------------------

    def _accept(
        self, keys: BotKeys, outbox: Outbox, entry_id: str, fields: Mapping[Any, Any], now_ms: int
    ) -> None:
        """One entry into the outbox, or exactly one ``command_rejected``, whatever it holds."""
        try:
            command = parse_command(
                fields,
                keys.bot_id,
                entry_id=entry_id,
                max_bytes=self.settings.command_max_bytes,
                max_image_bytes=self.settings.image_max_bytes,
            )
            self._check_age(command.entry_id, command.name, now_ms)
            outbox.put(command, wake=False)
        except CommandRejected as exc:
            if exc.limit is not None:
                self.metrics.playback_bound_hits.labels(exc.limit).inc()
            self._reject(keys, entry_id, exc)
        except Exception as exc:
            self._reject_unprocessable(keys, entry_id, exc)

    def _check_age(self, entry_id: str, name: str, now_ms: int) -> None:
        age_ms = now_ms - entry_time_ms(entry_id)
        if age_ms > self._max_age_ms:
            raise CommandRejected(
                "expired",
                f"written {age_ms / 1000:.1f}s ago, max age {self.settings.command_max_age_s}s",
                name,
            )

    def _reject(self, keys: BotKeys, entry_id: str, exc: CommandRejected) -> None:
        self.metrics.commands_rejected.labels(command_label(exc.command), exc.reason).inc()
        log.warning(
            "command rejected",
            extra={"bot_id": keys.bot_id, "entry_id": entry_id, "reason": exc.reason, "detail": exc.detail},
        )
        self.publisher.event(
            keys,
            "command_rejected",
            "control",
            reason=exc.reason,
            detail=exc.detail,
            entry_id=entry_id,
            command=exc.command,
        )
        self.publisher.ack(keys.commands, (entry_id,))

    def _reject_unprocessable(
        self, keys: BotKeys, entry_id: str, exc: Exception, command: str = "unknown"
    ) -> None:
        """An entry we failed on (a bug of ours): rejected and acked, so that it cannot come
        back on every connection of the bot and block everything behind it."""
        log.error(
            "could not process a command entry, rejecting it",
            extra={"bot_id": keys.bot_id, "entry_id": entry_id},
            exc_info=exc,
        )
        detail = f"the gateway could not process this entry ({type(exc).__name__}); its log has more"
        self._reject(keys, entry_id, CommandRejected("unprocessable", detail, command))

    # -- writing to the socket ------------------------------------------------------

    async def _send_commands(self, conn: BotConnection, outbound: CommandOutbound) -> None:
        """Write what the playback scheduler says, when it says; XACK what is fully handled.

        The scheduler (:mod:`gateway.playback`) orders the lanes (interrupt, commands,
        paced audio); this loop only waits, writes and acknowledges.
        """
        outbox = outbound.outbox
        scheduler = outbox.scheduler
        clock = outbox.clock
        ws = conn.ws
        metrics = self.metrics
        try:
            while True:
                out = scheduler.next_send(clock())
                self._playback_report(outbound)
                if out is None:
                    # Cancelling here loses nothing: unsent entries are unacked in Redis.
                    await outbox.wait(scheduler.next_deadline())
                    continue
                if not self._still_wanted(outbound.keys, out):
                    continue
                data = self._encode_out(outbound.keys, out)
                if data is None:
                    continue
                # Cancelled or broken during this write: the entry stays unacked and is
                # delivered again on the bot's next control connection.
                outbound.sending = True
                try:
                    async with asyncio.timeout(self.settings.send_timeout_s):
                        await ws.send(data, text=True)
                except TimeoutError:
                    # A bot that stops reading must not hold commands (or memory) forever;
                    # the unacked entry is delivered on its next connection.
                    log.warning("bot too slow to take commands, closing", extra={"bot_id": conn.bot_id})
                    self.closer.close_for(
                        conn, CloseReason.TOO_SLOW, GatewayCloseCode.TOO_SLOW, "too slow to read commands"
                    )
                    return
                finally:
                    outbound.sending = False
                self._sent(outbound, out, None)
                if outbox.low:
                    await self.reader.resume(outbound.keys.bot_id)
        except ConnectionClosed:
            return
        except Exception as exc:
            # A bug of ours in this bot's delivery: close it (what is unacked comes again
            # on its next connection) rather than leave it connected with nobody sending.
            self.closer.fail(conn, "send", exc)
            self.closer.close_soon(conn, CloseCode.INTERNAL_ERROR, CloseReason.ERROR, "internal error")
        finally:
            # The bot's queue is gone with its socket: report the utterances it cut off.
            try:
                scheduler.abort(clock())
                self._playback_report(outbound)
            except Exception as exc:
                self.closer.fail(conn, "send", exc)
            metrics.playback_audio_held.dec(outbox.reported_held_s)
            outbox.reported_held_s = 0.0
            self.held_bytes -= outbox.reported_bytes
            outbox.reported_bytes = 0
            metrics.commands_held_bytes.set(self.held_bytes)

    def _send_due_now(self, conn: BotConnection, outbound: CommandOutbound, acks: list[Ack]) -> None:
        """Write what is due from the reader's own turn of the event loop, if nothing can wait.

        Waking the bot's sender task would take one more turn, and under load a turn is
        a pass over every ready socket. Only while that task is not itself writing, and
        only as long as a write cannot block; whatever is left, the sender task takes.
        """
        ws, outbox, sender = conn.ws, outbound.outbox, outbound.sender
        if not isinstance(ws, BotWebSocket) or outbound.sending:
            return
        if sender is None or sender.done():  # not set up yet, or gone with the socket
            return
        scheduler = outbox.scheduler
        keys = outbound.keys
        while ws.can_send_now() and (out := scheduler.next_send(outbox.clock())) is not None:
            if self._still_wanted(keys, out) and (data := self._encode_out(keys, out)) is not None:
                try:
                    ws.send_now(data)
                except (OSError, RuntimeError, InvalidState) as exc:
                    # The socket failed under the write: the entry is unacked, so it is
                    # delivered again on the bot's next connection; the sender sees it close.
                    log.info(
                        "writing a command failed", extra={"bot_id": keys.bot_id, "error": error_text(exc)}
                    )
                    return
                self._sent(outbound, out, acks)

    def _encode_out(self, keys: BotKeys, out: Outgoing) -> bytes | None:
        """The message as UTF-8, or None when it cannot be (rejected and acked instead:
        an entry that fails here would fail again on every connection of the bot)."""
        try:
            return out.text.encode()
        except Exception as exc:
            if out.entry_id:
                self._reject_unprocessable(keys, out.entry_id, exc, out.name)
                extra = [a for a in out.acks if a != out.entry_id]
                if extra:
                    self.publisher.ack(keys.commands, extra)
            return None

    def _still_wanted(self, keys: BotKeys, out: Outgoing) -> bool:
        """False for a command that waited past its maximum age: rejected and acked instead."""
        if out.lane == "command":
            try:
                self._check_age(out.entry_id, out.name, self.backend.now_ms())
            except CommandRejected as exc:
                self._reject(keys, out.entry_id, exc)
                self.publisher.ack(keys.commands, out.acks)
                return False
        return True

    def _sent(self, outbound: CommandOutbound, out: Outgoing, acks: list[Ack] | None) -> None:
        """Written: tell the scheduler, count it, and ack it (``acks``: with the reader's next read)."""
        outbound.outbox.scheduler.sent(out, outbound.outbox.clock())
        self._count_sent(out)
        if out.acks:
            if acks is not None:
                acks.append((outbound.keys.commands, tuple(out.acks), outbound.owner))
            else:
                self.publisher.ack(outbound.keys.commands, out.acks, owner=outbound.owner)

    def _count_sent(self, out: Outgoing) -> None:
        metrics = self.metrics
        delivered = self._delivered.get(out.name)
        if delivered is None:  # one child per command name (a fixed set): labels() costs a lock
            delivered = self._delivered[out.name] = metrics.commands_delivered.labels(out.name)
        delivered.inc()
        if out.lane == "audio":
            metrics.playback_audio_sent.inc(out.samples / BOT_SAMPLE_RATE)
            metrics.playback_lateness.observe(out.late_s)
        else:
            age_ms = self.backend.now_ms() - entry_time_ms(out.entry_id)
            metrics.command_delivery.observe(max(0, age_ms) / 1000)

    def _playback_report(self, outbound: CommandOutbound) -> None:
        """Publish the scheduler's playback events and move its counts into metrics."""
        outbox, keys = outbound.outbox, outbound.keys
        scheduler = outbox.scheduler
        for event in scheduler.take_events():
            self.publisher.event(keys, event.type, "control", None, **event.fields)
            if event.type == "playback_finished":
                self.metrics.playback_utterances.labels("finished").inc()
            elif event.type == "playback_interrupted":
                reason = str(event.fields["reason"])
                self.metrics.playback_utterances.labels(reason).inc()
                self.metrics.playback_audio_cut.labels(reason).inc(int(event.fields["dropped_ms"]) / 1000)
        counts = scheduler.counts
        if counts:
            if counts["coalesced"]:
                self.metrics.chat_coalesced.inc(counts["coalesced"])
            if counts["underruns"]:
                self.metrics.playback_underruns.inc(counts["underruns"])
            counts.clear()
        held_bytes = scheduler.held_bytes
        if held_bytes != outbox.reported_bytes:
            self.held_bytes += held_bytes - outbox.reported_bytes
            outbox.reported_bytes = held_bytes
            self.metrics.commands_held_bytes.set(self.held_bytes)
        held_s = scheduler.held_samples / BOT_SAMPLE_RATE
        if held_s != outbox.reported_held_s:
            self.metrics.playback_audio_held.inc(held_s - outbox.reported_held_s)
            outbox.reported_held_s = held_s

    def _resume_when_room(self, bot_id: str) -> None:
        """Resume a bot paused for the process's sake once the process holds half its bound."""

        def check() -> None:
            session = self.registry.get(bot_id)
            conn = session.control if session is not None else None
            if conn is None or conn.outbound is None:
                return  # gone: its next connection starts afresh
            outbox = conn.outbound.outbox
            # A bot that has sent all it held reads again even while the process is
            # over: it is not the one holding memory (bots that do not read are), and
            # pausing it until they are closed would let them starve it.
            drained = outbox.scheduler.pending_commands == 0
            if (self.held_bytes <= self.settings.commands_max_held_bytes // 2 or drained) and not outbox.full:
                self.closer.spawn(self.reader.resume(bot_id))
            else:
                loop.call_later(0.2, check)

        loop = asyncio.get_running_loop()
        loop.call_later(0.2, check)
