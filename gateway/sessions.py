"""Which bots this process holds, and what each open connection of theirs is bound to.

A bot's session lives while at least one of its channels is open: the two
channels connect in either order, and a bot reconnects after a drop. A newer
connection on a channel replaces the older one, which is closed with 4409.

A connection starts unbound. Once it is known whose it is, it gets the part of
its path it needs: a bound audio channel an :class:`AudioInbound` (where its
frames go), a ready control channel a :class:`CommandOutbound` (what delivery
holds for it). Each part exists whole or not at all.
"""

from __future__ import annotations

import asyncio
import itertools
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field

from websockets.asyncio.server import ServerConnection

from gateway.keys import BotKeys
from gateway.outbox import Outbox
from gateway.protocol import Channel
from gateway.resp import FrameEncoder

_conn_counter = itertools.count()


def new_conn_id() -> str:
    """Short, unique per process run: tells reconnects apart in the audio stream."""
    return f"{uuid.uuid4().hex[:8]}{next(_conn_counter):x}"


@dataclass(eq=False, slots=True)
class AudioInbound:
    """A bound audio channel: the inbound path's state, touched for every frame."""

    keys: BotKeys
    conn_b: bytes  # the connection id, as it goes into each frame entry
    frames: FrameEncoder  # its binary frames' way into the audio stream
    seq: int = 0  # every frame takes one, dropped or not: workers see the gaps
    shed_acc: float = 0.0  # overload shedding: drop a frame each time this passes 1


@dataclass(eq=False)
class CommandOutbound:
    """A ready control channel: what outbound delivery holds for it."""

    keys: BotKeys
    outbox: Outbox
    sender: asyncio.Task[None] | None = None
    sending: bool = False  # the sender task is inside ws.send(): nobody else may write
    # Ownership of the bot's commands, as recorded in Redis: (owner key, "gateway_id/conn_id").
    owner: tuple[str, str] | None = None
    evicted_by: str | None = None  # the gateway that took this bot over, to hand leftovers to


@dataclass(eq=False)
class BotConnection:
    """One open WebSocket of a bot: either its audio or its control channel."""

    ws: ServerConnection
    channel: Channel
    conn_id: str = field(default_factory=new_conn_id)
    bot_id: str | None = None
    ready: bool = False  # the handshake was accepted
    close_reason: str | None = None  # set when the gateway decides to close (metric label)
    # Liveness: last receive time (idle watchdog, keepalive) and the keepalive's ping.
    last_rx: float = 0.0
    watchdog: asyncio.TimerHandle | None = None
    ping_at: float | None = None  # when the keepalive pinged, until something comes back
    handshake_deadline: float = 0.0  # loop time by which the bot must have said who it is
    inbound: AudioInbound | None = None  # a bound audio channel
    outbound: CommandOutbound | None = None  # a ready control channel


@dataclass(eq=False)
class BotSession:
    bot_id: str
    keys: BotKeys
    audio: BotConnection | None = None
    control: BotConnection | None = None

    def channel(self, channel: Channel) -> BotConnection | None:
        return self.audio if channel == "audio" else self.control

    def set_channel(self, channel: Channel, conn: BotConnection | None) -> None:
        if channel == "audio":
            self.audio = conn
        else:
            self.control = conn

    @property
    def empty(self) -> bool:
        return self.audio is None and self.control is None


class SessionRegistry:
    """The bots this process holds, by bot_id."""

    def __init__(self) -> None:
        self._sessions: dict[str, BotSession] = {}

    def get(self, bot_id: str) -> BotSession | None:
        return self._sessions.get(bot_id)

    def attach(self, keys: BotKeys, conn: BotConnection) -> tuple[BotSession, bool, BotConnection | None]:
        """Attach a connection; returns the session, whether it is new, and the connection it replaced."""
        session = self._sessions.get(keys.bot_id)
        created = session is None
        if session is None:
            session = self._sessions[keys.bot_id] = BotSession(keys.bot_id, keys)
        replaced = session.channel(conn.channel)
        session.set_channel(conn.channel, conn)
        return session, created, replaced

    def detach(self, conn: BotConnection) -> tuple[BotSession | None, bool, bool]:
        """Detach a connection; returns the session, whether this was the channel's current
        connection, and whether the session ended."""
        if conn.bot_id is None:
            return None, False, False
        session = self._sessions.get(conn.bot_id)
        if session is None:
            return None, False, False
        current = session.channel(conn.channel) is conn
        if current:
            session.set_channel(conn.channel, None)
        ended = session.empty
        if ended:
            del self._sessions[conn.bot_id]
        return session, current, ended

    def __len__(self) -> int:
        return len(self._sessions)

    def __iter__(self) -> Iterator[BotSession]:
        return iter(self.snapshot())

    def snapshot(self) -> list[BotSession]:
        """The sessions now (a copy: callers may attach and detach while walking it)."""
        return list(self._sessions.values())
