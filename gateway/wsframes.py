"""Where WebSocket frames begin and end in a byte stream (RFC 6455 §5.2), pure.

The gateway lets websockets parse everything except the one frame that matters
for cost: a complete, final, masked binary frame on a bound audio channel. For
those it only needs to know where each frame starts and ends, and whether it is
that kind; every other frame is handed to websockets whole (see
``gateway.sessions.BotWebSocket``).
"""

from __future__ import annotations

from typing import NamedTuple

#: FIN set, no RSV bits, opcode 2 (binary): the first byte of a final binary frame.
FINAL_BINARY = 0x82


class FrameSpan(NamedTuple):
    """One frame's position in a buffer: ``data[start + head : start + size]`` is its payload."""

    first: int  # the first byte: FIN, RSV and opcode
    head: int  # header length, masking key included
    size: int  # header and payload
    masked: bool


def scan_frame(data: bytes | bytearray, start: int = 0) -> FrameSpan | None:
    """The frame that begins at ``start``; None while its header is incomplete.

    The payload may not have arrived yet: compare ``size`` with what is there.
    """
    available = len(data) - start
    if available < 2:
        return None
    first = data[start]
    second = data[start + 1]
    length = second & 0x7F
    head = 2
    if length == 126:
        if available < 4:
            return None
        length = int.from_bytes(data[start + 2 : start + 4], "big")
        head = 4
    elif length == 127:
        if available < 10:
            return None
        length = int.from_bytes(data[start + 2 : start + 10], "big")
        head = 10
    masked = bool(second & 0x80)
    if masked:
        head += 4
    return _new_span(FrameSpan, (first, head, head + length, masked))


# Run for every audio frame: tuple.__new__ skips the NamedTuple's Python-level __new__.
_new_span = tuple.__new__
