"""Property-based tests: no input makes the codec or the validator raise anything but its own error."""

from __future__ import annotations

import contextlib
import json

import msgpack
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.commands import COMMANDS, SPECS, parse_command
from gateway.exceptions import CommandRejected, FrameError, MessageError
from gateway.protocol import is_legacy_chunk, parse_json_object, parse_legacy_chunk

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=False)
    | st.text(max_size=30)
)
json_values = st.recursive(
    json_scalars,
    lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=4),
    max_leaves=12,
)
field_names = st.sampled_from(sorted({f for spec in SPECS.values() for f in spec} | {"bot_id", "x", "msg"}))
command_maps = st.fixed_dictionaries(
    {"command": st.sampled_from([*COMMANDS, "nope"])},
    optional={"bot_id": st.sampled_from(["bot_1", "bot_2"])},
).flatmap(
    lambda base: st.dictionaries(field_names, json_values | st.binary(max_size=20), max_size=6).map(
        lambda extra: {**extra, **base}
    )
)


def _check(fields):
    try:
        cmd = parse_command(fields, "bot_1", entry_id="1-0", max_bytes=10_000)
    except CommandRejected as exc:
        assert exc.reason and exc.detail
        return
    sent = json.loads(cmd.to_json())
    assert sent["command"] in COMMANDS and sent["bot_id"] == "bot_1"


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(command_maps)
def test_msgpack_commands_validate_or_reject(command):
    _check({b"msgpack": msgpack.packb(command, use_bin_type=True)})


@settings(max_examples=400)
@given(command_maps.filter(lambda c: not any(isinstance(v, bytes) for v in c.values())))
def test_json_commands_validate_or_reject(command):
    _check({b"json": json.dumps(command).encode()})


@given(st.dictionaries(st.sampled_from([b"json", b"msgpack", b"other"]), st.binary(max_size=40), max_size=3))
def test_arbitrary_entries_validate_or_reject(fields):
    _check(fields)


@given(st.text(max_size=60) | st.binary(max_size=60))
def test_text_frames_parse_or_raise_message_error(text):
    try:
        obj = parse_json_object(text)
    except MessageError:
        return
    if is_legacy_chunk(obj):
        with contextlib.suppress(FrameError):
            parse_legacy_chunk(obj)


@given(
    st.dictionaries(
        st.sampled_from(["type", "speakerName", "audioData", "speakerId"]), json_values, max_size=4
    )
)
def test_legacy_chunks_parse_or_raise_frame_error(message):
    message = {**message, "type": "PCMChunk"}
    try:
        frame = parse_legacy_chunk(message)
    except FrameError:
        return
    assert frame.pcm and len(frame.pcm) % 2 == 0
