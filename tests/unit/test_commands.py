"""Command validation against the vendor's tables."""

import base64
import json

import msgpack
import pytest

from gateway.commands import COMMANDS, SPECS, parse_command
from gateway.exceptions import CommandRejected

PCM = b"\x01\x00\x02\x00\x03\x00"
B64 = base64.b64encode(PCM).decode()


def j(obj):
    return {b"json": json.dumps(obj).encode()}


def rejected(fields, bot="bot_1"):
    with pytest.raises(CommandRejected) as err:
        parse_command(fields, bot, entry_id="1-0")
    return err.value


def test_vendor_examples_pass_verbatim():
    examples = [
        {
            "command": "sendaudio",
            "bot_id": "bot_1",
            "audiochunk": B64,
            "sample_rate": 48000,
            "encoding": "pcm16",
            "channels": 1,
            "endianness": "little",
        },
        {
            "command": "sendmsg",
            "bot_id": "bot_1",
            "message": "Hello from the bot!",
            "msg": "Hello from the bot!",
        },
        {
            "command": "sendchat",
            "bot_id": "bot_1",
            "role": "assistant",
            "text": "Here is my response...",
            "is_final": True,
        },
        {"command": "interrupt", "bot_id": "bot_1", "action": "clear_audio_queue"},
        {"command": "sendimg", "bot_id": "bot_1", "img": base64.b64encode(b"\x89PNG\r\n\x1a\n....").decode()},
        {"command": "sendimg_url", "bot_id": "bot_1", "img_url": "https://example.com/bot-avatar.png"},
    ]
    assert {e["command"] for e in examples} == set(COMMANDS) == set(SPECS)
    for example in examples:
        cmd = parse_command(j(example), "bot_1", entry_id="5-0")
        assert cmd.payload == example
        assert json.loads(cmd.to_json()) == example
        assert cmd.entry_id == "5-0"


def test_bot_id_is_filled_in():
    cmd = parse_command(j({"command": "interrupt", "action": "clear_audio_queue"}), "bot_9")
    assert cmd.payload == {"command": "interrupt", "bot_id": "bot_9", "action": "clear_audio_queue"}


def test_sendmsg_sends_both_fields():
    for given in ({"message": "hi"}, {"msg": "hi"}, {"message": "hi", "msg": "hi"}):
        cmd = parse_command(j({"command": "sendmsg", **given}), "b")
        assert cmd.payload["message"] == cmd.payload["msg"] == "hi"
    assert rejected(j({"command": "sendmsg", "message": "a", "msg": "b"})).reason == "bad_field"
    assert rejected(j({"command": "sendmsg"})).reason == "missing_field"


def test_msgpack_with_raw_audio_bytes():
    packed = msgpack.packb({"command": "sendaudio", "audiochunk": PCM, "sample_rate": 48000})
    cmd = parse_command({b"msgpack": packed}, "bot_1")
    assert cmd.data == PCM


def test_msgpack_raw_image_is_sent_as_base64():
    png = b"\x89PNG\r\n\x1a\n" + b"\x00" * 32
    cmd = parse_command({b"msgpack": msgpack.packb({"command": "sendimg", "img": png})}, "bot_1")
    assert json.loads(cmd.to_json())["img"] == base64.b64encode(png).decode()


@pytest.mark.parametrize(
    ("fields", "reason", "detail"),
    [
        ({b"other": b"x"}, "bad_encoding", "exactly one of"),
        ({b"json": b"{}", b"msgpack": b"\x80"}, "bad_encoding", "exactly one of"),
        ({b"json": b"{not json"}, "bad_encoding", "does not decode"),
        ({b"json": b"[1]"}, "bad_encoding", "must be a map"),
        ({b"msgpack": b"\xc1"}, "bad_encoding", "does not decode"),
        (j({"command": "dance"}), "unknown_command", "'dance'"),
        (j({"action": "clear_audio_queue"}), "unknown_command", "the command field is missing: it must be"),
        (j({"command": None}), "unknown_command", "must be a string, one of sendaudio"),
        (j({"command": 42}), "unknown_command", "got a number"),
        (j({"command": ["sendmsg"]}), "unknown_command", "got an array"),
        ({b"msgpack": msgpack.packb({"command": b"sendmsg"})}, "unknown_command", "got binary data"),
        (j({"command": "interrupt"}), "missing_field", "action is required"),
        (j({"command": "interrupt", "action": "stop"}), "bad_field", "action must be one of"),
        (j({"command": "sendaudio", "audiochunk": B64}), "missing_field", "sample_rate"),
        (j({"command": "sendaudio", "audiochunk": B64, "sample_rate": "48000"}), "bad_field", "integer"),
        (j({"command": "sendaudio", "audiochunk": B64, "sample_rate": True}), "bad_field", "integer"),
        (j({"command": "sendaudio", "audiochunk": "%%%", "sample_rate": 48000}), "bad_field", "base64"),
        (
            j(
                {
                    "command": "sendaudio",
                    "audiochunk": base64.b64encode(b"abc").decode(),
                    "sample_rate": 48000,
                }
            ),
            "bad_field",
            "whole PCM16",
        ),
        (
            j({"command": "sendaudio", "audiochunk": B64, "sample_rate": 48000, "channels": 2}),
            "bad_field",
            "channels",
        ),
        (
            j({"command": "sendaudio", "audiochunk": B64, "sample_rate": 48000, "encoding": "mp3"}),
            "bad_field",
            "encoding",
        ),
        (
            j({"command": "sendchat", "role": "assistant", "text": "x", "is_final": "yes"}),
            "bad_field",
            "boolean",
        ),
        (j({"command": "sendchat", "role": "robot", "text": "x", "is_final": True}), "bad_field", "role"),
        (
            j({"command": "sendchat", "role": "user", "text": "x", "is_final": True, "extra": 1}),
            "unknown_field",
            "extra",
        ),
        (j({"command": "sendimg_url", "img_url": ""}), "bad_field", "empty"),
        (
            j({"command": "interrupt", "bot_id": "bot_2", "action": "clear_audio_queue"}),
            "bot_id_mismatch",
            "bot_2",
        ),
    ],
)
def test_rejections_are_precise(fields, reason, detail):
    exc = rejected(fields)
    assert exc.reason == reason
    assert detail in exc.detail
    # Workers in any language read details: no Python type names in them.
    assert "NoneType" not in exc.detail and "'int'" not in exc.detail


def test_too_large():
    big = j({"command": "sendmsg", "message": "x" * 100})
    with pytest.raises(CommandRejected) as err:
        parse_command(big, "b", max_bytes=50)
    assert err.value.reason == "too_large"


def test_str_fields_from_redis_decode_responses():
    cmd = parse_command({"json": '{"command":"sendmsg","msg":"hey"}'}, "b")
    assert cmd.payload["message"] == "hey"


# -- Poison entries (issue 20): each one crashed the reader or slipped through before ----------

DETAIL_MAX = 300
_SKELETONS = {
    "sendaudio": {"command": "sendaudio", "audiochunk": B64, "sample_rate": 48000},
    "sendmsg": {"command": "sendmsg", "message": "hi"},
    "sendchat": {"command": "sendchat", "role": "user", "text": "hi", "is_final": True},
    "interrupt": {"command": "interrupt", "action": "clear_audio_queue"},
    "sendimg_url": {"command": "sendimg_url", "img_url": "https://example.com/a.png"},
}


def _json_text(pairs: str) -> dict:
    """A json field written by hand: what json.dumps cannot produce (NaN is fine, duplicates are not)."""
    return {b"json": ("{" + pairs + "}").encode()}


def assert_safe_rejection(fields, reason: str, detail: str = "") -> CommandRejected:
    """Exactly one CommandRejected, whose detail can be published: UTF-8, bounded."""
    exc = rejected(fields)
    assert exc.reason == reason, exc
    assert detail in exc.detail
    exc.detail.encode("utf-8")
    assert 0 < len(exc.detail) <= DETAIL_MAX
    return exc


@pytest.mark.parametrize(
    "fields",
    [
        {b"json": b"[" * 100_000 + b"]" * 100_000},
        _json_text('"command":"sendmsg","message":' + "[" * 100_000 + "]" * 100_000),
        _json_text('"command":"sendmsg","message":' + '{"a":' * 100_000 + "1" + "}" * 100_000),
    ],
    ids=["array", "in_a_field", "objects"],
)
def test_json_nested_past_the_recursion_limit_is_rejected(fields):
    assert_safe_rejection(fields, "bad_encoding", "nested too deeply")


def test_msgpack_nested_deeply_is_rejected():
    assert_safe_rejection({b"msgpack": b"\x91" * 100_000 + b"\x00"}, "bad_encoding", "does not decode")


def test_field_name_not_utf8_is_rejected_or_ignored():
    exc = assert_safe_rejection({b"\xff\xfe": b"x", b"js\x80on": b"{}"}, "bad_encoding", "exactly one of")
    assert "\\xff\\xfe" in exc.detail  # shown escaped, never raw
    # Next to a good json field, an extra field is ignored, as any other extra field is.
    cmd = parse_command({b"\xff": b"x", **j({"command": "sendmsg", "message": "hi"})}, "bot_1")
    assert cmd.payload["msg"] == "hi"


def test_field_value_from_decode_responses_with_surrogates_is_rejected():
    # redis-py with decode_responses and errors="surrogateescape" hands such a str over.
    assert_safe_rejection({"json": '{"command":"sendmsg","message":"\udcff"}'}, "bad_encoding", "UTF-8")


def test_json_bytes_not_utf8_are_rejected():
    # CESU-8 (a surrogate encoded as UTF-8), which json.loads' surrogatepass let through.
    raw = '{"command":"sendmsg","message":"\ud83d"}'.encode("utf-8", "surrogatepass")
    assert_safe_rejection({b"json": raw}, "bad_encoding", "UTF-8")


@pytest.mark.parametrize(
    "command",
    [
        {b"command": "sendmsg", "message": "hi"},
        {"command": "sendmsg", "message": "hi", b"msg": "hi"},
        {"command": "sendmsg", b"\xff": 1, "message": "hi"},
    ],
    ids=["bytes_only", "mixed", "invalid_utf8"],
)
def test_msgpack_binary_keys_are_rejected(command):
    packed = msgpack.packb(command, use_bin_type=True)
    assert_safe_rejection({b"msgpack": packed}, "bad_encoding", "field names must be strings")


def test_msgpack_int_keys_are_rejected_with_a_reason():
    packed = msgpack.packb({"command": "sendmsg", "message": "hi", 1: 2})
    exc = assert_safe_rejection({b"msgpack": packed}, "bad_encoding", "does not decode")
    assert "map key" in exc.detail


_SURROGATE_FIELDS = [
    ("sendaudio", "utterance_id"),
    ("sendmsg", "message"),
    ("sendmsg", "msg"),
    ("sendchat", "text"),
    ("sendchat", "role"),
    ("interrupt", "action"),
    ("sendimg_url", "img_url"),
]


@pytest.mark.parametrize(("command", "name"), _SURROGATE_FIELDS)
@pytest.mark.parametrize("text", ["\ud83d", "cut inside an emoji \ud83d", "\ude00 tail", "ok\udfff"])
def test_lone_surrogate_in_any_string_field_is_rejected(command, name, text):
    """What JavaScript's JSON.stringify makes of a string cut inside an emoji: valid JSON, not Unicode."""
    fields = j({**_SKELETONS[command], name: text})
    assert b"\\ud" in fields[b"json"]  # escaped on the wire: the JSON itself is valid
    exc = assert_safe_rejection(fields, "bad_field", name)
    assert "surrogate" in exc.detail


def test_surrogate_pair_is_one_character_and_accepted():
    cmd = parse_command(j({"command": "sendmsg", "message": "\U0001f600"}), "bot_1")
    assert cmd.to_json().encode("utf-8").count("😀".encode()) == 2


@pytest.mark.parametrize(
    "fields",
    [
        j({"command": "sendmsg\ud83d"}),
        j({"command": "sendmsg", "message": "hi", "x\udc00": 1}),
        j({"command": "sendmsg", "message": "hi", "bot_id": "b\ud83d"}),
    ],
    ids=["command", "unknown_field", "bot_id"],
)
def test_rejection_details_never_echo_surrogates(fields):
    exc = rejected(fields)
    exc.detail.encode("utf-8")
    str(exc).encode("utf-8")


@pytest.mark.parametrize("constant", ["NaN", "Infinity", "-Infinity"])
def test_json_nan_and_infinity_are_rejected(constant):
    assert_safe_rejection(
        _json_text(f'"command":"sendmsg","message":"x","msg":{constant}'), "bad_encoding", constant
    )


def test_json_duplicate_keys_are_rejected():
    exc = assert_safe_rejection(
        _json_text('"command":"sendmsg","message":"yes","message":"no"'), "bad_encoding", "'message'"
    )
    assert "twice" in exc.detail


def test_msgpack_duplicate_keys_are_rejected():
    # A map header of 3 pairs, written by hand: no encoder writes a key twice from a dict.
    packed = b"\x83" + b"".join(msgpack.packb(x) for x in ("command", "sendmsg", "msg", "a", "msg", "b"))
    assert_safe_rejection({b"msgpack": packed}, "bad_encoding", "'msg'")


def test_huge_ints_are_rejected_with_a_bounded_detail():
    huge = _json_text('"command":"sendaudio","audiochunk":"' + B64 + '","sample_rate":' + "9" * 4000)
    assert_safe_rejection(huge, "bad_field", "sample_rate")
    past_the_int_limit = _json_text('"command":"sendmsg","message":"x","msg":' + "9" * 5000)
    assert_safe_rejection(past_the_int_limit, "bad_encoding", "does not decode")


@pytest.mark.parametrize(
    ("command", "name"),
    [("sendaudio", "sample_rate"), ("sendmsg", "message"), ("sendchat", "is_final"), ("sendchat", "text")],
)
@pytest.mark.parametrize("value", [{"a": 1}, [], [[["deep"]]], None, 1.5])
def test_nested_values_where_a_scalar_is_expected(command, name, value):
    assert_safe_rejection(j({**_SKELETONS[command], name: value}), "bad_field", name)


def test_bot_id_that_is_not_a_string():
    nested: list = []
    for _ in range(500):
        nested = [nested]
    exc = assert_safe_rejection(
        j({"command": "sendmsg", "message": "hi", "bot_id": nested}), "bot_id_mismatch", "list"
    )
    assert "[[" not in exc.detail


@pytest.mark.parametrize(
    "fields",
    [
        j({"command": "x" * 10_000}),
        j({"command": "sendmsg", "message": "hi", **{f"field_{n}_" + "y" * 50: 1 for n in range(200)}}),
        {b"json": b"{}", **{b"f%d" % n + b"z" * 50: b"" for n in range(200)}, b"msgpack": b"\x80"},
    ],
    ids=["command", "unknown_fields", "field_names"],
)
def test_details_are_bounded(fields):
    exc = rejected(fields)
    assert len(exc.detail) <= DETAIL_MAX
