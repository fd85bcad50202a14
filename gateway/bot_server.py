"""The bot side and the inbound path: bot socket → decode → publisher → Redis.

:class:`BotServer` admits connections (auth, per-bot limits), runs their
lifecycle (bind, keepalive, idle, replace, unbind) and moves audio and bot
messages to the :class:`~gateway.publisher.Publisher` without awaiting it. It
tells outbound delivery (:mod:`gateway.delivery`) only that a control channel
became ready or went away. Bytes are decoded by :mod:`gateway.protocol`.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import http
import logging
import math
import time
import weakref
from typing import Any

from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed
from websockets.frames import CloseCode
from websockets.http11 import Request, Response

from gateway.admission import Admission
from gateway.auth import AuthError, Claims, check_bot, redact_query, split_secrets, token_from_request, verify
from gateway.close_codes import REASON_OF_CODE, CloseReason, GatewayCloseCode, effective_close
from gateway.closing import Closer
from gateway.delivery import Delivery, DeliveryUnavailable
from gateway.exceptions import BadRoute, FrameError, MessageError
from gateway.keys import BotKeys, KeySpace
from gateway.logs import RateLimiter
from gateway.metrics import Metrics
from gateway.overload import LoadShedder
from gateway.protocol import (
    AudioFrame,
    Route,
    handshake_bot_id,
    is_legacy_chunk,
    parse_json_message,
    parse_legacy_chunk,
    parse_path,
)
from gateway.publisher import Publisher
from gateway.redis_conn import RedisBackend
from gateway.sessions import AudioInbound, BotConnection, SessionRegistry
from gateway.settings import Settings
from gateway.ws_fast_path import BotWebSocket, send_ping, unread_bytes

log = logging.getLogger(__name__)

KEEPALIVE_TICKS = 10  # keepalive checks per ping interval: how finely pings are spread
KEEPALIVE_SLICES = 10  # each check of all connections is spread over this many loop turns
MAX_PAUSE_S = 1.0  # longest backpressure pause; then at least as long reading

_CLOSE_REASON_TEXT = {
    "bot_id_mismatch": "bot_id mismatch between path and handshake",
    "bad_bot_id": "invalid bot_id",
    "no_bot_id": "bot_id unknown: handshake has none and the path names none",
}


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
        self.closer = Closer(metrics, settings.ws_close_timeout_s)
        self.delivery = Delivery(settings, keyspace, metrics, backend, publisher, self.registry, self.closer)
        self.draining = False
        self.shedder = LoadShedder(settings.overload_lag_s, metrics)
        publisher.on_backlog = self._pause_audio
        publisher.may_pause = self._may_pause
        self._no_pause_until = 0.0
        self._pause_timer: asyncio.TimerHandle | None = None
        self._resume_from = 0  # where the next resume of audio sockets starts (fairness)
        self._clock = time.monotonic  # the event loop's clock, without a lookup per frame
        self._audio_in = metrics.audio_in
        self._shed = metrics.dropped.labels("overload")
        self._log_limit = RateLimiter(burst=5, interval_s=10.0, counter=metrics.log_suppressed)
        self._secrets = split_secrets(settings.auth_secret)
        self._claims: weakref.WeakKeyDictionary[ServerConnection, Claims] = weakref.WeakKeyDictionary()
        self.admission = Admission(settings, self._clock)
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
            ws.on_failure = functools.partial(self.closer.fail, conn, "receive")
        close_reason: str = CloseReason.BOT_LEFT
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
            await self.closer.close(ws, close.code, close.text)
        except ConnectionClosed:
            pass
        except Exception as exc:
            # A bug of ours, in this bot's handling only: close it, never leave it half-attached.
            self.closer.fail(conn, "receive", exc)
            await self.closer.close(ws, CloseCode.INTERNAL_ERROR, "internal error")
        finally:
            if conn.watchdog is not None:
                conn.watchdog.cancel()
            # Our own decision says why, then the code that ended it (ours if we closed first).
            code, _ = effective_close(ws)
            close_reason = conn.close_reason or REASON_OF_CODE.get(code) or close_reason
            self.open_connections -= 1
            self.metrics.connections.labels(channel).dec()
            self.metrics.connections_closed.labels(channel, close_reason).inc()
            try:
                await self._unbind(conn)
            except Exception as exc:
                self.closer.fail(conn, "unbind", exc)

    def _bind(self, conn: BotConnection, bot_id: str) -> BotKeys:
        claims = self._claims.get(conn.ws)
        if claims is not None and claims.bot is not None and claims.bot != bot_id:
            # A bare path: the token's bot could only be checked once the handshake named one.
            raise _CloseWith(
                GatewayCloseCode.FORBIDDEN, CloseReason.WRONG_BOT, "token is bound to another bot"
            )
        ws = conn.ws
        if isinstance(ws, BotWebSocket):
            if ws.release is None:
                # A bare path with no bot in its token: its slot is the bot's, from now on.
                refused = self.admission.admit_connection(bot_id, bot_id)
                if refused is not None:
                    raise _CloseWith(
                        CloseCode.POLICY_VIOLATION, CloseReason.POLICY_VIOLATION, "too many connections"
                    )
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
            self.closer.close_for(
                replaced, CloseReason.REPLACED, GatewayCloseCode.REPLACED, "replaced by a newer connection"
            )
        return keys

    async def _unbind(self, conn: BotConnection) -> None:
        if conn.outbound is not None:
            # First: the playback it cut off is reported before it is said to be gone.
            await self.delivery.detach(conn)
        session, _current, ended = self.registry.detach(conn)
        if session is None:
            return
        keys = session.keys
        self.metrics.bots.set(len(self.registry))
        code, reason = effective_close(conn.ws)
        self.publisher.event(
            keys,
            "disconnected",
            conn.channel,
            conn=conn.conn_id,
            code=code,
            reason=reason,
            # Which gateway says so: a bot may be connected to another one already.
            gateway=self.settings.gateway_id,
        )
        log.info(
            "bot disconnected",
            extra={"bot_id": keys.bot_id, "channel": conn.channel, "code": code, "session_ended": ended},
        )
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
                self.closer.close_for(conn, CloseReason.IDLE, GatewayCloseCode.IDLE, "idle timeout")
            else:
                conn.watchdog = loop.call_later(idle_s / 2, check)

        conn.watchdog = loop.call_later(idle_s / 2, check)

    def _refused(self, conn: BotConnection, reason: str, data_frame: bool) -> None:
        """A message over the bot's rate, bytes or size: dropped by the socket before any
        work. One that keeps going after a whole burst was dropped is closed (1008).

        The burst matters: after backpressure, a network hiccup, or a Redis that fell
        behind, a healthy bot's frames arrive in a catch-up burst, and that is not
        abuse (docs/BENCHMARKS.md, "Figures behind the code").
        """
        if data_frame and conn.inbound is not None:
            conn.inbound.seq += 1  # a frame dropped by policy still takes a seq: workers see the gap
        self._drop(conn, reason)
        ws = conn.ws  # a BotWebSocket: only it reports refusals
        if isinstance(ws, BotWebSocket) and ws.budget is not None and ws.budget.violating and not ws.discard:
            log.warning(
                "bot keeps sending over its limits, closing",
                extra={"bot_id": conn.bot_id, "channel": conn.channel, "reason": reason},
            )
            conn.close_reason = CloseReason.POLICY_VIOLATION
            ws.fail_now(CloseCode.POLICY_VIOLATION, "rate limit exceeded")

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
            conn.close_reason = CloseReason.WRITE_BUFFER_FULL
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
        text = _CLOSE_REASON_TEXT.get(exc.reason, "bad request")
        return _CloseWith(GatewayCloseCode.BAD_REQUEST, CloseReason(exc.reason), text)

    async def _recv_handshake(self, conn: BotConnection) -> str | bytes:
        """Receive within the handshake timeout; a bot that stays silent is closed."""
        try:
            # One deadline from the upgrade: a byte now and then does not hold a slot forever.
            async with asyncio.timeout_at(conn.handshake_deadline):
                return await conn.ws.recv()
        except TimeoutError:
            raise _CloseWith(
                GatewayCloseCode.HANDSHAKE_TIMEOUT, CloseReason.HANDSHAKE_TIMEOUT, "handshake timeout"
            ) from None

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
        keys = self.keyspace.bot(conn.bot_id)
        conn_b = conn.conn_id.encode()
        inbound = conn.inbound = AudioInbound(keys, conn_b, self.publisher.frame_encoder(keys, conn_b))
        on_message = functools.partial(self._audio_message, conn, inbound, route)
        if isinstance(ws, BotWebSocket):
            ws.on_binary = on_message  # no Python frame of its own
        # Cancelling this loop loses nothing accepted: each message is handed to the
        # publisher synchronously, before the next await. Most binary frames do not
        # even come through here (see BotWebSocket); text frames always do.
        async for message in ws:
            on_message(message)

    def _audio_message(
        self, conn: BotConnection, inbound: AudioInbound, route: Route, message: str | bytes
    ) -> None:
        """One message on a bound audio channel: the hot path, run for every frame.

        A frame dropped by policy (rate, overload) still takes a seq number, so
        workers see the gap.
        """
        conn.last_rx = self._clock()
        if isinstance(message, bytes):
            ratio = self.shedder.ratio
            if ratio:
                # Overloaded: shed before any decoding, evenly across connections.
                inbound.shed_acc += ratio
                if inbound.shed_acc >= 1.0:
                    inbound.shed_acc -= 1.0
                    self._shed.inc()
                    inbound.seq += 1
                    return
            try:
                size = self.publisher.audio_frame(inbound.frames, message, inbound.seq)
            except FrameError as exc:
                self._drop(conn, exc.reason, exc.detail)
                return
        else:
            frame = self._audio_text(conn, route, message)
            if frame is None:
                return
            size = len(frame.pcm)
            try:
                self.publisher.audio(inbound.keys, frame, inbound.seq, inbound.conn_b, inbound.frames.trim)
            except FrameError as exc:
                self._drop(conn, exc.reason, exc.detail)
                return
        audio_in = self._audio_in
        audio_in.frames += 1
        audio_in.bytes += size
        inbound.seq += 1

    def _audio_text(self, conn: BotConnection, route: Route, text: str) -> AudioFrame | None:
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
        assert conn.bot_id is not None  # ready: bound
        self.publisher.event(self.keyspace.bot(conn.bot_id), "message", "audio", data=text)
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
            self.publisher.event(keys, "ready", "control", data=message, conn=conn.conn_id)
            try:
                await self.delivery.attach(conn, keys)
            except DeliveryUnavailable:
                raise _CloseWith(CloseCode.TRY_AGAIN_LATER, CloseReason.ERROR, "try again later") from None

        assert conn.bot_id is not None  # ready: bound
        keys = self.keyspace.bot(conn.bot_id)
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

    # -- housekeeping -------------------------------------------------------------

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
        self.closer.close_for(
            conn, CloseReason.KEEPALIVE_TIMEOUT, CloseCode.INTERNAL_ERROR, "keepalive ping timeout"
        )

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

    def _expiring(self, keys: BotKeys) -> tuple[str, ...]:
        return (keys.audio, keys.events, keys.commands, self.keyspace.owner(keys.bot_id))

    def refresh_expiry(self) -> None:
        """Keep live bots' keys from expiring; a crashed gateway's keys still expire."""
        for session in self.registry:
            keys = session.keys
            self.publisher.expire(self._expiring(keys), self.settings.key_ttl_s)
