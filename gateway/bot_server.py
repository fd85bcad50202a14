"""The bot side: a WebSocket server for Meetstream bots' audio and control channels.

This module only moves data: bytes are decoded by :mod:`gateway.protocol`,
commands validated by :mod:`gateway.commands`, and everything bound for Redis
is handed to the :class:`~gateway.publisher.Publisher` without awaiting it.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import fcntl
import functools
import http
import logging
import math
import termios
import time
import weakref
from collections.abc import Mapping
from typing import Any

from redis.exceptions import RedisError
from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed, InvalidState
from websockets.http11 import Request, Response

from gateway.admission import Admission
from gateway.auth import AuthError, Claims, check_bot, redact_query, split_secrets, token_from_request, verify
from gateway.command_reader import Ack, CommandReader, Entry
from gateway.commands import Command, command_label, entry_time_ms, parse_command
from gateway.exceptions import BadRoute, CommandRejected, FrameError, MessageError
from gateway.keys import BotKeys, KeySpace
from gateway.logs import RateLimiter
from gateway.metrics import Metrics
from gateway.overload import LoadShedder
from gateway.playback import Outgoing, PlaybackConfig
from gateway.protocol import (
    BOT_SAMPLE_RATE,
    Route,
    handshake_bot_id,
    is_legacy_chunk,
    parse_json_message,
    parse_legacy_chunk,
    parse_path,
)
from gateway.publisher import Publisher
from gateway.redis_conn import RedisBackend
from gateway.sessions import BotConnection, BotWebSocket, Outbox, SessionRegistry
from gateway.settings import Settings

log = logging.getLogger(__name__)

# Close codes (4000-4999 are ours; see docs/PROTOCOL.md).
CLOSE_BAD_REQUEST = 4400
CLOSE_HANDSHAKE_TIMEOUT = 4408
CLOSE_REPLACED = 4409
CLOSE_SERVICE_RESTART = 1012
CLOSE_MESSAGE_TOO_BIG = 1009
CLOSE_INTERNAL_ERROR = 1011
CLOSE_TRY_AGAIN = 1013
SETUP_ATTEMPTS = 3
KEEPALIVE_TICKS = 10  # keepalive checks per ping interval: how finely pings are spread
KEEPALIVE_SLICES = 10  # each check of all connections is spread over this many loop turns
MAX_PAUSE_S = 1.0  # longest backpressure pause; then at least as long reading
CLOSE_FORBIDDEN = 4403
CLOSE_POLICY_VIOLATION = 1008
CLOSE_IDLE = 4410
CLOSE_TOO_SLOW = 4429

#: Close codes that say why a connection ended better than how the handler left.
_CLOSE_CODE_REASONS = {
    CLOSE_REPLACED: "replaced",
    CLOSE_SERVICE_RESTART: "shutdown",
    CLOSE_MESSAGE_TOO_BIG: "message_too_big",
    CLOSE_INTERNAL_ERROR: "error",
    CLOSE_TRY_AGAIN: "error",
    CLOSE_IDLE: "idle",
    CLOSE_TOO_SLOW: "too_slow",
    CLOSE_POLICY_VIOLATION: "policy_violation",
}

_CLOSE_REASON_TEXT = {
    "bot_id_mismatch": "bot_id mismatch between path and handshake",
    "bad_bot_id": "invalid bot_id",
    "no_bot_id": "bot_id unknown: handshake has none and the path names none",
}


def unread_bytes(ws: ServerConnection) -> int:
    """Bytes the kernel holds for this socket that we have not read (0 where unknown)."""
    sock = ws.transport.get_extra_info("socket")
    if sock is None:
        return 0
    try:
        buf = array.array("i", [0])
        fcntl.ioctl(sock.fileno(), termios.FIONREAD, buf)
        return buf[0]
    except (OSError, ValueError):
        return 0


def send_ping(ws: ServerConnection) -> None:
    """Write a ping now, with no pong waiter: the answer is seen in ``BotWebSocket.pong_at``.

    ``await ws.ping()`` needs a task per ping and a future per pong; the keepalive
    only needs to know that something came back.
    """
    # Closing (InvalidState) or the transport gone: the close handshake decides.
    with contextlib.suppress(InvalidState, OSError, RuntimeError):
        ws.protocol.send_ping(b"ka")
        ws.send_data()


class _CloseWith(Exception):
    """Leave a connection handler, closing with this code and metric reason."""

    def __init__(self, code: int, reason: str, text: str) -> None:
        super().__init__(code, reason, text)
        self.code, self.reason, self.text = code, reason, text


class BotServer:
    """Handles bot connections; :meth:`handler` and :meth:`process_request` go to ``serve``."""

    def __init__(
        self,
        settings: Settings,
        keyspace: KeySpace,
        metrics: Metrics,
        backend: RedisBackend,
        publisher: Publisher,
    ) -> None:
        self.settings = settings
        self.keyspace = keyspace
        self.metrics = metrics
        self.backend = backend
        self.publisher = publisher
        self.registry = SessionRegistry()
        self.reader = CommandReader(
            backend, keyspace, settings, metrics, self._deliver, self._evicted, self._ack_elsewhere
        )
        self.draining = False
        self.shedder = LoadShedder(settings.overload_lag_s, metrics)
        # Leave a few pooled connections for the health check and wake-ups.
        self._setup_gate = asyncio.Semaphore(max(1, settings.redis_max_connections - 4))
        publisher.on_backlog = self._pause_audio
        publisher.may_pause = self._may_pause
        self._no_pause_until = 0.0
        self._pause_timer: asyncio.TimerHandle | None = None
        self._resume_from = 0  # where the next resume of audio sockets starts (fairness)
        self._clock = time.monotonic  # the event loop's clock, without a lookup per frame
        self._audio_in = metrics.audio_in
        self._shed = metrics.dropped.labels("overload")
        self._log_limit = RateLimiter(burst=5, interval_s=10.0)
        self._max_age_ms = int(settings.command_max_age_s * 1000)
        self._delivered: dict[str, Any] = {}
        self._background: set[asyncio.Task[Any]] = set()
        self._secrets = split_secrets(settings.auth_secret)
        self._claims: weakref.WeakKeyDictionary[ServerConnection, Claims] = weakref.WeakKeyDictionary()
        self.admission = Admission(settings, self._clock)
        self.held_bytes = 0  # commands and audio held for all bots (Outbox.reported_bytes summed)
        self.open_connections = 0

    # -- HTTP, before the upgrade ---------------------------------------------

    def is_ready(self) -> bool:
        return self.publisher.healthy and not self.draining and not self.shedder.overloaded

    def process_request(self, connection: ServerConnection, request: Request) -> Response | None:
        """Answer probes, and refuse what must not be upgraded: before any WebSocket exists."""
        path = redact_query(request.path)
        if path == "/healthz":
            return connection.respond(http.HTTPStatus.OK, "ok\n")
        if path == "/readyz":
            if self.is_ready():
                return connection.respond(http.HTTPStatus.OK, "ready\n")
            return connection.respond(http.HTTPStatus.SERVICE_UNAVAILABLE, "not ready\n")
        if self.draining:
            return self._refuse(connection, http.HTTPStatus.SERVICE_UNAVAILABLE, "draining", path)
        if self.open_connections >= self.settings.max_connections:
            return self._refuse(connection, http.HTTPStatus.SERVICE_UNAVAILABLE, "over_capacity", path)
        if self.shedder.overloaded:
            # Out of CPU: the bots here come first; a new one goes to a replica with room.
            return self._refuse(connection, http.HTTPStatus.SERVICE_UNAVAILABLE, "overloaded", path)
        try:
            route = parse_path(request.path)
        except BadRoute as exc:
            status = http.HTTPStatus.BAD_REQUEST if exc.reason == "bad_bot_id" else http.HTTPStatus.NOT_FOUND
            return self._refuse(connection, status, "bad_path", path, exc.detail)
        bot_id, slot = route.bot_id, route.bot_id
        if self._secrets:
            try:
                token = token_from_request(request.path, request.headers.get("Authorization"))
                claims = verify(self._secrets, token)
                check_bot(claims, route.bot_id)
            except AuthError as exc:
                return self._refuse(connection, http.HTTPStatus(exc.status), exc.reason, path, exc.detail)
            self._claims[connection] = claims
            bot_id = bot_id or claims.bot
            slot = bot_id or self.admission.token_key(token)
        if slot is not None:
            refused = self.admission.admit_connection(slot, bot_id)
            if refused is not None:
                return self._refuse(connection, http.HTTPStatus.TOO_MANY_REQUESTS, refused, path)
        if isinstance(connection, BotWebSocket):
            self._arm(connection, route.channel, slot)
        elif slot is not None:
            self.admission.release(slot)
        return None

    def _arm(self, ws: BotWebSocket, channel: str, slot: str | None) -> None:
        """Bounds that hold from the first byte after the upgrade, before any handler runs."""
        ws.budget = self.admission.unbound_budget()
        ws.text_max = (
            self.settings.control_max_message_bytes
            if channel == "control"
            else self.settings.audio_text_max_bytes
        )
        ws.write_buffer_max = self.settings.ws_write_buffer_max_bytes
        if slot is not None:
            ws.release = functools.partial(self.admission.release, slot)

    def _refuse(
        self, connection: ServerConnection, status: http.HTTPStatus, reason: str, path: str, detail: str = ""
    ) -> Response:
        self.metrics.connections_refused.labels(reason).inc()
        if self._log_limit.allow(f"refuse:{reason}"):
            # The path is logged without its query string: that is where tokens travel.
            log.warning(
                "refused connection",
                extra={"status": int(status), "reason": reason, "path": path[:200], "detail": detail},
            )
        return connection.respond(status, f"{detail or status.phrase}\n")

    # -- connections ----------------------------------------------------------

    async def handler(self, ws: ServerConnection) -> None:
        assert ws.request is not None  # the handler runs after the opening handshake
        route = parse_path(ws.request.path)  # checked in process_request
        conn = BotConnection(ws, route.channel)
        channel = route.channel
        self.metrics.connections.labels(channel).inc()
        self.metrics.connections_opened.labels(channel).inc()
        self.open_connections += 1
        conn.last_rx = self._clock()
        conn.handshake_deadline = asyncio.get_running_loop().time() + self.settings.handshake_timeout_s
        if isinstance(ws, BotWebSocket):
            ws.on_refused = functools.partial(self._refused, conn)
            ws.on_write_overflow = functools.partial(self._write_overflow, conn)
            ws.on_failure = functools.partial(self._fail, conn, "receive")
        close_reason = "bot_left"
        if self.settings.idle_timeout_s > 0:
            self._idle_watchdog(conn)
        try:
            if route.bot_id is not None:
                self._bind(conn, route.bot_id)
            if channel == "audio":
                await self._run_audio(conn, route)
            else:
                await self._run_control(conn, route)
        except _CloseWith as close:
            close_reason = close.reason
            log.warning(
                "closing bot connection",
                extra={"bot_id": conn.bot_id, "channel": channel, "code": close.code, "reason": close.reason},
            )
            await self._close(ws, close.code, close.text)
        except ConnectionClosed:
            pass
        except Exception as exc:
            # A bug of ours, in this bot's handling only: close it, never leave it half-attached.
            self._fail(conn, "receive", exc)
            await self._close(ws, CLOSE_INTERNAL_ERROR, "internal error")
        finally:
            if conn.watchdog is not None:
                conn.watchdog.cancel()
            # A peer that never answers our close leaves code 1006: our own decision says why.
            close_reason = conn.close_reason or _CLOSE_CODE_REASONS.get(ws.close_code, close_reason)  # type: ignore[arg-type]
            self.open_connections -= 1
            self.metrics.connections.labels(channel).dec()
            self.metrics.connections_closed.labels(channel, close_reason).inc()
            try:
                await self._unbind(conn)
            except Exception as exc:
                self._fail(conn, "unbind", exc)

    def _bind(self, conn: BotConnection, bot_id: str) -> BotKeys:
        claims = self._claims.get(conn.ws)
        if claims is not None and claims.bot is not None and claims.bot != bot_id:
            # A bare path: the token's bot could only be checked once the handshake named one.
            raise _CloseWith(CLOSE_FORBIDDEN, "wrong_bot", "token is bound to another bot")
        ws = conn.ws
        if isinstance(ws, BotWebSocket):
            if ws.release is None:
                # A bare path with no bot in its token: its slot is the bot's, from now on.
                refused = self.admission.admit_connection(bot_id, bot_id)
                if refused is not None:
                    raise _CloseWith(CLOSE_POLICY_VIOLATION, "policy_violation", "too many connections")
                ws.release = functools.partial(self.admission.release, bot_id)
            # From now on what it sends counts against its bot, whatever connection it uses.
            ws.budget = self.admission.budget(bot_id, conn.channel)
        keys = self.keyspace.bot(bot_id)
        conn.bot_id = bot_id
        _session, created, replaced = self.registry.attach(keys, conn)
        self.metrics.bots.set(len(self.registry))
        if created:
            self.publisher.expire(self._expiring(keys), self.settings.key_ttl_s)
        self.publisher.event(
            keys,
            "connected",
            conn.channel,
            conn=conn.conn_id,
            gateway=self.settings.gateway_id,
            **keys.as_fields(),
        )
        log.info(
            "bot connected",
            extra={"bot_id": bot_id, "channel": conn.channel, "conn": conn.conn_id, "new_session": created},
        )
        if replaced is not None:
            log.info("newer connection replaces older", extra={"bot_id": bot_id, "channel": conn.channel})
            replaced.close_reason = "replaced"
            self._spawn(self._close(replaced.ws, CLOSE_REPLACED, "replaced by a newer connection"))
        return keys

    async def _unbind(self, conn: BotConnection) -> None:
        if conn.sender is not None:
            conn.sender.cancel()
            # The sender handles its own errors (_fail); nothing it raises may keep
            # this connection attached.
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await conn.sender
        session, current, ended = self.registry.detach(conn)
        if session is None:
            return
        keys = session.keys
        self.metrics.bots.set(len(self.registry))
        code = conn.ws.close_code if conn.ws.close_code is not None else 1006
        self.publisher.event(
            keys,
            "disconnected",
            conn.channel,
            conn=conn.conn_id,
            code=code,
            reason=conn.ws.close_reason or "",
            # Which gateway says so: a bot may be connected to another one already.
            gateway=self.settings.gateway_id,
        )
        log.info(
            "bot disconnected",
            extra={"bot_id": keys.bot_id, "channel": conn.channel, "code": code, "session_ended": ended},
        )
        if current and conn.channel == "control" and conn.ready:
            try:
                await self.reader.remove(keys.bot_id)
            except Exception as exc:
                self._fail(conn, "unbind", exc)
        if conn.evicted_by is not None:
            # Our unsent or unacked commands are pending under our name: the new owner claims them.
            with contextlib.suppress(RedisError):
                await self.reader.signal(conn.evicted_by, keys, reclaim=keys.bot_id)
        if ended:
            self.publisher.event(keys, "session_ended", conn.channel, gateway=self.settings.gateway_id)
            self.publisher.expire(self._expiring(keys), self.settings.key_ttl_s)

    def _idle_watchdog(self, conn: BotConnection) -> None:
        """Close a connection silent for ``idle_timeout_s``: checked every half period, so a
        frame costs one attribute write, not a timer reschedule."""
        loop = asyncio.get_running_loop()
        idle_s = self.settings.idle_timeout_s
        conn.last_rx = self._clock()

        def check() -> None:
            if self._clock() - conn.last_rx > idle_s:
                conn.close_reason = "idle"
                self._spawn(self._close(conn.ws, CLOSE_IDLE, "idle timeout"))
            else:
                conn.watchdog = loop.call_later(idle_s / 2, check)

        conn.watchdog = loop.call_later(idle_s / 2, check)

    def _refused(self, conn: BotConnection, reason: str, data_frame: bool) -> None:
        """A message over the bot's rate, bytes or size: dropped by the socket before any
        work. One that keeps going after a whole burst was dropped is closed (1008).

        The burst matters: after backpressure, a network hiccup, or a Redis that fell
        behind, a healthy bot's frames arrive in a catch-up burst, and that is not
        abuse (with 2 s of burst, 1,000 bots x 20 ms on a saturated machine lost 5%
        of their audio this way).
        """
        if data_frame and conn.frames is not None:
            conn.seq += 1  # a frame dropped by policy still takes a seq: workers see the gap
        self._drop(conn, reason)
        ws = conn.ws  # a BotWebSocket: only it reports refusals
        if isinstance(ws, BotWebSocket) and ws.budget is not None and ws.budget.violating and not ws.discard:
            log.warning(
                "bot keeps sending over its limits, closing",
                extra={"bot_id": conn.bot_id, "channel": conn.channel, "reason": reason},
            )
            conn.close_reason = "policy_violation"
            ws.fail_now(CLOSE_POLICY_VIOLATION, "rate limit exceeded")

    def _write_overflow(self, conn: BotConnection) -> None:
        """We hold more unread output for this peer than allowed (pongs to a ping flood it
        never reads): drop the connection rather than grow without bound."""
        ws = conn.ws
        if isinstance(ws, BotWebSocket) and not ws.discard:
            log.warning(
                "bot does not read what we send, closing",
                extra={
                    "bot_id": conn.bot_id,
                    "channel": conn.channel,
                    "buffered": ws.transport.get_write_buffer_size(),
                },
            )
            conn.close_reason = "write_buffer_full"
            ws.discard = True
            ws.transport.abort()

    def _drop(self, conn: BotConnection, reason: str, detail: str = "") -> None:
        self.metrics.dropped.labels(reason).inc()
        if self._log_limit.allow(f"{conn.bot_id}:{reason}"):
            log.warning(
                "dropped bot input",
                extra={"bot_id": conn.bot_id, "channel": conn.channel, "reason": reason, "detail": detail},
            )

    def _settle_handshake(self, conn: BotConnection, handshake: dict[str, Any], route: Route) -> BotKeys:
        """Check a handshake's bot_id against the path (and token), bind the connection if
        the path named no bot, and mark it ready."""
        try:
            bot_id = handshake_bot_id(handshake, route)
        except BadRoute as exc:
            raise self._bad_route(exc) from None
        keys = self._bind(conn, bot_id) if conn.bot_id is None else self.keyspace.bot(bot_id)
        conn.ready = True
        return keys

    def _bad_route(self, exc: BadRoute) -> _CloseWith:
        return _CloseWith(CLOSE_BAD_REQUEST, exc.reason, _CLOSE_REASON_TEXT.get(exc.reason, "bad request"))

    async def _recv_handshake(self, conn: BotConnection) -> str | bytes:
        """Receive within the handshake timeout; a bot that stays silent is closed."""
        try:
            # One deadline from the upgrade: a byte now and then does not hold a slot forever.
            async with asyncio.timeout_at(conn.handshake_deadline):
                return await conn.ws.recv()
        except TimeoutError:
            raise _CloseWith(CLOSE_HANDSHAKE_TIMEOUT, "handshake_timeout", "handshake timeout") from None

    # -- audio channel ----------------------------------------------------------

    async def _run_audio(self, conn: BotConnection, route: Route) -> None:
        ws = conn.ws
        # On a bare /audio path the bot_id comes with the handshake: until then
        # nothing can be attributed, so binary frames are dropped (and counted).
        while conn.bot_id is None:
            message = await self._recv_handshake(conn)
            if isinstance(message, bytes):
                self._drop(conn, "before_handshake")
                continue
            self._audio_text(conn, route, message)
        conn.audio_keys = self.keyspace.bot(conn.bot_id)
        conn.conn_b = conn.conn_id.encode()
        conn.frames = self.publisher.frame_encoder(conn.audio_keys, conn.conn_b)

        if isinstance(ws, BotWebSocket):
            ws.on_binary = functools.partial(self._audio_message, conn, route)  # no Python frame of its own
        # Cancelling this loop loses nothing accepted: each message is handed to the
        # publisher synchronously, before the next await. Most binary frames do not
        # even come through here (see BotWebSocket); text frames always do.
        async for message in ws:
            self._audio_message(conn, route, message)

    def _audio_message(self, conn: BotConnection, route: Route, message: str | bytes) -> None:
        """One message on a bound audio channel: the hot path, run for every frame.

        A frame dropped by policy (rate, overload) still takes a seq number, so
        workers see the gap.
        """
        conn.last_rx = self._clock()
        if isinstance(message, bytes):
            ratio = self.shedder.ratio
            if ratio:
                # Overloaded: shed before any decoding, evenly across connections.
                conn.shed_acc += ratio
                if conn.shed_acc >= 1.0:
                    conn.shed_acc -= 1.0
                    self._shed.inc()
                    conn.seq += 1
                    return
            try:
                size = self.publisher.audio_frame(conn.frames, message, conn.seq)  # type: ignore[arg-type]
            except FrameError as exc:
                self._drop(conn, exc.reason, exc.detail)
                return
        else:
            frame = self._audio_text(conn, route, message)
            if frame is None:
                return
            size = len(frame.pcm)
            trim = conn.frames.trim if conn.frames is not None else None
            try:
                self.publisher.audio(conn.audio_keys, frame, conn.seq, conn.conn_b, trim)  # type: ignore[arg-type]
            except FrameError as exc:
                self._drop(conn, exc.reason, exc.detail)
                return
        audio_in = self._audio_in
        audio_in.frames += 1
        audio_in.bytes += size
        conn.seq += 1

    def _audio_text(self, conn: BotConnection, route: Route, text: str):  # type: ignore[no-untyped-def]
        """A text frame on the audio channel: the handshake, a legacy PCMChunk, or a message."""
        self.metrics.messages_received.labels("audio").inc()
        try:
            # Published as the bot sent it when strict JSON, re-serialised strictly if not.
            obj, text = parse_json_message(text)
        except MessageError as exc:
            self._drop(conn, exc.reason)
            return None
        if is_legacy_chunk(obj):
            if conn.bot_id is None and route.bot_id is None:
                self._drop(conn, "before_handshake")
                return None
            try:
                return parse_legacy_chunk(obj)
            except FrameError as exc:
                self._drop(conn, exc.reason, exc.detail)
                return None
        if not conn.ready:
            keys = self._settle_handshake(conn, obj, route)
            # The handshake is kept whole, as the bot sent it.
            self.publisher.event(keys, "audio_handshake", "audio", data=text, conn=conn.conn_id)
            return None
        self.publisher.event(self.keyspace.bot(conn.bot_id), "message", "audio", data=text)  # type: ignore[arg-type]
        return None

    # -- control channel --------------------------------------------------------

    async def _run_control(self, conn: BotConnection, route: Route) -> None:
        ws = conn.ws
        while not conn.ready:
            message = await self._recv_handshake(conn)
            if isinstance(message, bytes):
                self._drop(conn, "binary_on_control")
                continue
            self.metrics.messages_received.labels("control").inc()
            try:
                obj, message = parse_json_message(message)
            except MessageError as exc:
                self._drop(conn, exc.reason)
                continue
            if obj.get("type") != "ready":
                if conn.bot_id is None:
                    self._drop(conn, "before_handshake")
                else:
                    self.publisher.event(self.keyspace.bot(conn.bot_id), "message", "control", data=message)
                continue
            keys = self._settle_handshake(conn, obj, route)
            bot_id = keys.bot_id
            conn.outbox = Outbox(
                self.settings.outbox_max_commands,
                bot_id,
                PlaybackConfig.from_settings(self.settings),
                limit_bytes=self.settings.outbox_max_bytes,
            )
            self.publisher.event(keys, "ready", "control", data=message, conn=conn.conn_id)
            await self._start_delivery(conn, keys)

        keys = self.keyspace.bot(conn.bot_id)  # type: ignore[arg-type]
        clock = self._clock
        async for message in ws:
            # Rate, bytes and (unfragmented) size were checked by the socket (_arm, _refused).
            conn.last_rx = clock()
            if isinstance(message, bytes):
                self._drop(conn, "binary_on_control")
                continue
            if len(message) > self.settings.control_max_message_bytes:  # a fragmented one
                self._drop(conn, "too_large", f"{len(message)} characters")
                continue
            self.metrics.messages_received.labels("control").inc()
            try:
                _, message = parse_json_message(message)
            except MessageError as exc:
                self._drop(conn, exc.reason)
                continue
            # Anything a bot says is published, never dropped: the vendor may add messages.
            self.publisher.event(keys, "message", "control", data=message)

    def _deliver(self, bot_id: str, entries: list[Entry]) -> None:
        """Called by the command reader: validate entries into the bot's outbox."""
        session = self.registry.get(bot_id)
        conn = session.control if session is not None else None
        if conn is None or conn.outbox is None:
            return  # unacked: the entries stay pending and are claimed on reconnect
        keys = session.keys  # type: ignore[union-attr]
        outbox = conn.outbox
        try:
            now_ms = self.backend.now_ms()
            for entry_id, fields in entries:
                self._accept(keys, outbox, entry_id, fields, now_ms)
            self._send_due_now(conn, keys)
            outbox.settle()
            # An interrupt among the entries has dropped audio: say so now, not at the next send.
            self._playback_report(keys, outbox)
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
            self._fail(conn, "deliver", exc)
            self._close_soon(conn, CLOSE_INTERNAL_ERROR, "error", "internal error")

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
            self._check_age(command, now_ms)
            outbox.put(command, wake=False)
        except CommandRejected as exc:
            if exc.reason == "queue_full":
                self.metrics.playback_bound_hits.labels(
                    "entries" if "entries" in exc.detail else "held_seconds"
                ).inc()
            self._reject(keys, entry_id, exc)
        except Exception as exc:
            self._reject_unprocessable(keys, entry_id, exc)

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

    def _fail(self, conn: BotConnection, stage: str, exc: BaseException) -> None:
        """Count and log an unexpected error inside one bot's handling."""
        self.metrics.bot_failures.labels(stage).inc()
        conn.close_reason = conn.close_reason or "error"
        log.error(
            "bot handling failed",
            extra={"bot_id": conn.bot_id, "channel": conn.channel, "stage": stage},
            exc_info=exc,
        )

    def _close_soon(self, conn: BotConnection, code: int, reason: str, text: str) -> None:
        """Close a connection from code that must not wait (a reader's or the socket's turn)."""
        if conn.close_reason is None or conn.close_reason == "error":
            conn.close_reason = reason
        self._spawn(self._close(conn.ws, code, text))

    def _resume_when_room(self, bot_id: str) -> None:
        """Resume a bot paused for the process's sake once the process holds half its bound."""

        def check() -> None:
            session = self.registry.get(bot_id)
            if session is None or session.control is None or session.control.outbox is None:
                return  # gone: its next connection starts afresh
            outbox = session.control.outbox
            # A bot that has sent all it held reads again even while the process is
            # over: it is not the one holding memory (bots that do not read are), and
            # pausing it until they are closed would let them starve it.
            drained = outbox.scheduler.pending_commands == 0
            if (self.held_bytes <= self.settings.commands_max_held_bytes // 2 or drained) and not outbox.full:
                self._spawn(self.reader.resume(bot_id))
            else:
                loop.call_later(0.2, check)

        loop = asyncio.get_running_loop()
        loop.call_later(0.2, check)

    def _ack_elsewhere(self, acks: list[Ack]) -> None:
        """Acks the reader could not send with its next read go with the publisher's writes."""
        for stream, entry_ids, owner in acks:
            self.publisher.ack(stream, entry_ids, owner=owner)

    def _check_age(self, command: Command, now_ms: int) -> None:
        age_ms = now_ms - entry_time_ms(command.entry_id)
        if age_ms > self._max_age_ms:
            raise CommandRejected(
                "expired",
                f"written {age_ms / 1000:.1f}s ago, max age {self.settings.command_max_age_s}s",
                command.name,
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

    async def _send_commands(self, conn: BotConnection, keys: BotKeys) -> None:
        """Write what the playback scheduler says, when it says; XACK what is fully handled.

        The scheduler (:mod:`gateway.playback`) orders the lanes (interrupt, commands,
        paced audio); this loop only waits, writes and acknowledges.
        """
        outbox = conn.outbox
        if outbox is None:  # set before this task starts
            return
        scheduler = outbox.scheduler
        clock = outbox.clock
        ws = conn.ws
        metrics = self.metrics
        try:
            while True:
                out = scheduler.next_send(clock())
                self._playback_report(keys, outbox)
                if out is None:
                    # Cancelling here loses nothing: unsent entries are unacked in Redis.
                    await outbox.wait(scheduler.next_deadline())
                    continue
                if not self._still_wanted(keys, out):
                    continue
                data = self._encode_out(keys, out)
                if data is None:
                    continue
                # Cancelled or broken during this write: the entry stays unacked and is
                # delivered again on the bot's next control connection.
                conn.sending = True
                try:
                    async with asyncio.timeout(self.settings.send_timeout_s):
                        await ws.send(data, text=True)
                except TimeoutError:
                    # A bot that stops reading must not hold commands (or memory) forever;
                    # the unacked entry is delivered on its next connection.
                    log.warning("bot too slow to take commands, closing", extra={"bot_id": keys.bot_id})
                    conn.close_reason = "too_slow"
                    self._spawn(self._close(ws, CLOSE_TOO_SLOW, "too slow to read commands"))
                    return
                finally:
                    conn.sending = False
                self._sent(conn, keys, out)
                if outbox.low:
                    await self.reader.resume(keys.bot_id)
        except ConnectionClosed:
            return
        except Exception as exc:
            # A bug of ours in this bot's delivery: close it (what is unacked comes again
            # on its next connection) rather than leave it connected with nobody sending.
            self._fail(conn, "send", exc)
            self._close_soon(conn, CLOSE_INTERNAL_ERROR, "error", "internal error")
        finally:
            # The bot's queue is gone with its socket: report the utterances it cut off.
            try:
                scheduler.abort(clock())
                self._playback_report(keys, outbox)
            except Exception as exc:
                self._fail(conn, "send", exc)
            metrics.playback_audio_held.dec(outbox.reported_held_s)
            outbox.reported_held_s = 0.0
            self.held_bytes -= outbox.reported_bytes
            outbox.reported_bytes = 0
            metrics.commands_held_bytes.set(self.held_bytes)

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
                self._check_age_of(out)
            except CommandRejected as exc:
                self._reject(keys, out.entry_id, exc)
                self.publisher.ack(keys.commands, out.acks)
                return False
        return True

    def _sent(self, conn: BotConnection, keys: BotKeys, out: Outgoing) -> None:
        assert conn.outbox is not None
        conn.outbox.scheduler.sent(out, conn.outbox.clock())
        self._count_sent(out)
        if out.acks and not self.reader.ack_with_next_read(keys, tuple(out.acks), conn.owner):
            self.publisher.ack(keys.commands, out.acks, owner=conn.owner)

    def _send_due_now(self, conn: BotConnection, keys: BotKeys) -> None:
        """Write what is due from the reader's own turn of the event loop, if nothing can wait.

        Waking the bot's sender task for it would take one more turn, and under load a
        turn is a pass over every ready socket (~1 ms at 500 bots x 20 ms). Only while
        that task is not itself writing, and only as long as a write cannot block;
        whatever is left, the sender task takes as before.
        """
        ws, outbox, sender = conn.ws, conn.outbox, conn.sender
        if not isinstance(ws, BotWebSocket) or outbox is None or conn.sending:
            return
        if sender is None or sender.done():  # not set up yet, or gone with the socket
            return
        scheduler = outbox.scheduler
        while ws.can_send_now() and (out := scheduler.next_send(outbox.clock())) is not None:
            if self._still_wanted(keys, out) and (data := self._encode_out(keys, out)) is not None:
                try:
                    ws.send_now(data)
                except (OSError, RuntimeError, InvalidState) as exc:
                    # The socket failed under the write: the entry is unacked, so it is
                    # delivered again on the bot's next connection; the sender sees it close.
                    log.info("writing a command failed", extra={"bot_id": keys.bot_id, "error": repr(exc)})
                    return
                self._sent(conn, keys, out)

    def _check_age_of(self, out: Outgoing) -> None:
        age_ms = self.backend.now_ms() - entry_time_ms(out.entry_id)
        if age_ms > self._max_age_ms:
            raise CommandRejected(
                "expired",
                f"written {age_ms / 1000:.1f}s ago, max age {self.settings.command_max_age_s}s",
                out.name,
            )

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

    def _playback_report(self, keys: BotKeys, outbox: Outbox) -> None:
        """Publish the scheduler's playback events and move its counts into metrics."""
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

    # -- housekeeping -------------------------------------------------------------

    async def _start_delivery(self, conn: BotConnection, keys: BotKeys) -> None:
        """Take the bot over and start reading its commands, within a bounded number of
        concurrent setups (a reconnect storm must queue here, not exhaust the pool).

        Redis trouble is retried; if it persists, the bot is asked to come back
        later (1013), never left connected without command delivery.
        """
        for attempt in range(1, SETUP_ATTEMPTS + 1):
            try:
                async with self._setup_gate:
                    await self._take_ownership(conn, keys)
                    if conn.sender is None:
                        conn.sender = asyncio.create_task(
                            self._send_commands(conn, keys), name=f"send-{keys.bot_id}"
                        )
                    await self.reader.add(keys)
                # The command stream may have been made just now (by its group): its expiry,
                # set when the bot connected, only applies from now on.
                self.publisher.expire((keys.commands,), self.settings.key_ttl_s)
                return
            except (RedisError, OSError) as exc:
                log.warning(
                    "command delivery setup failed",
                    extra={"bot_id": keys.bot_id, "attempt": attempt, "error": repr(exc)},
                )
                await asyncio.sleep(0.2 * attempt)
        raise _CloseWith(CLOSE_TRY_AGAIN, "error", "try again later")

    async def _take_ownership(self, conn: BotConnection, keys: BotKeys) -> None:
        """Record this connection as the bot's owner; evict the previous one on another gateway."""
        owner_key = self.keyspace.owner(keys.bot_id)
        token = f"{self.settings.gateway_id}/{conn.conn_id}"
        conn.owner = (owner_key, token)
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
                    "could not signal the previous owner", extra={"bot_id": keys.bot_id, "error": repr(exc)}
                )

    def _evicted(self, bot_id: str, conn_id: str, by: str) -> None:
        """Another gateway took this bot over: close our (probably half-open) control socket."""
        session = self.registry.get(bot_id)
        conn = session.control if session is not None else None
        if conn is None or conn.conn_id != conn_id:
            return
        log.info("bot taken over by another gateway", extra={"bot_id": bot_id, "by": by})
        conn.evicted_by = by
        conn.close_reason = "replaced"
        self._spawn(self._close(conn.ws, CLOSE_REPLACED, "replaced by a newer connection"))

    async def _close(self, ws: ServerConnection, code: int, reason: str) -> None:
        """Close with a code, but never wait on a peer that does not read: websockets drains
        its write buffer before the close timeout starts, so a stuck bot would hang us."""
        try:
            async with asyncio.timeout(self.settings.ws_close_timeout_s):
                await ws.close(code, reason)
        except TimeoutError:
            ws.transport.abort()

    async def keepalive(self) -> None:
        """Ping connections that have been silent; close those that stay silent.

        A connection we received anything from lately is alive: no ping needed, and
        none can time out because its pong is stuck behind audio we have not read
        yet (how a plain bridge under load closes every bot with 1011). Silent ones
        (a quiet control channel, a dead peer) are pinged and closed with 1011 if
        neither a pong nor data comes back in time.

        Checked often and pinged when due, each connection by its own silence: a
        sweep that pinged every quiet channel at once (a thousand control channels)
        stalled the loop for tens of ms, and every command waiting behind it.
        """
        interval_s = self.settings.ws_ping_interval_s
        timeout_s = self.settings.ws_ping_timeout_s
        # Each connection is checked KEEPALIVE_TICKS times per interval, a slice of
        # them per tick, so that 20,000 connections never cost one long loop turn.
        tick_s = min(interval_s, timeout_s) / KEEPALIVE_TICKS / KEEPALIVE_SLICES
        tick = 0
        while True:
            await asyncio.sleep(tick_s)
            tick += 1
            now = self._clock()
            for session in self.registry.snapshot()[tick % KEEPALIVE_SLICES :: KEEPALIVE_SLICES]:
                for conn in (session.audio, session.control):
                    if conn is not None:
                        self._keepalive_check(conn, now, interval_s, timeout_s)

    def _keepalive_check(self, conn: BotConnection, now: float, interval_s: float, timeout_s: float) -> None:
        ws = conn.ws
        heard = max(conn.last_rx, getattr(ws, "pong_at", 0.0))
        ping_at = conn.ping_at
        if ping_at is not None and heard >= ping_at:
            conn.ping_at = ping_at = None  # answered
        if ping_at is None:
            if now - heard >= interval_s:
                conn.ping_at = now
                send_ping(ws)
            return
        if now - ping_at < timeout_s:
            return
        if unread_bytes(ws) > 0:
            # Its data (and maybe the pong) waits in the kernel for us to read it:
            # we are behind, the bot is alive. Closing it would lose the meeting.
            conn.ping_at = now
            return
        conn.ping_at = math.inf  # closing: never again
        log.warning("keepalive timeout, closing", extra={"bot_id": conn.bot_id, "channel": conn.channel})
        conn.close_reason = "keepalive_timeout"
        self._spawn(self._close(ws, CLOSE_INTERNAL_ERROR, "keepalive ping timeout"))

    def _may_pause(self) -> bool:
        """Backpressure is for a Redis that cannot keep up. A process out of CPU sheds
        instead (``gateway.overload``), and no pause follows another at once."""
        return not self.shedder.overloaded and time.monotonic() >= self._no_pause_until

    def _end_pause(self) -> None:
        # A socket left unread for long misses its keepalive pongs and is closed
        # (1011): that is how a plain bridge loses every bot under load. Cap the
        # pause; if Redis is still behind, the buffer budget decides what is kept.
        self._pause_timer = None
        self._no_pause_until = time.monotonic() + MAX_PAUSE_S
        self.publisher.release_backpressure()

    def _pause_audio(self, pause: bool) -> None:
        """Backpressure from the publisher: stop or resume reading every audio socket.

        Sockets are resumed starting from a different one each time. The event loop reads
        ready sockets in the order they were resumed, and under sustained backpressure a
        window between pauses lasts a few reads: resumed always in the same order, the
        same bots were read every time and the last ones starved (one 20 ms flood bot
        went unread for 15 s while the first ones streamed).
        """
        if pause:
            self._pause_timer = asyncio.get_running_loop().call_later(MAX_PAUSE_S, self._end_pause)
        elif self._pause_timer is not None:
            self._pause_timer.cancel()
            self._pause_timer = None
        sessions = self.registry.snapshot()
        if not pause and sessions:
            # A golden-ratio stride: successive starts spread evenly over any number of bots.
            self._resume_from = (self._resume_from + max(1, round(len(sessions) * 0.618))) % len(sessions)
            sessions = sessions[self._resume_from :] + sessions[: self._resume_from]
        for session in sessions:
            conn = session.audio
            if conn is None:
                continue
            transport = conn.ws.transport
            with contextlib.suppress(Exception):  # a transport may be closing
                if pause:
                    transport.pause_reading()
                else:
                    transport.resume_reading()

    def _spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _expiring(self, keys: BotKeys) -> tuple[str, ...]:
        return (keys.audio, keys.events, keys.commands, self.keyspace.owner(keys.bot_id))

    def refresh_expiry(self) -> None:
        """Keep live bots' keys from expiring; a crashed gateway's keys still expire."""
        for session in self.registry:
            keys = session.keys
            self.publisher.expire(self._expiring(keys), self.settings.key_ttl_s)
