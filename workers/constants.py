"""Every Redis key name and default of the worker SDK, in one place.

The gateway's keys (``docs/PROTOCOL.md``) are built here by the same rule as
``gateway/keys.py`` (the global ``{prefix}:events`` and a bot's ``{prefix}:{BOT}:events``
and ``:audio``), except the command stream, whose shard tag is the gateway's to
choose: its name is read from the bot's ``connected`` event, never computed.
The SDK adds two keys of its own, both single-key and Cluster-safe::

    {prefix}:{BOT}:lease:{group}     who in a worker group owns the bot (SET NX PX)
    {prefix}:workers:{group}:bots    hash bot_id -> commands_key: the group's live bots

The lease carries the bot's own hash tag, so it lives in the slot of the bot's
audio and events streams. Two more keys per group, one each (``docs/PROTOCOL.md``)::

    {prefix}:workers:{group}:instances   sorted set: the live members, for balance
    {prefix}:workers:{group}:journal     stream: who took and let go which bot, when
"""

from __future__ import annotations

import re

DEFAULT_PREFIX = "meetstream"
DEFAULT_GROUP = "workers"
#: The gateway's own consumer group on command streams: never ours to read.
GATEWAY_GROUP = "gateway"

#: What the audio stream calls unattributed audio.
NO_SPEAKER = "NoSpeaker"
BOT_SAMPLE_RATE = 48_000

PLAYBACK_EVENTS = ("playback_started", "playback_finished", "playback_interrupted")
LIFECYCLE_EVENTS = ("connected", "ready", "audio_handshake", "disconnected", "session_ended")
#: Why an instance stopped handling a bot (passed to ``on_bot_stop`` handlers).
STOP_REASONS = ("session_ended", "released", "lease_lost", "expired", "error")

_NAME_RE = re.compile(r"[A-Za-z0-9_.:@-]{1,64}")


def check_group(name: str) -> str:
    """A group name goes into key names and consumer groups: keep it plain, never braces."""
    if not _NAME_RE.fullmatch(name) or name == GATEWAY_GROUP:
        raise ValueError(f"worker group {name!r}: 1-64 of A-Z a-z 0-9 _ . : @ -, and not 'gateway'")
    return name


def global_events_key(prefix: str) -> str:
    return f"{prefix}:events"


def bot_events_key(prefix: str, bot_id: str) -> str:
    return f"{prefix}:{{{bot_id}}}:events"


def bot_audio_key(prefix: str, bot_id: str) -> str:
    return f"{prefix}:{{{bot_id}}}:audio"


def lease_key(prefix: str, bot_id: str, group: str) -> str:
    return f"{prefix}:{{{bot_id}}}:lease:{group}"


def registry_key(prefix: str, group: str) -> str:
    return f"{prefix}:workers:{group}:bots"


def members_key(prefix: str, group: str) -> str:
    return f"{prefix}:workers:{group}:instances"


def journal_key(prefix: str, group: str) -> str:
    return f"{prefix}:workers:{group}:journal"
