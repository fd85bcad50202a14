"""scan_frame against frames serialized by websockets itself: every size class of
the length field, masked and not, and every prefix of a frame."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from websockets.frames import Frame, Opcode

from gateway.wsframes import FINAL_BINARY, scan_frame

OPCODES = [Opcode.BINARY, Opcode.TEXT, Opcode.CONT, Opcode.PING, Opcode.PONG]
# 0..125 fit the 7-bit length, 126..65535 the 16-bit one, beyond that the 64-bit one.
SIZES = st.one_of(st.integers(0, 125), st.integers(126, 70_000), st.just(65_535), st.just(65_536))


def _wire(opcode: Opcode, payload: bytes, fin: bool, mask: bool) -> bytes:
    return Frame(opcode, payload, fin=fin).serialize(mask=mask)


@given(
    frames=st.lists(
        st.tuples(st.sampled_from(OPCODES), SIZES, st.booleans(), st.booleans()), min_size=1, max_size=4
    )
)
def test_spans_tile_a_stream_of_frames(frames: list[tuple[Opcode, int, bool, bool]]) -> None:
    wires = []
    for opcode, size, fin, mask in frames:
        control = opcode in (Opcode.PING, Opcode.PONG)
        payload = bytes(range(256)) * (size // 256) + bytes(size % 256)
        wires.append(_wire(opcode, payload[:125] if control else payload, fin or control, mask))
    stream = b"".join(wires)
    pos = 0
    for wire, (opcode, _, fin, mask) in zip(wires, frames, strict=True):
        span = scan_frame(stream, pos)
        assert span is not None
        assert span.size == len(wire)
        assert span.masked == mask
        assert span.first & 0x0F == opcode.value
        assert bool(span.first & 0x80) == (fin or opcode in (Opcode.PING, Opcode.PONG))
        pos += span.size
    assert pos == len(stream)


@given(size=SIZES, cut=st.floats(0, 1, exclude_max=True))
def test_a_prefix_is_never_mistaken_for_a_whole_frame(size: int, cut: float) -> None:
    wire = _wire(Opcode.BINARY, bytes(size), True, True)
    prefix = wire[: int(len(wire) * cut)]
    span = scan_frame(prefix)
    assert span is None or span.size > len(prefix)
    if span is not None:
        assert span.size == len(wire)


def test_the_fast_path_marker_is_a_final_binary_frame_only() -> None:
    assert scan_frame(_wire(Opcode.BINARY, b"x", True, True)).first == FINAL_BINARY  # type: ignore[union-attr]
    assert scan_frame(_wire(Opcode.BINARY, b"x", False, True)).first != FINAL_BINARY  # type: ignore[union-attr]
    assert scan_frame(_wire(Opcode.TEXT, b"x", True, True)).first != FINAL_BINARY  # type: ignore[union-attr]


@given(
    size=st.one_of(SIZES, st.just(300_000)),
    cut=st.one_of(st.integers(1, 20), st.integers(21, 400_000)),
    extra=st.integers(-400_000, 3_000),
)
def test_a_held_frame_is_completed_from_the_next_read_without_taking_more(
    size: int, cut: int, extra: int
) -> None:
    """The audio channel holds the start of a frame until the rest arrives. The next
    read completes it with exactly the bytes it lacks (the rest of the read is split
    in place, not copied); a read that does not complete it is held whole; a frame
    that turns out too large to hold is handed back untouched, for websockets."""
    from types import SimpleNamespace

    from gateway.ws_fast_path import MAX_HELD_FRAME, BotWebSocket

    wire = _wire(Opcode.BINARY, bytes(range(256)) * (size // 256) + bytes(size % 256), True, True)
    after = b"\x82\x80next"  # the start of the next frame
    cut = min(cut, len(wire) - 1)  # the first read ended inside the frame (maybe inside its header)
    rest = wire[cut:] + after
    data = rest[: max(1, len(rest) + extra)]  # the next read: all of the rest, or less, or a little
    held = bytearray(wire[:cut])
    conn = SimpleNamespace(_holdable=lambda span: span.size <= MAX_HELD_FRAME)

    pos = BotWebSocket._fill_held(conn, held, data)  # type: ignore[arg-type]

    if len(wire) > MAX_HELD_FRAME and cut + len(data) >= 2 + 8:  # its length is known, and too large
        assert pos == 0 and held == wire[:cut]
    elif cut + len(data) < len(wire):  # still incomplete: all of the read is held
        assert pos == -1 and held == (wire[:cut] + data)
    else:
        assert bytes(held) == wire
        assert data[pos:] == after[: len(data) - (len(wire) - cut)]
