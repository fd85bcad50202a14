"""A simulated Meetstream bot, written to the vendor's page to the letter.

It connects *out* to a gateway like a real bot: an audio channel that sends a
JSON handshake and then binary per-speaker PCM16 frames (or, as older bots do,
``PCMChunk`` JSON text frames), and a control channel that sends the ``ready``
handshake and records every command it receives, with the time it arrived.
It leaves with close code 1000.

Used by the integration tests, the demo, the worker tests and the benchmarks::

    async with SimulatedBot("ws://127.0.0.1:8765", "bot_1") as bot:
        await bot.stream_speech([Speaker("spk-1", "Ada")], seconds=2)
        cmd = await bot.next_command(timeout=5)
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import itertools
import json
import logging
import math
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from websockets.asyncio.client import ClientConnection, connect

from gateway.protocol import BOT_SAMPLE_RATE, AudioFrame

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Speaker:
    speaker_id: str
    name: str
    freq_hz: float = 220.0


@dataclass
class ReceivedCommand:
    at: float  # time.monotonic() on receipt
    wall_ms: int
    command: dict[str, Any]


@dataclass
class HeardChunk:
    """One ``sendaudio`` chunk as the bot plays it: queued on arrival, played in turn."""

    arrived: float  # time.monotonic()
    start: float  # when the bot starts playing it
    n: int  # samples at 48 kHz
    samples: np.ndarray | None = None
    rate: object = BOT_SAMPLE_RATE  # as the command said: the bot plays everything at 48 kHz
    heard: int = -1  # samples actually played (less if an interrupt cut it); -1: all

    @property
    def heard_n(self) -> int:
        return self.n if self.heard < 0 else self.heard

    @property
    def end(self) -> float:
        return self.start + self.heard_n / BOT_SAMPLE_RATE


@dataclass
class PlaybackModel:
    """What the meeting hears from a bot: a FIFO of received audio played at 48 kHz.

    Google Meet bots clear the queue on ``interrupt`` (``honours_interrupt``);
    Zoom and Teams bots accept it and play on. Times are ``time.monotonic()``.
    """

    honours_interrupt: bool = True
    keep_samples: bool = True
    chunks: list[HeardChunk] = field(default_factory=list)
    interrupts: list[float] = field(default_factory=list)
    queue_end: float = 0.0

    def receive(self, at: float, command: dict[str, Any]) -> None:
        name = command.get("command")
        if name == "sendaudio":
            pcm = base64.b64decode(command["audiochunk"])
            samples = np.frombuffer(pcm, dtype="<i2") if self.keep_samples else None
            start = max(at, self.queue_end)
            chunk = HeardChunk(at, start, len(pcm) // 2, samples, rate=command.get("sample_rate"))
            self.chunks.append(chunk)
            self.queue_end = chunk.end
        elif name == "interrupt":
            self.interrupts.append(at)
            if self.honours_interrupt:
                for chunk in self.chunks:
                    if chunk.end > at:
                        chunk.heard = max(0, round((at - chunk.start) * BOT_SAMPLE_RATE))
                self.queue_end = min(self.queue_end, at)

    def queued_s(self, at: float) -> float:
        """Audio waiting at the bot at ``at`` (received, not yet played)."""
        return sum(max(0.0, c.end - max(at, c.start)) for c in self.chunks if c.arrived <= at)

    def heard_after_s(self, at: float) -> float:
        """Seconds of audio the meeting hears after ``at``."""
        return sum(max(0.0, c.end - max(at, c.start)) for c in self.chunks)

    def gaps_s(self) -> list[float]:
        """Silence between consecutive chunks (0.0 where one follows the other at once)."""
        return [max(0.0, b.start - a.end) for a, b in itertools.pairwise(self.chunks)]

    def audio(self) -> np.ndarray:
        """Everything heard, joined (needs ``keep_samples``)."""
        parts = [c.samples[: c.heard_n] for c in self.chunks if c.samples is not None]
        return np.concatenate(parts) if parts else np.zeros(0, np.int16)


def tone(freq_hz: float, n_samples: int, start_sample: int = 0, amplitude: float = 0.3) -> bytes:
    """PCM16 LE samples of a sine tone; deterministic, so tests can rebuild what was sent."""
    t = (np.arange(n_samples) + start_sample) / BOT_SAMPLE_RATE
    return (np.sin(2 * math.pi * freq_hz * t) * amplitude * 32767).astype("<i2").tobytes()


@dataclass
class SimulatedBot:
    base_url: str
    bot_id: str
    bare_paths: bool = False  # connect to /audio and /control instead of /{bot_id}/...
    legacy_audio: bool = False  # send PCMChunk JSON text frames instead of binary
    query: str = ""  # e.g. "token=..." for an authenticated gateway
    audio_handshake: bool = True
    received: list[ReceivedCommand] = field(default_factory=list)
    sent_frames: list[AudioFrame] = field(default_factory=list)
    record_sent: bool = True
    control: ClientConnection | None = None
    audio: ClientConnection | None = None
    _reader: asyncio.Task[None] | None = None
    _new_command: asyncio.Event = field(default_factory=asyncio.Event)
    on_command: Callable[[ReceivedCommand], None] | None = None
    playback: PlaybackModel = field(default_factory=PlaybackModel)

    def _url(self, channel: str) -> str:
        base = self.base_url.rstrip("/")
        path = f"/{channel}" if self.bare_paths else f"/{self.bot_id}/{channel}"
        return f"{base}{path}{'?' + self.query if self.query else ''}"

    def handshake(self) -> dict[str, Any]:
        return {"type": "ready", "bot_id": self.bot_id, "message": "Ready to receive messages"}

    async def connect_control(self) -> None:
        self.control = await connect(self._url("control"), max_size=None, compression=None)
        await self.control.send(json.dumps(self.handshake()))
        self._reader = asyncio.create_task(self._read_control(self.control))

    async def connect_audio(self) -> None:
        self.audio = await connect(self._url("audio"), max_size=None, compression=None)
        if self.audio_handshake:
            await self.audio.send(json.dumps(self.handshake()))

    async def connect(self) -> SimulatedBot:
        await self.connect_control()
        await self.connect_audio()
        return self

    def stop_reading(self) -> None:
        """Model a stuck bot: stop reading the control channel (TCP backpressure builds up)."""
        if self._reader is not None:
            self._reader.cancel()

    async def _read_control(self, ws: ClientConnection) -> None:
        with contextlib.suppress(Exception):
            async for message in ws:
                item = ReceivedCommand(time.monotonic(), int(time.time() * 1000), json.loads(message))
                self.received.append(item)
                self.playback.receive(item.at, item.command)
                if self.on_command is not None:
                    self.on_command(item)
                self._new_command.set()

    async def send_frame(self, frame: AudioFrame) -> None:
        if self.audio is None:
            raise RuntimeError("audio channel not connected")
        if self.legacy_audio:
            await self.audio.send(
                json.dumps(
                    {
                        "type": "PCMChunk",
                        "speakerName": frame.speaker_name,
                        "audioData": base64.b64encode(frame.pcm).decode(),
                    }
                )
            )
        else:
            await self.audio.send(frame.serialize())
        if self.record_sent:
            self.sent_frames.append(frame)

    async def stream_speech(
        self,
        speakers: list[Speaker],
        seconds: float,
        frame_ms: int = 100,
        realtime: bool = True,
    ) -> int:
        """Send ``seconds`` of audio per speaker, interleaved frame by frame; returns frames sent."""
        samples = BOT_SAMPLE_RATE * frame_ms // 1000
        n_frames = int(seconds * 1000 / frame_ms)
        start = time.monotonic()
        sent = 0
        for i in range(n_frames):
            for spk in speakers:
                await self.send_frame(
                    AudioFrame(spk.speaker_id, spk.name, tone(spk.freq_hz, samples, i * samples))
                )
                sent += 1
            if realtime:
                delay = start + (i + 1) * frame_ms / 1000 - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
        return sent

    async def send_control_json(self, obj: dict[str, Any]) -> None:
        if self.control is None:
            raise RuntimeError("control channel not connected")
        await self.control.send(json.dumps(obj))

    async def next_command(self, timeout: float = 5.0, after: int | None = None) -> dict[str, Any]:
        """The next command received after index ``after`` (default: after those seen so far)."""
        index = len(self.received) if after is None else after
        return (await self.wait_commands(index + 1, timeout))[index].command

    async def wait_commands(self, count: int, timeout: float = 5.0) -> list[ReceivedCommand]:
        async with asyncio.timeout(timeout):
            while len(self.received) < count:
                self._new_command.clear()
                await self._new_command.wait()
        return self.received

    def commands(self, name: str | None = None) -> list[dict[str, Any]]:
        return [r.command for r in self.received if name is None or r.command.get("command") == name]

    async def close(self, code: int = 1000, reason: str = "bot left") -> None:
        """Leave the meeting: both channels close with ``code`` (1000: the bot left)."""
        for ws in (self.audio, self.control):
            if ws is not None:
                with contextlib.suppress(Exception):
                    await ws.close(code, reason)
        if self._reader is not None and not self._reader.cancelled():
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._reader, 5)

    async def __aenter__(self) -> SimulatedBot:
        return await self.connect()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


async def _talk(bots: list[SimulatedBot], speakers: list[Speaker], args: argparse.Namespace) -> None:
    for bot in bots:
        bot.on_command = lambda item, b=bot: print(
            f"[{b.bot_id}] command {item.command.get('command')}: {json.dumps(item.command)[:120]}",
            flush=True,
        )
        await bot.connect()
    await asyncio.gather(*(b.stream_speech(speakers, args.seconds, args.frame_ms) for b in bots))
    await asyncio.sleep(args.linger)


async def _main(args: argparse.Namespace) -> None:
    speakers = [Speaker(f"spk-{i}", name, 180.0 + 90 * i) for i, name in enumerate(args.speaker)]
    bots = [
        SimulatedBot(args.url, f"{args.bot_id}-{n}" if args.bots > 1 else args.bot_id, record_sent=False)
        for n in range(args.bots)
    ]
    # `docker stop` and `compose down` send SIGTERM, to PID 1 in a container,
    # which ignores it unless it has a handler: without one the bot would be
    # killed at the end of the grace period (exit 137). It leaves its meeting.
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    talk = asyncio.create_task(_talk(bots, speakers, args))
    stopped = asyncio.create_task(stop.wait())
    try:
        await asyncio.wait({talk, stopped}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        talk.cancel()
        stopped.cancel()
        for bot in bots:
            await bot.close()
    if not stop.is_set():
        talk.result()  # the bots' own failure, if any, is the exit status


def main() -> None:
    parser = argparse.ArgumentParser(description="Simulated Meetstream bot(s)")
    parser.add_argument("--url", default="ws://127.0.0.1:8765")
    parser.add_argument("--bot-id", default="sim-bot")
    parser.add_argument("--bots", type=int, default=1)
    parser.add_argument("--speaker", action="append", default=None, help="speaker name (repeatable)")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--frame-ms", type=int, default=100)
    parser.add_argument("--linger", type=float, default=1.0, help="seconds to stay after the audio")
    args = parser.parse_args()
    args.speaker = args.speaker or ["Ada", "Grace"]
    asyncio.run(_main(args))


if __name__ == "__main__":
    main()
