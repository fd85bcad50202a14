"""The audio frame codec and routing: pure functions, fed bytes."""

import base64
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway import protocol
from gateway.exceptions import BadRoute, FrameError, MessageError
from gateway.protocol import (
    AudioFrame,
    Route,
    handshake_bot_id,
    parse_audio_frame,
    parse_json_object,
    parse_legacy_chunk,
    parse_path,
    validate_bot_id,
)


def vendor_decode(data: bytes):
    """The vendor page's own Python decoder, verbatim but for the name."""
    if len(data) < 5 or data[0] != 0x01:
        return None
    sid_len = int.from_bytes(data[1:3], "little")
    speaker_id = data[3 : 3 + sid_len].decode("utf-8")
    off = 3 + sid_len
    sname_len = int.from_bytes(data[off : off + 2], "little")
    off += 2
    speaker_name = data[off : off + sname_len].decode("utf-8")
    off += sname_len
    return speaker_id, speaker_name, data[off:]


def test_frame_round_trip_and_vendor_decoder_agree():
    frame = AudioFrame("spk-1", "Ada Lovelace", b"\x01\x00\xff\x7f" * 2400)
    data = frame.serialize()
    assert parse_audio_frame(data) == frame
    assert vendor_decode(data) == ("spk-1", "Ada Lovelace", frame.pcm)
    assert frame.duration_s == pytest.approx(0.1)


def test_unicode_names_and_nospeaker_pass_through():
    for name in ("NoSpeaker", "Zoë Ørsted 山田", "Meetstream Bot"):
        frame = AudioFrame("", name, b"\x00\x00")
        assert parse_audio_frame(frame.serialize()).speaker_name == name


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "too_short"),
        (b"\x01\x00\x00\x00", "too_short"),
        (b"\x02\x00\x00\x00\x00\x00\x00", "bad_marker"),
        (b"\x01\x10\x00ab", "truncated"),  # speaker_id length runs past the end
        (b"\x01\x01\x00a\x05\x00ab", "truncated"),  # speaker_name length runs past the end
        (b"\x01\x02\x00\xff\xfe\x00\x00\x00\x00", "bad_utf8"),
        (b"\x01\x00\x00\x02\x00\xc3\x28\x00\x00", "bad_utf8"),
        (b"\x01\x00\x00\x00\x00\x00\x00\x00", "odd_pcm"),
        (b"\x01\x01\x00a\x01\x00b", "empty_pcm"),
    ],
)
def test_malformed_frames_have_a_reason(data, reason):
    with pytest.raises(FrameError) as err:
        parse_audio_frame(data)
    assert err.value.reason == reason


@given(st.binary(max_size=64))
def test_any_bytes_parse_or_raise_frame_error(data):
    try:
        frame = parse_audio_frame(data)
    except FrameError:
        return
    assert parse_audio_frame(frame.serialize()) == frame


@given(
    st.text(max_size=40),
    st.text(max_size=40),
    st.binary(min_size=1, max_size=200).filter(lambda b: len(b) % 2 == 0),
)
def test_every_valid_frame_round_trips(sid, name, pcm):
    frame = AudioFrame(sid, name, pcm)
    assert parse_audio_frame(frame.serialize()) == frame


def test_legacy_pcm_chunk():
    pcm = b"\x10\x00\x20\x00"
    msg = {"type": "PCMChunk", "speakerName": "Ada", "audioData": base64.b64encode(pcm).decode()}
    frame = parse_legacy_chunk(msg)
    assert (frame.speaker_id, frame.speaker_name, frame.pcm) == ("", "Ada", pcm)
    with pytest.raises(FrameError, match="odd_pcm"):
        parse_legacy_chunk({**msg, "audioData": base64.b64encode(b"\x00").decode()})
    with pytest.raises(FrameError, match="bad_legacy"):
        parse_legacy_chunk({**msg, "audioData": "not base64!"})
    with pytest.raises(FrameError, match="bad_legacy"):
        parse_legacy_chunk({"type": "PCMChunk", "audioData": "AAA="})


def test_json_objects_only():
    assert parse_json_object('{"type": "ready"}') == {"type": "ready"}
    with pytest.raises(MessageError, match="bad_json"):
        parse_json_object("{nope")
    with pytest.raises(MessageError, match="not_object"):
        parse_json_object(json.dumps([1, 2]))


@pytest.mark.parametrize(
    "text",
    [
        "[" * 100_000 + "]" * 100_000,
        '{"type":"message","data":' + '{"a":' * 100_000 + "1" + "}" * 100_000 + "}",
        "[" * 100_000,  # and not even closed
    ],
    ids=["array", "in_an_object", "unclosed"],
)
def test_json_nested_past_the_recursion_limit_is_bad_json(text):
    """Deep JSON under the size limit closed a healthy connection with 1011 (issue 20)."""
    for parse in (parse_json_object, lambda t: protocol.parse_json_message(t)):
        with pytest.raises(MessageError) as err:
            parse(text)
        assert err.value.reason == "bad_json"


def test_strict_json_is_published_as_the_bot_sent_it():
    text = '{"type": "ready",  "bot_id": "b1", "name": "Zo\\u00eb \\ud83d\\ude00 Zoë", "n": 1.5e3}'
    obj, out = protocol.parse_json_message(text)
    assert out is text  # not a copy: nothing to normalise, nothing spent
    assert obj == json.loads(text)


def _strict_loads(text: str):
    """A strict parser, as in most other languages: no NaN, no Infinity, no duplicate keys."""

    def pairs(items):
        assert len({k for k, _ in items}) == len(items), items
        return dict(items)

    def constant(name):
        raise AssertionError(name)

    return json.loads(text, object_pairs_hook=pairs, parse_constant=constant)


@pytest.mark.parametrize(
    ("text", "normalized"),
    [
        ('{"type":"m","x":NaN}', {"type": "m", "x": None}),
        ('{"type":"m","x":[Infinity,-Infinity,1]}', {"type": "m", "x": [None, None, 1]}),
        ('{"type":"a","type":"b"}', {"type": "b"}),
        ('{"type":"m","x":{"k":1,"k":2}}', {"type": "m", "x": {"k": 2}}),
        ('{"type":"m","x":NaN,"big":1e999}', {"type": "m", "x": None, "big": None}),
        ('{"type":"m","s":"\\ud83d","x":NaN}', {"type": "m", "s": "\ud83d", "x": None}),
    ],
    ids=["nan", "infinity", "duplicate", "nested_duplicate", "overflow", "lone_surrogate"],
)
def test_non_strict_json_is_normalized_for_other_languages(text, normalized):
    """NaN, Infinity and duplicate keys: published as strict JSON (null, last key wins)."""
    obj, out = protocol.parse_json_message(text)
    assert obj == normalized
    out.encode("utf-8")  # publishable
    assert _strict_loads(out) == normalized
    assert parse_json_object(text) == normalized


@given(st.text(max_size=80) | st.sampled_from(['{"a":NaN}', '{"a":1,"a":2}', '{"a":"\\udc00"}']))
def test_published_text_is_always_strict_json(text):
    try:
        obj, out = protocol.parse_json_message(text)
    except MessageError:
        return
    out.encode("utf-8")
    assert _strict_loads(out) == obj
    if out != text:  # normalised only when the bot's own text was not strict
        with pytest.raises((AssertionError, ValueError)):
            _strict_loads(text)


@pytest.mark.parametrize(
    ("path", "route"),
    [
        ("/bot_abc123/audio", Route("audio", "bot_abc123")),
        ("/bot_abc123/control", Route("control", "bot_abc123")),
        ("/bot_abc123/control?token=x", Route("control", "bot_abc123")),
        ("/audio", Route("audio", None)),
        ("/control/", Route("control", None)),
    ],
)
def test_paths(path, route):
    assert parse_path(path) == route


@pytest.mark.parametrize(
    "path", ["/", "/bot/video", "/a/b/audio", "audio", "/{x}/audio", "/" + "a" * 200 + "/audio"]
)
def test_bad_paths(path):
    with pytest.raises(BadRoute):
        parse_path(path)


def test_bot_id_alphabet():
    assert validate_bot_id("bot_abc-123.x:y@z") == "bot_abc-123.x:y@z"
    for bad in ("", "a b", "{tag}", "x" * 129, 12, None, "é"):
        with pytest.raises(BadRoute):
            validate_bot_id(bad)


def test_handshake_and_path_must_agree():
    assert handshake_bot_id({"bot_id": "b1"}, Route("control", None)) == "b1"
    assert handshake_bot_id({}, Route("control", "b1")) == "b1"
    assert handshake_bot_id({"bot_id": "b1"}, Route("control", "b1")) == "b1"
    with pytest.raises(BadRoute, match="bot_id_mismatch"):
        handshake_bot_id({"bot_id": "b2"}, Route("control", "b1"))
    with pytest.raises(BadRoute, match="no_bot_id"):
        handshake_bot_id({"type": "ready"}, Route("audio", None))


def test_a_string_with_no_utf8_form_is_written_escaped_not_raised():
    """The last line of defence under validation: an event that echoes a lone surrogate
    must not kill the task that publishes it."""
    from gateway.resp import encode_arg

    assert encode_arg("cut \ud83d") == b"cut \\ud83d"
    assert encode_arg("Zo\u00eb") == "Zoë".encode()
