"""The handle a worker gets for each bot it owns: state, and commands as methods.

Every command is one XADD to the bot's command stream (``commands_key`` from its
``connected`` event), capped with ``MAXLEN ~``: the documented Redis contract and
nothing else. The gateway validates and delivers; a rejection comes back as a
``command_rejected`` event.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from workers import commands
from workers.audio import to_pcm16
from workers.constants import PLAYBACK_EVENTS

log = logging.getLogger(__name__)


class LeaseLost(RuntimeError):
    """This instance may no longer own the bot: a command now could be a second owner's.

    Raised by :meth:`Bot.send` (and so every command method) once the bot's lease has
    lapsed by this instance's clock or was found taken, typically in a handler that ran
    on past it; nothing was written.
    """

    def __init__(self, bot_id: str) -> None:
        super().__init__(f"{bot_id}: this instance's lease on the bot has lapsed; command not sent")
        self.bot_id = bot_id


@dataclass(frozen=True, slots=True)
class Event:
    """One entry of a bot's events stream (``docs/PROTOCOL.md``)."""

    type: str
    bot_id: str
    fields: dict[str, str]
    entry_id: str

    @property
    def data(self) -> dict[str, Any] | None:
        """The bot's original JSON, decoded (``message``, ``ready``...), if any."""
        raw = self.fields.get("data")
        if raw is None:
            return None
        try:
            value = json.loads(raw)
        except ValueError:
            return None
        return value if isinstance(value, dict) else None

    def get(self, name: str, default: str | None = None) -> str | None:
        return self.fields.get(name, default)


@dataclass
class Bot:
    """One bot, as seen by the instance that owns it now."""

    bot_id: str
    commands_key: str
    _client: Any = field(repr=False)
    command_maxlen: int = 1000
    say_chunk_s: float = 2.0
    name: str | None = None  # the bot's display name: its own voice comes back under it
    #: True when this instance took the bot over from another (pending entries were claimed).
    taken_over: bool = False
    ready: bool = False
    connected: bool = True
    commands_sent: int = 0
    #: Free for the worker's own per-bot state (the SDK never touches it).
    state: dict[str, Any] = field(default_factory=dict)
    _playing_until: float = 0.0  # monotonic; from our own say() bookkeeping
    _playback_state: bool | None = None  # from the gateway's playback events, once seen
    #: Whether this instance still owns the bot (set by the Worker; None: always).
    _owned: Callable[[], bool] | None = field(default=None, repr=False)

    # -- state ---------------------------------------------------------------

    @property
    def is_playing(self) -> bool:
        """Whether the bot is playing audio: the gateway's playback events when it
        sends them, else our own estimate from what :meth:`say` queued."""
        if self._playback_state is not None:
            return self._playback_state
        return time.monotonic() < self._playing_until

    def note_playback(self, event: Event) -> None:
        if event.type in PLAYBACK_EVENTS:
            self._playback_state = event.type == "playback_started"
            if not self._playback_state:
                self._playing_until = 0.0

    # -- commands ------------------------------------------------------------

    async def send(self, entry: commands.Fields) -> str:
        """XADD one prepared entry (see :mod:`workers.commands`); returns its id.

        Raises :class:`LeaseLost`, writing nothing, once this instance may no longer own
        the bot: a handler that outlives its lease must not act beside the new owner.
        """
        if self._owned is not None and not self._owned():
            raise LeaseLost(self.bot_id)
        entry_id = await self._client.xadd(
            self.commands_key, entry, maxlen=self.command_maxlen, approximate=True
        )
        self.commands_sent += 1
        return entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)

    async def say(
        self, pcm: bytes | np.ndarray, sample_rate: int, *, utterance_id: str | None = None
    ) -> float:
        """Play PCM16 (bytes or an int16/float32 array) of any length; returns seconds queued.

        Long audio goes out in ``say_chunk_s`` pieces so no entry nears the
        gateway's size limit; they are consecutive in the stream, so they play in order.
        """
        data = to_pcm16(pcm)
        step = max(2, int(self.say_chunk_s * sample_rate) * 2)
        for start in range(0, len(data), step):
            await self.send(commands.sendaudio(data[start : start + step], sample_rate, utterance_id))
        duration = len(data) / 2 / sample_rate
        now = time.monotonic()
        self._playing_until = max(now, self._playing_until) + duration
        return duration

    async def chat(self, text: str) -> None:
        """Post ``text`` in the meeting chat (``sendmsg``)."""
        await self.send(commands.sendmsg(text))

    async def stream_chat(
        self,
        tokens: AsyncIterable[str] | Iterable[str],
        *,
        role: str = "assistant",
        min_interval_s: float = 0.1,
    ) -> str:
        """Stream tokens as interim ``sendchat`` messages (``is_final`` false), at most one
        per ``min_interval_s``, then the whole text as final; returns the text."""
        text = ""
        last_sent = 0.0
        sent_text = None

        async def interim() -> None:
            nonlocal last_sent, sent_text
            now = time.monotonic()
            if now - last_sent >= min_interval_s and text != sent_text:
                await self.send(commands.sendchat(text, is_final=False, role=role))
                last_sent, sent_text = now, text

        if isinstance(tokens, AsyncIterable):
            async for token in tokens:
                text += token
                await interim()
        else:
            for token in tokens:
                text += token
                await interim()
        await self.send(commands.sendchat(text, is_final=True, role=role))
        return text

    async def interrupt(self) -> None:
        """Stop what the bot is playing and clear its audio queue."""
        await self.send(commands.interrupt())
        self._playing_until = 0.0

    async def show_image(self, image: bytes) -> None:
        """Show a JPEG/PNG image (sent raw in MessagePack)."""
        await self.send(commands.sendimg(image))

    async def show_image_url(self, url: str) -> None:
        await self.send(commands.sendimg_url(url))
