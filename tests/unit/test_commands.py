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
        (j({"action": "clear_audio_queue"}), "unknown_command", "NoneType"),
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


def test_too_large():
    big = j({"command": "sendmsg", "message": "x" * 100})
    with pytest.raises(CommandRejected) as err:
        parse_command(big, "b", max_bytes=50)
    assert err.value.reason == "too_large"


def test_str_fields_from_redis_decode_responses():
    cmd = parse_command({"json": '{"command":"sendmsg","msg":"hey"}'}, "b")
    assert cmd.payload["message"] == "hey"
