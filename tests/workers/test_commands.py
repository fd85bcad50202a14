"""The SDK's command entries, read back by the gateway's own validator (pure)."""

from __future__ import annotations

import pytest

from gateway.commands import parse_command
from workers import commands


@pytest.mark.parametrize(
    ("entry", "name"),
    [
        (commands.sendaudio(b"\x01\x00" * 480, 48_000), "sendaudio"),
        (commands.sendmsg("hi"), "sendmsg"),
        (commands.sendchat("tok", is_final=False), "sendchat"),
        (commands.interrupt(), "interrupt"),
        (commands.sendimg(b"\x89PNG\r\n\x1a\n" + b"\x00" * 16), "sendimg"),
        (commands.sendimg_url("https://example.com/a.png"), "sendimg_url"),
    ],
)
def test_every_entry_passes_the_gateway_validator(entry, name):
    command = parse_command(entry, "bot_1")
    assert command.name == name
    assert command.payload["bot_id"] == "bot_1"


def test_audio_round_trips_as_raw_bytes():
    pcm = bytes(range(256)) * 4
    assert parse_command(commands.sendaudio(pcm, 16_000), "b").data == pcm


def test_bad_audio_is_refused_before_redis():
    with pytest.raises(ValueError):
        commands.sendaudio(b"\x01", 48_000)
