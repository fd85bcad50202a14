"""An independent witness of what Redis holds: every bot's audio and events, read as
they are written, without a consumer group.

The workers are witnesses too, but they are part of what is tested (a frame a
worker never handled may be the SDK's fault or the gateway's); the auditor
tells them apart. It polls each bot's two streams (one ``XREAD`` per bot: they
share the bot's hash tag, so one slot) in a pipeline every ``interval_s``, and
keeps, per bot, every audio entry's frame index, conn, seq and id, and every
event. Streams are capped (``--audio-maxlen``) well above what the auditor can
fall behind by, so nothing is trimmed before it is read.

After a primary dies, writes it acknowledged but had not yet replicated are
gone from its promoted replica: :meth:`Auditor.recheck` reads the window around
the kill again and reports entries the auditor saw that Redis no longer has.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from redis.asyncio.cluster import RedisCluster
from redis.exceptions import RedisError

from gateway.keys import KeySpace
from tests.system.tags import frame_index

log = logging.getLogger(__name__)


@dataclass(slots=True)
class SeenFrame:
    idx: int  # the bot's own frame index (-1: untagged)
    ms: int  # entry id time: when Redis stored it (Redis clock)
    entry: str
    conn: str
    seq: int
    spk: int
    seen_at: float  # when the auditor read it (Unix s)


@dataclass
class BotStreams:
    bot_id: str
    audio_key: str
    events_key: str
    last_audio: str = "0-0"
    last_events: str = "0-0"
    frames: list[SeenFrame] = field(default_factory=list)
    events: list[dict[str, str]] = field(default_factory=list)


def _s(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _ms(entry_id: str) -> int:
    return int(entry_id.partition("-")[0])


class Auditor:
    def __init__(
        self,
        seed_url: Callable[[], str],
        bot_ids: Iterable[str],
        keyspace: KeySpace | None = None,
        interval_s: float = 0.2,
    ) -> None:
        self.seed_url = seed_url  # a live node's URL, asked again after a failure
        self.keyspace = keyspace or KeySpace()
        self.bots = {
            b: BotStreams(b, self.keyspace.bot(b).audio, self.keyspace.bot(b).events) for b in bot_ids
        }
        self.interval_s = interval_s
        self.active: Callable[[str], bool] = lambda _: True
        self.errors = 0
        self.rounds = 0
        self.lost_to_failover: dict[str, list[SeenFrame]] = {}
        self.events_lost_to_failover: dict[str, list[dict[str, str]]] = {}
        self._client: RedisCluster | None = None
        self._task: asyncio.Task[None] | None = None
        self._stop = asyncio.Event()
        self._reading = asyncio.Lock()  # see read_once

    async def _connect(self) -> RedisCluster:
        if self._client is None:
            client = RedisCluster.from_url(self.seed_url(), socket_timeout=5, socket_connect_timeout=2)
            await client.initialize()
            self._client = client
        return self._client

    async def _drop_client(self) -> None:
        if self._client is not None:
            with contextlib.suppress(Exception):
                await self._client.aclose()
            self._client = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="auditor")

    async def stop(self) -> None:
        self._stop.set()
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError, TimeoutError):
                await asyncio.wait_for(self._task, 30)
        await self._drop_client()

    async def _loop(self) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            await self.read_once()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(
                    self._stop.wait(), max(0.0, self.interval_s - (time.monotonic() - started))
                )

    async def read_once(self, only: Iterable[str] | None = None) -> int:
        """One round over the active bots; returns entries read (0 after an error).

        One round at a time: two reading from the same last ids (the poll loop and the
        driver's catch-up) both appended what they read, and the ledger saw every such
        frame "stored twice".
        """
        async with self._reading:
            return await self._read_once(only)

    async def _read_once(self, only: Iterable[str] | None) -> int:
        streams = [self.bots[b] for b in only] if only is not None else list(self.bots.values())
        streams = [s for s in streams if self.active(s.bot_id)]
        if not streams:
            return 0
        try:
            client = await self._connect()
            pipe = client.pipeline()
            for s in streams:
                pipe.xread({s.audio_key: s.last_audio, s.events_key: s.last_events}, count=5000)
            replies = await pipe.execute(raise_on_error=False)
        except (RedisError, OSError) as exc:
            self.errors += 1
            log.info("auditor read failed: %r", exc)
            await self._drop_client()
            return 0
        self.rounds += 1
        n = 0
        now = time.time()
        for s, reply in zip(streams, replies, strict=True):
            if isinstance(reply, Exception):
                self.errors += 1
                continue
            for key, entries in reply or ():
                if _s(key) == s.audio_key:
                    for entry_id, raw in entries:
                        s.frames.append(self._frame(_s(entry_id), raw, now))
                    if entries:
                        s.last_audio = _s(entries[-1][0])
                else:
                    for entry_id, raw in entries:
                        event = {_s(k): _s(v) for k, v in raw.items()}
                        event["entry"] = _s(entry_id)
                        s.events.append(event)
                    if entries:
                        s.last_events = _s(entries[-1][0])
                n += len(entries)
        return n

    @staticmethod
    def _frame(entry_id: str, raw: dict[bytes, bytes], now: float) -> SeenFrame:
        idx = frame_index(raw.get(b"pcm", b""))
        return SeenFrame(
            -1 if idx is None else idx,
            _ms(entry_id),
            entry_id,
            _s(raw.get(b"conn", b"")),
            int(raw.get(b"seq", b"-1")),
            1 if raw.get(b"speaker_id") == b"spk-2" else 0,
            now,
        )

    async def recheck(self, bot_ids: Iterable[str], from_ms: int, to_ms: int) -> int:
        """Read ``[from_ms, to_ms]`` of these bots' streams again; entries seen then and
        gone now were acknowledged by a primary that died before replicating them.
        Returns how many audio entries were lost that way."""
        lost = 0
        for bot_id in bot_ids:
            s = self.bots[bot_id]
            audio: list[Any] = []
            events: list[Any] = []
            for _attempt in range(5):
                try:
                    client = await self._connect()
                    audio = await client.xrange(s.audio_key, min=f"{from_ms}-0", max=f"{to_ms}-0") or []
                    events = await client.xrange(s.events_key, min=f"{from_ms}-0", max=f"{to_ms}-0") or []
                    break
                except (RedisError, OSError):
                    await self._drop_client()
                    await asyncio.sleep(0.5)
            else:
                continue
            present = {_s(e) for e, _ in audio if e is not None}
            gone = [f for f in s.frames if from_ms <= f.ms <= to_ms and f.entry not in present]
            if gone:
                self.lost_to_failover.setdefault(bot_id, []).extend(gone)
                lost += len(gone)
            present_events = {_s(e) for e, _ in events if e is not None}
            gone_events = [e for e in s.events if from_ms <= _ms(e["entry"]) <= to_ms]
            gone_events = [e for e in gone_events if e["entry"] not in present_events]
            if gone_events:
                self.events_lost_to_failover.setdefault(bot_id, []).extend(gone_events)
        return lost

    async def entries_exist(self, key: str, entry_ids: list[str]) -> dict[str, bool]:
        """Whether each entry is still in ``key`` (command streams, at the end)."""
        out: dict[str, bool] = {}
        client = await self._connect()
        for entry_id in entry_ids:
            try:
                found = await client.xrange(key, min=entry_id, max=entry_id, count=1)
            except (RedisError, OSError):
                await self._drop_client()
                client = await self._connect()
                found = await client.xrange(key, min=entry_id, max=entry_id, count=1)
            out[entry_id] = bool(found)
        return out

    async def command_group_state(self, key: str) -> dict[str, Any]:
        """The gateway group's view of a command stream: last delivered id and pending count."""
        client = await self._connect()
        try:
            groups = await client.xinfo_groups(key)
        except RedisError:
            return {}
        for g in groups:
            if _s(g["name"]) == "gateway":
                return {"last_delivered": _s(g["last-delivered-id"]), "pending": int(g["pending"])}
        return {}
