"""Key naming, settings from flags and environment, and the CLI's key printer."""

import json
import zlib
from pathlib import Path

import pytest
from redis.crc import key_slot

from gateway.cli import main
from gateway.exceptions import ConfigError
from gateway.keys import KeySpace
from gateway.settings import Settings, markdown_table


def test_key_layout_and_hash_tags():
    space = KeySpace()
    keys = space.bot("bot_abc123")
    assert keys.audio == "meetstream:{bot_abc123}:audio"
    assert keys.events == "meetstream:{bot_abc123}:events"
    shard = zlib.crc32(b"bot_abc123") % 16
    assert keys.commands == f"meetstream:{{c{shard:02d}}}:bot_abc123:commands"
    assert key_slot(keys.audio.encode()) == key_slot(keys.events.encode()) == key_slot(b"bot_abc123")
    assert key_slot(keys.commands.encode()) == key_slot(f"c{shard:02d}".encode())
    assert space.global_events == "meetstream:events"


def test_bots_spread_over_all_shards():
    space = KeySpace(command_shards=16)
    shards = {space.bot(f"bot-{i}").shard for i in range(500)}
    assert shards == set(range(16))


def test_prefix_and_shard_width():
    keys = KeySpace("acme", 128).bot("b")
    assert keys.audio.startswith("acme:{b}")
    assert keys.commands.startswith("acme:{c") and len(keys.commands.split("}")[0]) == len("acme:{c000")
    with pytest.raises(ValueError):
        KeySpace("bad{prefix}")


def test_settings_flags_over_env_over_defaults():
    env = {"MEETSTREAM_PORT": "9000", "MEETSTREAM_AUDIO_MAXLEN": "1200", "MEETSTREAM_KEY_PREFIX": "envp"}
    s = Settings.from_sources(["--port", "9001", "--redis-url", "redis://u:pw@h:6379/0"], env)
    assert s.port == 9001
    assert s.audio_maxlen == 1200
    assert s.key_prefix == "envp"
    assert s.metrics_port == 9108
    assert "pw" not in repr(s) and "redis://u:***@h:6379/0" in repr(s)


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"MEETSTREAM_PORT": "x"}, "port"),
        ({"MEETSTREAM_PORT": "70000"}, "port"),
        ({"MEETSTREAM_AUDIO_MAXLEN": "0"}, "audio_maxlen"),
        ({"MEETSTREAM_REDIS_CLUSTER": "maybe"}, "redis_cluster"),
        ({"MEETSTREAM_KEY_PREFIX": "a b"}, "key_prefix"),
    ],
)
def test_bad_settings_say_which(env, message):
    with pytest.raises(ConfigError, match=message):
        Settings.from_sources([], env)


def test_readme_lists_every_setting():
    with open(Path(__file__).parents[2] / "README.md") as f:
        readme = f.read()
    for line in markdown_table().splitlines()[2:]:
        flag = line.split("|")[1].strip()
        assert flag in readme, f"{flag} missing from the README's settings table"


def test_cli_keys(capsys):
    assert main(["keys", "bot_abc123"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == {
        "bot_id": "bot_abc123",
        **KeySpace().bot("bot_abc123").as_fields(),
        "global_events_key": "meetstream:events",
        "shard": KeySpace().bot("bot_abc123").shard,
    }
    assert main(["keys", "bad id"]) == 2
