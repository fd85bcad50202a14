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
