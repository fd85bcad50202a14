"""Which bots this process holds, and the per-connection state that delivery needs.

A bot's session lives while at least one of its channels is open: the two
channels connect in either order, and a bot reconnects after a drop. A newer
connection on a channel replaces the older one, which is closed with 4409.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from websockets.asyncio.server import ServerConnection
from websockets.frames import Frame, Opcode
from websockets.protocol import OPEN, Event
from websockets.streams import StreamReader

try:  # websockets' C helper; it ships compiled for every platform we run on
    from websockets.speedups import apply_mask
except ImportError:  # pragma: no cover
    from websockets.utils import apply_mask

from gateway.commands import Command
from gateway.keys import BotKeys
from gateway.limits import Budget
from gateway.playback import PlaybackConfig, PlaybackScheduler
from gateway.protocol import Channel
from gateway.resp import FrameEncoder
from gateway.wsframes import FINAL_BINARY, FrameSpan, scan_frame

log = logging.getLogger(__name__)

#: Largest frame held back to be split here; larger ones go to websockets' parser.
MAX_HELD_FRAME = 256 * 1024
#: A frame header's most bytes: 2, an 8-byte extended length, a 4-byte masking key.
MAX_FRAME_HEAD = 14
CLOCK_TICK_S = 0.001  # uvloop's clock resolution
_AT_EOF = StreamReader.at_eof.__code__

_conn_counter = itertools.count()


def new_conn_id() -> str:
    """Short, unique per process run: tells reconnects apart in the audio stream."""
    return f"{uuid.uuid4().hex[:8]}{next(_conn_counter):x}"


class BotWebSocket(ServerConnection):
    """A server connection that hands complete binary frames straight to ``on_binary``.

    websockets queues every message and wakes the handler task for each; at tens
    of thousands of audio frames a second that wake-up is most of the cost. Once
    an audio channel is bound, a complete binary frame that arrives while nothing
    is queued ahead of it is processed right here (order is kept: anything else,
    and anything behind a queued message, takes the queue).

    Going further, while websockets' parser is idle between frames, incoming
    bytes are split into frames here (:mod:`gateway.wsframes`): a final, masked
    binary frame is unmasked and handed over without websockets' parser (a
    third of the gateway's CPU per frame, measured); any other frame is fed to
    websockets whole, so that it is again between frames afterwards. Whenever
    that cannot be guaranteed (a fragmented message, a frame too large to hold,
    the closing handshake), websockets gets the stream until it is idle again.
    """

    on_binary: Callable[[bytes], None] | None = None
    pong_at: float = 0.0  # when a pong last came (time.monotonic): the keepalive's evidence
    # What this connection may still send (its bot's shared buckets once bound); a data
    # frame or ping over it is dropped here, before it is unmasked, parsed or answered.
    budget: Budget | None = None
    #: Told of each refusal: (reason, whether it was an audio data frame). It may set ``discard``.
    on_refused: Callable[[str, bool], None] | None = None
    #: Told when we hold more unread output for the peer than ``write_buffer_max``.
    on_write_overflow: Callable[[], None] | None = None
    write_buffer_max = 0  # bytes; 0: unchecked
    text_max = 0  # longest text message accepted (bytes); 0: unchecked
    discard = False  # closing for abuse: whatever else arrives is dropped unread
    release: Callable[[], None] | None = None  # gives back this connection's per-bot slot, once
    on_failure: Callable[[Exception], None] | None = None  # counts and logs a failure in on_binary
    _framing = False  # we split frames: websockets' parser only ever gets whole ones
    _held: bytearray | None = None  # the start of a frame not complete yet
    _passing = 0  # bytes left of a frame too large to hold, going to websockets as they come
    _max_payload = 0

    def connection_lost(self, exc: Exception | None) -> None:
        # Every accepted TCP connection ends here exactly once, whether or not its
        # handler ever ran (a failed upgrade): the one place a slot cannot leak.
        release, self.release = self.release, None
        if release is not None:
            release()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self.discard:
            return
        self._data_received(data)
        limit = self.write_buffer_max
        if limit and self.on_write_overflow is not None and self.transport.get_write_buffer_size() > limit:
            # Pongs (and anything else we owe) pile up for a peer that does not read.
            self.on_write_overflow()

    def _data_received(self, data: bytes) -> None:
        if not self._framing:
            if self.on_binary is None or not self._parser_idle():
                super().data_received(data)
                return
            self._framing = True
        if self._passing:
            n = min(self._passing, len(data))
            self._passing -= n
            super().data_received(data[:n] if n < len(data) else data)
            if n == len(data):
                return
            data = data[n:]
        held = self._held
        pos = 0
        if held:
            pos = self._fill_held(held, data)
            if pos < 0:
                return  # all of it is held: the frame is not complete yet
            if pos == 0:  # the held frame is too large to hold after all: websockets takes it
                data = bytes(held) + data
                held.clear()
            else:
                frame = bytes(held)
                held.clear()
                self._split(frame, 0)
                if pos == len(data):
                    return
                if not self._framing:  # that frame began the closing handshake
                    super().data_received(data[pos:])
                    return
        self._split(data, pos)

    def _fill_held(self, held: bytearray, data: bytes) -> int:
        """Complete the held frame from the start of ``data``: where the rest of ``data``
        begins, -1 if all of it went to the held frame (still incomplete), 0 if the
        frame turns out too large to hold.

        Only the frame's own bytes are copied: in a flood nearly every read ends inside
        a frame, and copying whole reads (256 KiB) into the held buffer and out again
        cost ~0.1 ms per read (100 ms flood: 17.5 -> 16.1 µs per frame without it).
        """
        used = 0
        span = scan_frame(held)
        if span is None:  # not even the header yet: a header is at most 14 bytes
            used = min(len(data), MAX_FRAME_HEAD - len(held))
            held += data[:used]
            span = scan_frame(held)
            if span is None:
                return -1
            if not self._holdable(span):
                del held[len(held) - used :]  # hand back what came from data: it goes with it
                return 0
            if (over := len(held) - span.size) > 0:  # a small frame, complete within those bytes
                del held[span.size :]
                return used - over
        elif not self._holdable(span):
            return 0
        need = span.size - len(held)
        if need > len(data) - used:
            held += memoryview(data)[used:]
            return -1
        held += memoryview(data)[used : used + need]
        return used + need

    def _split(self, data: bytes, pos: int) -> None:
        """Split ``data[pos:]`` into frames: audio straight to ``on_binary``, the rest to websockets."""
        on_binary = self.on_binary
        protocol = self.protocol
        queued = self.recv_messages.frames
        max_payload = self._max_payload
        # Whether a frame may bypass websockets: open, and no message of its waiting to
        # be read (it would be overtaken). Only websockets' parser changes either while
        # this runs (a close from another task happens after it), so it is checked
        # again after each frame handed to it, not for every frame.
        bypass = protocol.state is OPEN and not len(queued)
        budget = self.budget
        now = time.monotonic()  # one read's frames arrived together
        end = len(data)
        while pos < end:
            span = scan_frame(data, pos)
            if span is None or (nxt := pos + span.size) > end:
                if span is None or self._holdable(span):
                    self._held = bytearray(data[pos:])
                else:  # too large to hold: websockets takes it as it comes (and enforces max_size)
                    self._passing = span.size - (end - pos)
                    super().data_received(data[pos:])
                return
            if (
                bypass
                and span.first == FINAL_BINARY
                and span.masked
                and span.size - span.head <= max_payload
                and protocol.current_size is None  # not inside a fragmented message
            ):
                if budget is not None and (refused := budget.admit(now, nxt - pos - span.head)):
                    self._refuse(refused, True)
                    if self.discard:
                        return
                    pos = nxt
                    continue
                mask_at = pos + span.head - 4
                payload = apply_mask(data[mask_at + 4 : nxt], data[mask_at : mask_at + 4])
                try:
                    on_binary(payload)  # type: ignore[misc]
                except Exception as exc:
                    self._failed(exc)
                    return
            else:
                # A whole frame: websockets is between frames again afterwards.
                super().data_received(data[pos:nxt] if pos or nxt < end else data)
                if protocol.state is not OPEN:  # closing: websockets parses alone from here
                    self._framing = False
                    if nxt < end:
                        super().data_received(data[nxt:])
                    return
                bypass = not len(queued)
            pos = nxt

    def _holdable(self, span: FrameSpan) -> bool:
        return span.size <= MAX_HELD_FRAME and span.size - span.head <= self._max_payload

    def _parser_idle(self) -> bool:
        """Whether websockets' parser waits for the first byte of a frame, holding nothing.

        Read from the parser generator's own state, so a websockets release that
        parses differently makes this False (the safe answer), never wrong.
        """
        protocol = self.protocol
        if protocol.state is not OPEN or protocol.reader.buffer:
            return False
        if getattr(protocol, "current_size", 0) is not None:  # mid-message (or unknown version)
            return False
        gen = protocol.parser
        while (inner := getattr(gen, "gi_yieldfrom", None)) is not None:
            gen = inner
        if getattr(gen, "gi_code", None) is not _AT_EOF:
            return False
        self._max_payload = getattr(protocol, "max_message_size", None) or 0
        return True

    def can_send_now(self) -> bool:
        """Whether :meth:`send_now` may write: open, no fragmented message going out,
        and the transport below its high-water mark (so ``send()`` would not wait)."""
        return (
            self.protocol.state is OPEN
            and self.send_in_progress is None
            and not self.paused
            and not self.transport.is_closing()
        )

    def send_now(self, text: bytes) -> None:
        """Write a text message (UTF-8 already) without waiting, as ``send()`` does when it need not wait.

        Only after :meth:`can_send_now`: this is how the command reader hands a
        command to an idle bot in the same turn of the event loop, instead of
        waking the bot's sender task for it (one more turn: under load, a pass
        over every ready socket).
        """
        self.protocol.send_text(text)
        self.send_data()

    def _refuse(self, reason: str, data_frame: bool) -> None:
        if self.on_refused is not None:
            self.on_refused(reason, data_frame)

    def process_event(self, event: Event) -> None:
        if self.discard:
            return
        if isinstance(event, Frame):
            opcode = event.opcode
            if opcode is Opcode.PONG:
                self.pong_at = time.monotonic()
            elif opcode is not Opcode.CLOSE and (budget := self.budget) is not None:
                # Pings count too (a ping flood costs us a pong each). Only whole messages
                # can be dropped; a fragment's cost is counted, never cut out of its message.
                refused = budget.admit(time.monotonic(), len(event.data))
                if (
                    refused is None
                    and opcode is Opcode.TEXT
                    and self.text_max
                    and len(event.data) > self.text_max
                ):
                    refused = "too_large"
                if refused is not None:
                    self._refuse(refused, opcode is Opcode.BINARY)
                    if self.discard or (event.fin and opcode is not Opcode.CONT):
                        return
        on_binary = self.on_binary
        if (
            on_binary is not None
            and isinstance(event, Frame)
            and event.opcode is Opcode.BINARY
            and event.fin
            and not len(self.recv_messages.frames)
        ):
            try:
                on_binary(bytes(event.data))
            except Exception as exc:
                self._failed(exc)
            return
        super().process_event(event)

    def _failed(self, exc: Exception) -> None:
        """A bug of ours in the audio path: one traceback, then this connection is closed
        (1011) rather than log the same failure for every frame that follows."""
        if self.on_failure is not None:
            self.on_failure(exc)
        else:
            log.error("audio frame handler failed", exc_info=exc)
        self.fail_now(1011, "internal error")

    def fail_now(self, code: int, reason: str) -> None:
        """Close at once, for abuse: a close frame if it can go out, then the TCP connection.

        Nothing more is read or parsed from this peer (``discard``): a flood stops
        costing us the moment it is recognised as one.
        """
        self.discard = True
        with contextlib.suppress(Exception):
            if self.protocol.state is OPEN:
                self.protocol.fail(code, reason)
                self.send_data()
        transport = self.transport
        if transport.get_write_buffer_size() > MAX_HELD_FRAME:
            transport.abort()  # it does not read: the close frame would never get through
            return
        # Not closed from here: a socket closed with unread input sends a reset, which
        # can destroy the close frame on its way. Input is read and dropped until the
        # peer closes, or for the close timeout at most.
        self.loop.call_later(self.close_timeout or 0, transport.abort)


class Outbox:
    """What waits to be written to one control connection: the async side of a
    :class:`~gateway.playback.PlaybackScheduler` (which decides order and pacing).

    :meth:`put` never blocks; :meth:`wait` sleeps until new input or the
    scheduler's next deadline. Reading a bot's stream pauses while ``limit``
    non-audio commands wait (nothing is dropped; unread entries stay in Redis).
    Audio does not count: it is bounded by the scheduler, which rejects what
    is over, so that an ``interrupt`` is always read at once.
    """

    def __init__(
        self,
        limit: int,
        bot_id: str = "",
        playback: PlaybackConfig | None = None,
        limit_bytes: int = 1 << 62,
    ) -> None:
        self.limit = limit
        self.limit_bytes = limit_bytes  # command text held (a few large commands are enough)
        self.reported_bytes = 0  # this bot's share of the process's held bytes
        self.scheduler = PlaybackScheduler(bot_id, playback)
        self._wakeup = asyncio.Event()
        self.clock = asyncio.get_running_loop().time  # monotonic, as the loop's timers
        self.reported_held_s = 0.0  # this bot's share of the held-audio gauge

    def put(self, command: Command, wake: bool = True) -> None:
        """Hand a validated command to the scheduler; raises CommandRejected (queue_full).

        ``wake=False``: the caller writes what is due itself and then calls :meth:`settle`.
        """
        self.scheduler.submit(command, self.clock())
        if wake:
            self._wakeup.set()

    def settle(self) -> None:
        """After a caller wrote what was due: wake the sender only if anything is left.

        A sender woken for nothing costs a task switch and a pass through the
        scheduler per command, for nothing.
        """
        if not self.scheduler.idle:
            self._wakeup.set()

    async def wait(self, deadline: float | None) -> None:
        """Sleep until :meth:`put` or ``deadline`` (loop time; None: no deadline)."""
        self._wakeup.clear()
        # Cancelling here loses nothing: the scheduler still holds everything.
        if deadline is None:
            await self._wakeup.wait()
            return
        # uvloop's clock and timers tick in whole milliseconds: a timer for less than
        # a tick fires at once, again and again, until the clock moves. Wait a tick.
        deadline = max(deadline, self.clock() + CLOCK_TICK_S)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout_at(deadline):
                await self._wakeup.wait()

    @property
    def full(self) -> bool:
        scheduler = self.scheduler
        return scheduler.pending_commands >= self.limit or scheduler.command_bytes >= self.limit_bytes

    @property
    def low(self) -> bool:
        scheduler = self.scheduler
        return (
            scheduler.pending_commands <= self.limit // 2 and scheduler.command_bytes <= self.limit_bytes // 2
        )

    def __len__(self) -> int:
        return self.scheduler.pending_commands


@dataclass(eq=False)
class BotConnection:
    """One open WebSocket of a bot: either its audio or its control channel."""

    ws: ServerConnection
    channel: Channel
    conn_id: str = field(default_factory=new_conn_id)
    bot_id: str | None = None
    ready: bool = False
    outbox: Outbox | None = None
    sender: asyncio.Task[None] | None = None
    sending: bool = False  # the sender task is inside ws.send(): nobody else may write
    # Ownership of the bot's commands, as recorded in Redis: (owner key, "gateway_id/conn_id").
    owner: tuple[str, str] | None = None
    evicted_by: str | None = None  # the gateway that took this bot over, to hand leftovers to
    close_reason: str | None = None  # set when the gateway decides to close (metric label)
    # Bounds: last receive time (idle watchdog) and a token bucket for the message rate.
    last_rx: float = 0.0
    watchdog: asyncio.TimerHandle | None = None
    ping_at: float | None = None  # when the keepalive pinged, until something comes back
    handshake_deadline: float = 0.0  # loop time by which the bot must have said who it is
    shed_acc: float = 0.0  # overload shedding: drop a frame each time this passes 1
    # Audio channel: where frames go, and their counter on this connection.
    audio_keys: BotKeys | None = None
    conn_b: bytes = b""
    frames: FrameEncoder | None = None  # its binary frames' way into the audio stream
    seq: int = 0


@dataclass(eq=False)
class BotSession:
    bot_id: str
    keys: BotKeys
    audio: BotConnection | None = None
    control: BotConnection | None = None

    def channel(self, channel: Channel) -> BotConnection | None:
        return self.audio if channel == "audio" else self.control

    def set_channel(self, channel: Channel, conn: BotConnection | None) -> None:
        if channel == "audio":
            self.audio = conn
        else:
            self.control = conn

    @property
    def empty(self) -> bool:
        return self.audio is None and self.control is None


class SessionRegistry:
    """The bots this process holds, by bot_id."""

    def __init__(self) -> None:
        self._sessions: dict[str, BotSession] = {}

    def get(self, bot_id: str) -> BotSession | None:
        return self._sessions.get(bot_id)

    def attach(self, keys: BotKeys, conn: BotConnection) -> tuple[BotSession, bool, BotConnection | None]:
        """Attach a connection; returns the session, whether it is new, and the connection it replaced."""
        session = self._sessions.get(keys.bot_id)
        created = session is None
        if session is None:
            session = self._sessions[keys.bot_id] = BotSession(keys.bot_id, keys)
        replaced = session.channel(conn.channel)
        session.set_channel(conn.channel, conn)
        return session, created, replaced

    def detach(self, conn: BotConnection) -> tuple[BotSession | None, bool, bool]:
        """Detach a connection; returns the session, whether this was the channel's current
        connection, and whether the session ended."""
        if conn.bot_id is None:
            return None, False, False
        session = self._sessions.get(conn.bot_id)
        if session is None:
            return None, False, False
        current = session.channel(conn.channel) is conn
        if current:
            session.set_channel(conn.channel, None)
        ended = session.empty
        if ended:
            del self._sessions[conn.bot_id]
        return session, current, ended

    def __len__(self) -> int:
        return len(self._sessions)

    def __iter__(self) -> Iterator[BotSession]:
        return iter(self.snapshot())

    def snapshot(self) -> list[BotSession]:
        """The sessions now (a copy: callers may attach and detach while walking it)."""
        return list(self._sessions.values())
