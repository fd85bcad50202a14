"""The day's worker: recorder, greeter and barge-in in one SDK instance, and a log
of everything it handled and wrote, for the ledger.

    python -m tests.system.day_worker --out DIR --instance w0 [worker flags]

Uses only the public SDK (``workers``), as a customer's worker would:

* greets every bot when it is ready (``sendmsg greet:…``);
* records every frame (bot, conn, seq and the bot's own frame index, hidden in the PCM);
* answers every chat question (``sendmsg ans:ID``) and speaks an utterance (``sendaudio``,
  each 100 ms chunk tagged with the utterance's number);
* runs a voice detector per speaker while the bot is playing: when someone starts
  talking over it, it interrupts and says so (``interrupt``, then ``sendmsg barge:…``).

Each line of ``DIR/INSTANCE.log`` is written through to the OS before the
handler returns, so before the entry is acknowledged: a ``kill -9`` loses
none. Lines (space-separated, times in Unix seconds)::

    S t bot                         took the bot (on_bot_start)
    E t bot reason                  let it go (on_bot_stop)
    F t bot conn seq idx spk ms     handled a frame (ms: its entry id's time)
    M t bot chat_id ms              handled a chat question
    V t bot type ms                 handled another event
    C t bot kind tag entry_id       wrote a command (XADD returned)
    X t bot kind tag error          a command write failed (it may or may not have landed)
"""

from __future__ import annotations

import dataclasses
import random
import sys
import time
from pathlib import Path
from typing import IO

import numpy as np

from tests.system.tags import frame_index, utterance
from workers import AudioFrame, Bot, Event, VoiceDetector, Worker, cli
from workers import commands as cmd


class DayLog:
    """The instance's record, one line per fact, written through before acknowledging."""

    def __init__(self, path: Path) -> None:
        self.file: IO[str] = open(path, "a", buffering=1)  # noqa: SIM115 (the process's lifetime)

    def write(self, *fields: object) -> None:
        self.file.write(f"{' '.join(str(f) for f in fields)}\n")


def _entry_ms(entry_id: str) -> str:
    return entry_id.partition("-")[0]


def build(worker: Worker, log: DayLog, utterance_s: float) -> None:
    """Register the day's handlers on ``worker``."""
    rng = random.Random()  # seeded from the OS: tags must not collide across instances

    async def send(bot: Bot, kind: str, tag: str, fields: cmd.Fields) -> bool:
        try:
            entry_id = await bot.send(fields)
        except Exception as exc:  # Redis away: the entry may or may not have landed
            log.write("X", f"{time.time():.4f}", bot.bot_id, kind, tag or "-", type(exc).__name__)
            return False
        log.write("C", f"{time.time():.4f}", bot.bot_id, kind, tag or "-", entry_id)
        return True

    @worker.on_bot_start
    async def started(bot: Bot) -> None:
        log.write("S", f"{time.time():.4f}", bot.bot_id)

    @worker.on_bot_stop
    async def stopped(bot: Bot, reason: str) -> None:
        log.write("E", f"{time.time():.4f}", bot.bot_id, reason)

    @worker.on_ready
    async def greet(bot: Bot, event: Event) -> None:
        log.write("V", f"{time.time():.4f}", bot.bot_id, event.type, _entry_ms(event.entry_id))
        tag = f"{rng.getrandbits(32):08x}"
        await send(bot, "greet", tag, cmd.sendmsg(f"greet:{tag}"))

    @worker.on_message
    async def answer(bot: Bot, event: Event) -> None:
        data = event.data or {}
        if data.get("type") != "chat" or not isinstance(data.get("id"), str):
            return
        log.write("M", f"{time.time():.4f}", bot.bot_id, data["id"], _entry_ms(event.entry_id))
        await send(bot, "ans", data["id"], cmd.sendmsg(f"ans:{data['id']}"))
        number = rng.getrandbits(32)
        pcm = utterance(number, utterance_s).tobytes()
        await send(bot, "say", f"{number:08x}", cmd.sendaudio(pcm, 48_000, f"u{number:08x}"))

    @worker.on("session_ended", "playback_started", "playback_finished", "playback_interrupted")
    async def noted(bot: Bot, event: Event) -> None:
        log.write("V", f"{time.time():.4f}", bot.bot_id, event.type, _entry_ms(event.entry_id))

    @worker.on_audio
    async def heard(bot: Bot, frame: AudioFrame) -> None:
        idx = frame_index(frame.pcm)
        spk = 1 if frame.speaker_id == "spk-2" else 0
        log.write(
            "F",
            f"{time.time():.4f}",
            bot.bot_id,
            frame.conn,
            frame.seq,
            -1 if idx is None else idx,
            spk,
            _entry_ms(frame.entry_id),
        )
        detectors: dict[str, VoiceDetector] = bot.state.setdefault("vad", {})
        if not bot.is_playing:
            # Barge-in is speech over the bot's own: listen only while it speaks, from a fresh
            # detector each time (most frames are heard while it is silent: no FFT for them).
            if detectors:
                detectors.clear()
            return
        vad = detectors.setdefault(frame.speaker_id or frame.speaker_name, VoiceDetector())
        samples = np.frombuffer(frame.pcm, "<i2")
        if vad.update(samples, frame.sample_rate):
            await send(bot, "int", "", cmd.interrupt())
            tag = f"{rng.getrandbits(32):08x}"
            await send(bot, "barge", tag, cmd.sendmsg(f"barge:{tag}"))


def main(argv: list[str] | None = None) -> int:
    p = cli.parser("day_worker", __doc__ or "")
    p.add_argument("--out", required=True)
    p.add_argument("--instance", required=True, help="instance id (consumer name in the group)")
    p.add_argument("--utterance-s", type=float, default=0.8)
    ns = cli.parse(p, argv)
    settings = dataclasses.replace(cli.settings(ns, "day"), instance_id=ns.instance)
    worker = Worker(settings)
    log = DayLog(Path(ns.out) / f"{ns.instance}.log")
    build(worker, log, ns.utterance_s)
    print(f"instance {settings.instance_id}", flush=True)
    return cli.run(worker, ns)


if __name__ == "__main__":
    sys.exit(main())
