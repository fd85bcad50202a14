"""Every Redis key name the gateway uses, in one place (pure; no I/O).

Per-bot data streams carry the bot's own Cluster hash tag, so bots spread over
all slots::

    {prefix}:{BOT}:audio      audio frames
    {prefix}:{BOT}:events     the bot's events
    {prefix}:events           every bot's lifecycle (discovery)

Command streams carry a *shard* hash tag instead, derived from the bot_id::

    {prefix}:{cNN}:BOT:commands      NN = crc32(bot_id) % command_shards, 2 digits+

so that one gateway reads the commands of all its bots in a shard with a single
blocking XREADGROUP (all keys of one XREADGROUP must share a slot on a cluster).
Workers never need to rebuild this rule: each bot's key names are announced in
its lifecycle events, and ``meetstream-gateway keys BOT_ID`` prints them.
"""

from __future__ import annotations

import re
import zlib
from dataclasses import dataclass

DEFAULT_PREFIX = "meetstream"
DEFAULT_COMMAND_SHARDS = 16
#: Consumer group the gateway reads command streams with.
COMMAND_GROUP = "gateway"


def command_shard(bot_id: str, shards: int) -> int:
    """The shard of a bot's command stream: CRC-32 (IEEE, as zlib) of the UTF-8 id."""
    return zlib.crc32(bot_id.encode()) % shards


def shard_tag(shard: int, shards: int) -> str:
    width = max(2, len(str(shards - 1)))
    return f"c{shard:0{width}d}"


@dataclass(frozen=True, slots=True)
class BotKeys:
    """The key names of one bot."""

    bot_id: str
    audio: str
    events: str
    commands: str
    shard: int

    def as_fields(self) -> dict[str, str]:
        """The names as event fields, announced in lifecycle events."""
        return {"audio_key": self.audio, "events_key": self.events, "commands_key": self.commands}


@dataclass(frozen=True, slots=True)
class KeySpace:
    """Key naming for one deployment (a prefix and a shard count)."""

    prefix: str = DEFAULT_PREFIX
    command_shards: int = DEFAULT_COMMAND_SHARDS

    def __post_init__(self) -> None:
        if not self.prefix or any(c in self.prefix for c in "{} \t\r\n"):
            raise ValueError("key prefix must be non-empty, without braces or spaces")
        if not 1 <= self.command_shards <= 1024:
            raise ValueError("command_shards must be between 1 and 1024")

    @property
    def global_events(self) -> str:
        return f"{self.prefix}:events"

    def bot(self, bot_id: str) -> BotKeys:
        shard = command_shard(bot_id, self.command_shards)
        tag = shard_tag(shard, self.command_shards)
        return BotKeys(
            bot_id=bot_id,
            audio=f"{self.prefix}:{{{bot_id}}}:audio",
            events=f"{self.prefix}:{{{bot_id}}}:events",
            commands=f"{self.prefix}:{{{tag}}}:{bot_id}:commands",
            shard=shard,
        )

    def command_pattern(self) -> str:
        """A SCAN MATCH glob for every bot's command stream, in any shard (``janitor``).

        Any width of shard number, so streams named under an earlier ``command_shards``
        are found too; the prefix's glob characters are escaped.
        """
        prefix = re.sub(r"([*?\[\]\\])", r"\\\1", self.prefix)
        return f"{prefix}:{{c[0-9]*}}:*:commands"

    def shard_wake(self, shard: int, gateway_id: str) -> str:
        """A gateway's signal stream in a shard's slot, where other gateways write (``command_reader``)."""
        return f"{self.prefix}:{{{shard_tag(shard, self.command_shards)}}}:wake:{gateway_id}"

    def reader_wake(self, shard: int, gateway_id: str, reader: int) -> str:
        """The wake-up stream of one of a gateway's readers of a shard, in the shard's slot."""
        return f"{self.prefix}:{{{shard_tag(shard, self.command_shards)}}}:wake{reader}:{gateway_id}"

    def owner(self, bot_id: str) -> str:
        """Which gateway connection owns the bot's control channel (``gateway_id/conn_id``).

        In the command stream's slot, so that a conditional XACK can read it atomically.
        """
        shard = command_shard(bot_id, self.command_shards)
        return f"{self.prefix}:{{{shard_tag(shard, self.command_shards)}}}:{bot_id}:owner"
