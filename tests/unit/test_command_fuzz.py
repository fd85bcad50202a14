"""Poison-proof command parsing (issue 20): whatever a worker writes, one entry gives either a
Command that can be sent and published, or exactly one CommandRejected that can be published.

Entries are built three ways, so that every layer is reached, not only the decoder:
arbitrary field names and bytes; arbitrary JSON or MessagePack values, nested or not; and
valid command skeletons whose field values are fuzzed (lone surrogates, NaN, huge ints,
nesting, duplicate keys), so that validation runs on values that decoded.
"""

from __future__ import annotations

import base64
import json
import struct

import msgpack
import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.commands import COMMANDS, REJECT_REASONS, SPECS, Command, parse_command
from gateway.exceptions import CommandRejected

DETAIL_MAX = 300
BOT = "bot_1"
PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 8

# Text as a worker in another language might hand it over: lone surrogates included
# (JavaScript strings are UTF-16), and C0/C1 controls and line separators.
_odd_chars = st.sampled_from(["\ud83d", "\ude00", "\udfff", "\ud800", "\x00", "\x85", "\u2028", "\ufeff"])
texts = st.text(st.characters(codec=None) | _odd_chars, max_size=12)
names = texts | st.sampled_from(sorted({f for spec in SPECS.values() for f in spec} | {"command", "bot_id"}))
scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(-(2**63), 2**64 - 1)
    | st.sampled_from([10**400, -(10**30), 48000, 16000, 1, 0])
    | st.floats()
    | texts
)


class RawJson(str):
    """JSON text spliced in as it is: nesting deeper than any encoder would write."""


def _deep(value: object, depth: int) -> RawJson:
    inner = json.dumps(value)
    return RawJson('[{"k":' * depth + inner + "}]" * depth)


values = st.recursive(
    scalars,
    lambda c: st.lists(c, max_size=3) | st.dictionaries(texts, c, max_size=3),
    max_leaves=8,
)
deep_values = st.builds(_deep, scalars, st.integers(1, 3000))
any_values = st.one_of(values, values, values, deep_values, st.binary(max_size=16))
# A string with at least one odd character: uniform draws would rarely make one.
odd_texts = st.builds(lambda a, c, b: a + c + b, texts, _odd_chars, texts)
field_values = st.one_of(odd_texts, odd_texts, texts, any_values)

#: Values the vendor's table accepts, per field: a skeleton made of these is a valid command.
GOOD: dict[str, list[object]] = {
    "audiochunk": [base64.b64encode(b"\x00\x01" * 4).decode(), b"\x00\x01" * 4],
    "sample_rate": [48000, 16000],
    "encoding": ["pcm16", "float32"],
    "channels": [1],
    "endianness": ["little"],
    "utterance_id": ["u-1", "\U0001f600"],
    "message": ["hi", "Zo\u00eb \U0001f600"],
    "msg": ["hi"],
    "role": ["assistant", "user"],
    "text": ["hello"],
    "is_final": [True, False],
    "action": ["clear_audio_queue"],
    "img": [PNG, base64.b64encode(PNG).decode()],
    "img_url": ["https://example.com/a.png", "http://h/x"],
}


def _sometimes(draw: st.DrawFn, one_in: int) -> bool:
    """True about once in ``one_in`` draws; False is what Hypothesis shrinks to (the valid case)."""
    return draw(st.integers(1, one_in)) == one_in


@st.composite
def skeletons(draw: st.DrawFn) -> list[tuple[object, object]]:
    """A valid command as key/value pairs, then one or two values fuzzed, rarely a key added
    or repeated: most skeletons still pass every check but the fuzzed field's, so a value
    that slips through that check reaches a Command (where the property catches it)."""
    command = draw(st.sampled_from(COMMANDS))
    pairs: list[tuple[object, object]] = [("command", command)]
    if draw(st.booleans()):
        pairs.append(("bot_id", BOT))
    pairs += [
        (name, draw(st.sampled_from(GOOD[name])))
        for name, spec in SPECS[command].items()
        if spec.required or draw(st.booleans())
    ]
    if command == "sendmsg" and len(pairs) < 3:
        pairs.append(("message", "hi"))
    for _ in range(draw(st.integers(1, 2))):
        at = draw(st.integers(1, len(pairs) - 1))
        pairs[at] = (pairs[at][0], draw(field_values))
    if _sometimes(draw, 6):
        key = draw(names | st.binary(max_size=4) | st.integers(-3, 3))
        pairs.append((key, draw(any_values)))
    if _sometimes(draw, 8):  # a key twice
        pairs.append((pairs[-1][0], draw(any_values)))
    return draw(st.permutations(pairs))


def _json_text(value: object, ensure_ascii: bool) -> str:
    """JSON as other languages write it: NaN, Infinity and duplicate keys included."""
    if isinstance(value, list) and value and all(isinstance(p, tuple) for p in value):
        members = (f"{_json_text(str(k), ensure_ascii)}:{_json_text(v, ensure_ascii)}" for k, v in value)
        return "{" + ",".join(members) + "}"
    if isinstance(value, RawJson):
        return value
    if isinstance(value, bytes):
        value = value.decode("latin-1")
    return json.dumps(value, ensure_ascii=ensure_ascii)


def _msgpack(value: object) -> bytes:
    if isinstance(value, list) and value and all(isinstance(p, tuple) for p in value):
        head = struct.pack(">BI", 0xDF, len(value))  # map 32: duplicates and any key type survive
        return head + b"".join(_msgpack(k) + _msgpack(v) for k, v in value)
    if isinstance(value, RawJson):
        return b"\x91" * 3000 + b"\xc0"  # an array nested as deep as the JSON one
    try:
        return msgpack.packb(value, use_bin_type=True)
    except (ValueError, TypeError, OverflowError):
        return msgpack.packb(None)  # an int past 64 bits, a surrogate: no encoder would write it


@st.composite
def encoded(draw: st.DrawFn) -> bytes | str:
    """A field value: JSON bytes (any Unicode encoding json.loads reads), MessagePack, or a str."""
    value = draw(skeletons() | any_values)
    if draw(st.booleans()):
        return _msgpack(value)
    text = _json_text(value, ensure_ascii=draw(st.booleans()))
    how = draw(st.sampled_from(["utf-8", "surrogatepass", "utf-16", "str"]))
    if how == "str":
        return text
    if how == "utf-16":
        return text.encode("utf-16", "surrogatepass")
    return text.encode("utf-8", "surrogatepass" if how == "surrogatepass" else "backslashreplace")


field_names = st.sampled_from([b"json", b"msgpack", "json", "msgpack"]) | st.binary(max_size=6) | texts
entries = st.dictionaries(field_names, encoded() | st.binary(max_size=32) | texts, max_size=3)
one_field_entries = st.builds(
    lambda name, raw, extra: {**extra, name: raw},
    st.sampled_from([b"json", b"msgpack"]),
    encoded(),
    st.dictionaries(st.binary(max_size=4), st.binary(max_size=4), max_size=2),
)


def check_safe(fields: dict) -> Command | None:
    """The property: a sendable Command, or one publishable CommandRejected; nothing else escapes."""
    try:
        cmd = parse_command(fields, BOT, entry_id="1-0", max_bytes=1 << 20)
    except CommandRejected as exc:
        assert exc.reason in REJECT_REASONS
        assert 0 < len(exc.detail) <= DETAIL_MAX
        exc.detail.encode("utf-8")
        exc.command.encode("utf-8")
        return None
    assert cmd.name in COMMANDS and cmd.payload["bot_id"] == BOT
    payload = dict(cmd.payload)
    if cmd.name == "sendaudio":
        # Sent as chunks built from the samples (gateway.playback), never as this payload;
        # the utterance_id is published in playback events.
        assert cmd.samples is not None and cmd.samples.dtype == np.int16
        cmd.utterance_id.encode("utf-8")
        payload.pop("audiochunk")
    else:
        assert json.loads(cmd.to_json().encode("utf-8")) == cmd.payload
    text = json.dumps(payload, allow_nan=False, ensure_ascii=False)
    assert json.loads(text.encode("utf-8")) == payload
    return cmd


_settings = settings(max_examples=600, deadline=None, suppress_health_check=list(HealthCheck))


@_settings
@given(one_field_entries)
def test_one_command_field_validates_or_rejects(fields):
    check_safe(fields)


@_settings
@given(entries)
def test_any_entry_validates_or_rejects(fields):
    check_safe(fields)


@settings(max_examples=600, deadline=None, suppress_health_check=list(HealthCheck))
@given(skeletons(), st.booleans())
def test_skeletons_reach_validation(pairs, as_msgpack):
    """Fuzzed values in a real command: validation runs, and what passes is safe."""
    raw = _msgpack(pairs) if as_msgpack else _json_text(pairs, ensure_ascii=True).encode()
    check_safe({b"msgpack" if as_msgpack else b"json": raw})


def test_skeletons_are_accepted_when_nothing_is_fuzzed():
    """The generator is not vacuous: a skeleton of good values is a valid command, both encodings."""
    for command in COMMANDS:
        for pick in (0, -1):
            pairs: list[tuple[object, object]] = [("command", command), ("bot_id", BOT)]
            pairs += [(name, GOOD[name][pick]) for name in SPECS[command] if name != "msg"]
            assert check_safe({b"msgpack": _msgpack(pairs)}) is not None, pairs
            if not any(isinstance(v, bytes) for _, v in pairs):
                assert check_safe({b"json": _json_text(pairs, True).encode()}) is not None, pairs
