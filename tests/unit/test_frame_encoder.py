"""The per-connection frame encoder must write exactly the XADD the general encoder writes.

It skips decoding a frame whose header and size repeat the previous frame's; these
tests feed it streams where headers repeat, change, and break, and compare every
command, byte for byte and as Redis reads it (hiredis), with the slow path.
"""

from __future__ import annotations

import hiredis
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.exceptions import FrameError
from gateway.protocol import AudioFrame, audio_pcm_offset, parse_audio_frame
from gateway.resp import MAX_KNOWN_HEADERS, AudioEncoder, FrameEncoder

KEY = "ms:bot:b1:audio"


def _as_redis_reads(pieces: list[bytes]) -> list[bytes]:
    reader = hiredis.Reader()
    reader.feed(b"".join(pieces))
    command = reader.gets()
    assert reader.gets() is False, "one command, nothing left over"
    return command


def _expected(encoder: AudioEncoder, data: bytes, seq: int, conn: bytes, ts_ms: int) -> list[bytes] | str:
    try:
        frame = parse_audio_frame(data)
    except FrameError as exc:
        return exc.reason
    return encoder.encode(KEY, frame.speaker_id, frame.speaker_name, frame.pcm, seq, conn, ts_ms)


speakers = st.sampled_from([("s1", "Ada"), ("s2", "Grace Hopper"), ("", ""), ("é", "名前"), ("s1", "Ada L.")])
pcm_sizes = st.sampled_from([2, 960, 1920, 9600])
valid_frames = st.builds(
    lambda sp, n, fill: AudioFrame(sp[0], sp[1], bytes([fill]) * n).serialize(),
    speakers,
    pcm_sizes,
    st.integers(0, 255),
)


def _damaged(frame: bytes, cut: int) -> bytes:
    """The frame with its last ``cut`` bytes gone (odd, empty or truncated) or a bad marker."""
    if cut == 0:
        return b"\x02" + frame[1:]
    return frame[:-cut]


frames = valid_frames | st.builds(_damaged, valid_frames, st.integers(0, 40)) | st.binary(max_size=30)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(frames, min_size=1, max_size=12), st.sampled_from([b"c0ffee01", b"x%dy%%", b"%b"]))
def test_every_frame_encodes_as_the_general_encoder_does(stream: list[bytes], conn: bytes) -> None:
    general = AudioEncoder(maxlen=100, sample_rate=48_000)
    per_conn = FrameEncoder(AudioEncoder(maxlen=100, sample_rate=48_000), KEY, conn)
    for seq, data in enumerate(stream):
        ts_ms = 1_764_000_000_000 + seq
        expected = _expected(general, data, seq, conn, ts_ms)
        if isinstance(expected, str):
            with pytest.raises(FrameError) as err:
                per_conn.encode(data, seq, ts_ms)
            assert err.value.reason == expected
            continue
        pieces = per_conn.encode(data, seq, ts_ms)
        assert b"".join(pieces) == b"".join(expected)
        assert pieces[1] == parse_audio_frame(data).pcm


def test_the_command_is_the_xadd_workers_read() -> None:
    encoder = FrameEncoder(AudioEncoder(maxlen=100, sample_rate=48_000), KEY, b"conn%1")
    frame = AudioFrame("spk", "Ada", b"\x01\x02" * 4)
    for seq in (0, 7, 123_456):
        command = _as_redis_reads(encoder.encode(frame.serialize(), seq, 1_764_000_000_123))
        assert command == [
            b"XADD", KEY.encode(), b"MAXLEN", b"~", b"100", b"*",
            b"speaker_id", b"spk", b"speaker_name", b"Ada", b"pcm", b"\x01\x02" * 4,
            b"sample_rate", b"48000", b"seq", b"%d" % seq, b"conn", b"conn%1", b"ts", b"1764000000123",
        ]  # fmt: skip


def test_a_frame_that_repeats_the_header_but_not_the_size_is_checked_again() -> None:
    encoder = FrameEncoder(AudioEncoder(maxlen=100, sample_rate=48_000), KEY, b"c")
    good = AudioFrame("s1", "Ada", bytes(960)).serialize()
    encoder.encode(good, 0, 0)
    with pytest.raises(FrameError) as err:
        encoder.encode(good[:-1], 1, 0)  # same header, odd PCM
    assert err.value.reason == "odd_pcm"
    with pytest.raises(FrameError) as err:
        encoder.encode(good[: len(good) - 960], 2, 0)  # same header, no PCM
    assert err.value.reason == "empty_pcm"
    # A bad frame leaves nothing behind: the next good one still encodes in full.
    assert _as_redis_reads(encoder.encode(good, 3, 0))[11] == bytes(960)


def test_more_speakers_taking_turns_than_it_remembers_still_encode_right() -> None:
    speakers = MAX_KNOWN_HEADERS + 3
    general = AudioEncoder(maxlen=100, sample_rate=48_000)
    per_conn = FrameEncoder(AudioEncoder(maxlen=100, sample_rate=48_000), KEY, b"c")
    turns = [AudioFrame(f"s{i}", f"Speaker {i}", bytes([i]) * 960).serialize() for i in range(speakers)]
    for seq in range(speakers * 3):
        data = turns[seq % speakers if seq < speakers * 2 else (seq * 7) % speakers]
        frame = parse_audio_frame(data)
        expected = general.encode(KEY, frame.speaker_id, frame.speaker_name, frame.pcm, seq, b"c", 5)
        assert b"".join(per_conn.encode(data, seq, 5)) == b"".join(expected)


@given(frames)
def test_the_pcm_offset_is_where_the_parser_finds_the_pcm(data: bytes) -> None:
    try:
        frame = parse_audio_frame(data)
    except FrameError:
        return
    assert audio_pcm_offset(data) == len(data) - len(frame.pcm)
