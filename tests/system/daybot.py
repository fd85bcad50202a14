"""Bots for the day: a :class:`~gateway.testing.bot.SimulatedBot` per channel, driven
through the Service as a real meeting bot plausibly behaves, and a record of
everything each one sent and received.

    python -m tests.system.daybot CONFIG.json     (one process of bots; the driver starts it)

A meeting, in real time: speaker 1 talks in turns (20 ms frames, silence between
turns, every frame sent), then asks a question in the chat (a control-channel
message); the worker answers in the chat and speaks an utterance; every
``barge_every``-th utterance, speaker 2 starts talking 300 ms into it (a barge-in),
and the worker should interrupt. The two channels connect independently, each to
a random ready replica; a channel closed by the gateway (1012 drain, 1006 crash,
1011, 1013, 4409 replaced) or refused (HTTP 503/429, connection refused)
reconnects through the Service after a short backoff. The vendor does not say
whether its bots do that (see docs/DEPLOY.md); ours do, as the issue asks. Frames
captured while the audio channel is down are not sent (a live bot has nowhere
to put them) and are recorded as such. At the end of its meeting the bot leaves
with 1000 on both channels.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import random
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from websockets.asyncio.client import ClientConnection
from websockets.exceptions import InvalidStatus

from gateway.protocol import AudioFrame
from gateway.testing.bot import PlaybackModel, ReceivedCommand, SimulatedBot
from tests.system.plan import DayPlan, Meeting
from tests.system.service import Service
from tests.system.tags import FrameSource, chunk_tag

SPEAKERS = (("spk-1", "Ada", 220.0), ("spk-2", "Grace", 330.0))
CONNECT_TIMEOUT_S = 5.0
BACKOFF_FIRST_S = 0.1
BACKOFF_MAX_S = 2.0
#: The bot stops asking questions this long before it leaves, so that answers are not
#: cut by the end of the meeting (an answer cut that way is not a loss).
QUIET_BEFORE_LEAVE_S = 3.0
BARGE_DELAY_S = 0.3
BARGE_LENGTH_S = 0.6


@dataclass
class Link:
    """One WebSocket connection of one channel, from open to close."""

    n: int
    channel: str
    replica: str
    up: float
    down: float | None = None
    code: int | None = None  # close code the bot saw (1006: dropped)
    by_bot: bool = False  # the bot closed it (leaving its meeting)


@dataclass
class BotRecord:
    """Everything one bot did and saw; times are Unix seconds (Redis ids use the same clock)."""

    bot_id: str
    join: float = 0.0
    leave: float = 0.0
    links: list[Link] = field(default_factory=list)
    refusals: list[tuple[float, str, str, str]] = field(default_factory=list)  # t, channel, replica, why
    frame_t: list[float] = field(default_factory=list)  # send time of frame idx (index of the list)
    frame_link: list[int] = field(default_factory=list)  # link n it was sent on; -1: not sent
    frame_spk: list[int] = field(default_factory=list)
    chats: list[tuple[str, float, int]] = field(default_factory=list)  # id, t, link (-1: not sent)
    #: t, kind (sendmsg text kind | interrupt | audio | other), tag, chunk index, control link n
    received: list[tuple[float, str, str, int, int]] = field(default_factory=list)
    barges: list[tuple[float, int]] = field(default_factory=list)  # first frame of speaker 2, utterance
    late_ticks: int = 0  # frame ticks this process ran more than 20 ms late (harness load)
    max_late_s: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "bot_id": self.bot_id,
            "join": self.join,
            "leave": self.leave,
            "links": [link.__dict__ for link in self.links],
            "refusals": self.refusals,
            "frame_t": [round(t, 4) for t in self.frame_t],
            "frame_link": self.frame_link,
            "frame_spk": self.frame_spk,
            "chats": self.chats,
            "received": self.received,
            "barges": self.barges,
            "late_ticks": self.late_ticks,
            "max_late_s": round(self.max_late_s, 4),
        }


class DayBot:
    """One meeting: two channels that reconnect through the Service, and the script."""

    def __init__(
        self, meeting: Meeting, plan: DayPlan, service: Service, t0: float, frames: FrameSource
    ) -> None:
        self.meeting = meeting
        self.plan = plan
        self.service = service
        self.t0 = t0
        self.frames = frames
        self.rng = random.Random(f"{plan.seed}:{meeting.bot_id}")
        self.record = BotRecord(meeting.bot_id)
        # Composition: one SimulatedBot per channel, so that each channel can be routed
        # to its own replica (the gateway joins them by bot_id, wherever they land).
        self.ctl = SimulatedBot("", meeting.bot_id, record_sent=False)
        self.ctl.playback = PlaybackModel(keep_samples=False)
        self.ctl.on_command = self._on_command
        self.aud = SimulatedBot("", meeting.bot_id, record_sent=False)
        self.audio_link: Link | None = None
        self.control_link: Link | None = None
        self.leaving = asyncio.Event()
        self._links = 0
        self._utterances_seen: set[int] = set()
        self._barge_until = 0.0
        self._barge_from = 0.0
        self._barge_utt = -1

    def _wall(self, offset_s: float) -> float:
        return self.t0 + offset_s

    async def run(self) -> BotRecord:
        m = self.meeting
        await asyncio.sleep(max(0.0, self._wall(m.join_s) - time.time()))
        self.record.join = time.time()
        channels = [
            asyncio.create_task(self._channel("control"), name=f"{m.bot_id}-control"),
            asyncio.create_task(self._channel("audio"), name=f"{m.bot_id}-audio"),
        ]
        script = asyncio.create_task(self._script(), name=f"{m.bot_id}-script")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.leaving.wait(), max(0.0, self._wall(m.leave_s) - time.time()))
        self.leaving.set()
        script.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await script
        self.record.leave = time.time()
        await self._close_links()
        for task in channels:
            task.cancel()
        await asyncio.gather(*channels, return_exceptions=True)
        return self.record

    def leave_now(self) -> None:
        self.leaving.set()

    # -- channels --------------------------------------------------------------

    async def _channel(self, channel: str) -> None:
        """Keep one channel connected through the Service until the meeting ends."""
        backoff = BACKOFF_FIRST_S
        sim = self.ctl if channel == "control" else self.aud
        while not self.leaving.is_set():
            deadline = time.monotonic() + 5.0
            endpoint = await self.service.pick(deadline)
            if endpoint is None:
                self.record.refusals.append((time.time(), channel, "", "no_ready_replica"))
                continue
            sim.base_url = endpoint.url
            try:
                async with asyncio.timeout(CONNECT_TIMEOUT_S):
                    if channel == "control":
                        await sim.connect_control()
                    else:
                        await sim.connect_audio()
            except Exception as exc:  # refused, 503/429, reset mid-handshake: try again
                why = type(exc).__name__
                if isinstance(exc, InvalidStatus):
                    why = f"http_{exc.response.status_code}"
                self.record.refusals.append((time.time(), channel, endpoint.replica, why))
                await self._backoff(backoff)
                backoff = min(backoff * 2, BACKOFF_MAX_S)
                continue
            ws = sim.control if channel == "control" else sim.audio
            assert ws is not None
            self._links += 1
            link = Link(self._links, channel, endpoint.replica, time.time())
            self.record.links.append(link)
            if channel == "control":
                self.control_link = link
            else:
                self.audio_link = link
            await self._until_closed(ws, link)
            if self.leaving.is_set():
                return
            # A long-lived connection resets the backoff; a flapping one keeps growing it.
            backoff = BACKOFF_FIRST_S if link.down is not None and link.down - link.up > 2.0 else backoff
            await self._backoff(backoff)
            backoff = min(backoff * 2, BACKOFF_MAX_S)

    async def _until_closed(self, ws: ClientConnection, link: Link) -> None:
        closed = asyncio.create_task(ws.wait_closed())
        leaving = asyncio.create_task(self.leaving.wait())
        await asyncio.wait({closed, leaving}, return_when=asyncio.FIRST_COMPLETED)
        leaving.cancel()
        if closed.done() and not self.leaving.is_set():
            self._mark_down(link, ws.close_code or 1006)
        else:
            closed.cancel()

    def _mark_down(self, link: Link, code: int, by_bot: bool = False) -> None:
        if link.down is None:
            link.down, link.code, link.by_bot = time.time(), code, by_bot
        if self.audio_link is link:
            self.audio_link = None
        if self.control_link is link:
            self.control_link = None

    async def _backoff(self, base_s: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.leaving.wait(), base_s * (0.5 + self.rng.random()))

    async def _close_links(self) -> None:
        for link, ws in ((self.audio_link, self.aud.audio), (self.control_link, self.ctl.control)):
            if link is None or ws is None:
                continue
            with contextlib.suppress(Exception):
                async with asyncio.timeout(5):
                    await ws.close(1000, "bot left")
            self._mark_down(link, 1000, by_bot=True)
        # The readers end with their sockets.
        await self.ctl.close()
        await self.aud.close()

    # -- the meeting's script ------------------------------------------------------

    async def _script(self) -> None:
        """Frames every 20 ms on an absolute clock; the chat question at each turn's end."""
        p = self.plan
        step = p.frame_ms / 1000
        start = time.monotonic()
        question = 0
        asked_in_cycle = -1
        quiet_from = self._wall(self.meeting.leave_s) - QUIET_BEFORE_LEAVE_S
        for tick in range(int((self.meeting.leave_s - self.meeting.join_s) / step) + 1):
            due = start + tick * step
            delay = due - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            elif -delay > step:
                self.record.late_ticks += 1
                self.record.max_late_s = max(self.record.max_late_s, -delay)
            elapsed = tick * step
            cycle, phase = divmod(elapsed, p.cycle_s)
            now = time.time()
            await self._send_frame(0, SPEAKERS[0][2] if phase < p.turn_s else None, now)
            if self._barge_from <= now < self._barge_until:
                if not self.record.barges or self.record.barges[-1][1] != self._barge_utt:
                    self.record.barges.append((now, self._barge_utt))
                await self._send_frame(1, SPEAKERS[1][2], now)
            if phase >= p.turn_s and asked_in_cycle != cycle and now < quiet_from:
                asked_in_cycle = int(cycle)
                await self._ask(question)
                question += 1

    async def _send_frame(self, speaker: int, freq_hz: float | None, now: float) -> None:
        r = self.record
        idx = len(r.frame_t)
        link = self.audio_link
        # The three columns grow together, whatever happens to the send (the meeting may
        # end, cancelling this task, while a frame is being written).
        r.frame_t.append(now)
        r.frame_spk.append(speaker)
        r.frame_link.append(-1)
        if link is None:
            return
        spk_id, name, _ = SPEAKERS[speaker]
        try:
            await self.aud.send_frame(AudioFrame(spk_id, name, self.frames.frame(idx, freq_hz)))
        except Exception:
            ws = self.aud.audio  # the socket was closed under us: not sent
            self._mark_down(link, (ws.close_code if ws is not None else None) or 1006)
            return
        r.frame_link[idx] = link.n

    async def _ask(self, k: int) -> None:
        chat_id = f"{self.meeting.bot_id}:{k}"
        link = self.control_link
        if link is None:
            self.record.chats.append((chat_id, time.time(), -1))
            return
        try:
            await self.ctl.send_control_json({"type": "chat", "id": chat_id, "text": f"question {k}"})
        except Exception:
            self.record.chats.append((chat_id, time.time(), -1))
            return
        self.record.chats.append((chat_id, time.time(), link.n))

    def _on_command(self, item: ReceivedCommand) -> None:
        now = time.time()
        command = item.command
        name = command.get("command", "")
        link = self.control_link.n if self.control_link is not None else -1
        received = self.record.received
        if name == "sendmsg":
            text = str(command.get("message", ""))
            kind, _, tag = text.partition(":")
            received.append((now, kind, tag, -1, link))
        elif name == "interrupt":
            received.append((now, "interrupt", "", -1, link))
        elif name == "sendaudio":
            found = chunk_tag(base64.b64decode(command.get("audiochunk", "")))
            if found is None:
                received.append((now, "audio", "?", -1, link))
                return
            number, chunk = found
            received.append((now, "audio", f"{number:08x}", chunk, link))
            if chunk == 0 and number not in self._utterances_seen:
                self._utterances_seen.add(number)
                if len(self._utterances_seen) % self.plan.barge_every == 0:
                    self._barge_from = now + BARGE_DELAY_S
                    self._barge_until = self._barge_from + BARGE_LENGTH_S
                    self._barge_utt = number
        else:
            received.append((now, "other", name, -1, link))


async def run_bots(config: dict[str, Any]) -> list[BotRecord]:
    """Run this process's share of the meetings; SIGTERM makes every bot leave at once."""
    plan = DayPlan.from_json(config["plan"])
    mine = set(config["bot_ids"])
    service = Service(Path(config["endpoints"]), seed=config.get("seed", 0))
    service.start()
    frames = FrameSource(plan.frame_ms)
    bots = [DayBot(m, plan, service, config["t0"], frames) for m in plan.meetings if m.bot_id in mine]
    loop = asyncio.get_running_loop()

    def leave_all() -> None:
        for bot in bots:
            bot.leave_now()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, leave_all)
    try:
        return list(await asyncio.gather(*(b.run() for b in bots)))
    finally:
        await service.stop()


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    config = json.loads(Path(args[0]).read_text())
    try:
        import uvloop
    except ImportError:  # pragma: no cover
        records = asyncio.run(run_bots(config))
    else:
        records = uvloop.run(run_bots(config))
    out = Path(config["out"])
    out.with_suffix(".tmp").write_text(json.dumps([r.to_json() for r in records]))
    out.with_suffix(".tmp").replace(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
