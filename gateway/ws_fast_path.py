"""The audio fast path: a websockets server connection that splits binary frames itself.

This is the one module that reads websockets' private state (its parser
generator, its message queue, ``current_size``, ``send_in_progress``), so a
websockets release that changes them is met here and nowhere else; CI runs the
suite against the lowest and the highest release ``pyproject.toml`` allows.
Where that state is not what this code expects, it falls back to websockets'
own parser (the safe answer), never to a wrong one.
"""

from __future__ import annotations

import array
import contextlib
import fcntl
import logging
import termios
import time
from collections.abc import Callable

from websockets.asyncio.server import ServerConnection
from websockets.exceptions import InvalidState
from websockets.frames import CloseCode, Frame, Opcode
from websockets.protocol import OPEN, Event
from websockets.streams import StreamReader

try:  # websockets' C helper; it ships compiled for every platform we run on
    from websockets.speedups import apply_mask
except ImportError:  # pragma: no cover
    from websockets.utils import apply_mask

from gateway.limits import Budget
from gateway.wsframes import FINAL_BINARY, FrameSpan, scan_frame

log = logging.getLogger(__name__)

#: Largest frame held back to be split here; larger ones go to websockets' parser.
MAX_HELD_FRAME = 256 * 1024
#: A frame header's most bytes: 2, an 8-byte extended length, a 4-byte masking key.
MAX_FRAME_HEAD = 14
_AT_EOF = StreamReader.at_eof.__code__


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


class BotWebSocket(ServerConnection):
    """A server connection that hands complete binary frames straight to ``on_binary``.

    websockets queues every message and wakes the handler task for each; at tens
    of thousands of audio frames a second that wake-up is most of the cost. Once
    an audio channel is bound, a complete binary frame that arrives while nothing
    is queued ahead of it is processed right here (order is kept: anything else,
    and anything behind a queued message, takes the queue).

    Going further, while websockets' parser is idle between frames, incoming
    bytes are split into frames here (:mod:`gateway.wsframes`): a final, masked
    binary frame is unmasked and handed over without websockets' parser (its
    costliest step per frame); any other frame is fed to
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
        a frame, and copying whole 256 KiB reads in and out of the held buffer showed
        in the per-frame cost.
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
        self.fail_now(CloseCode.INTERNAL_ERROR, "internal error")

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
