"""``MeetstreamTransport``: a Pipecat transport whose far end is a Meetstream meeting bot.

It speaks the gateway's Redis contract through the worker SDK's :class:`~workers.Bot`
handle, so a pipeline never holds a socket and its bot can move between
worker instances::

    meeting audio ─► gateway ─► Redis ─► SDK on_audio ─► MeetstreamInputTransport ─► pipeline
    pipeline ─► MeetstreamOutputTransport ─► Bot.send (XADD) ─► gateway: paced sendaudio ─► bot

* **In**: per-speaker 48 kHz frames go through a speaker policy
  (:mod:`workers.pipecat.speakers`) and a streaming soxr resampler per stream
  (no seams at frame boundaries) to ``UserAudioRawFrame`` at the pipeline's
  rate, carrying the speaker (``user_id``, ``metadata["speaker_name"]``).
  Silence fills the gaps while nobody talks, so VAD sees speech end.
* **Out**: audio is written as ``sendaudio`` as soon as it comes (the gateway
  paces it), one ``utterance_id`` per response; an ``InterruptionFrame`` writes
  ``interrupt`` (the gateway drops what it holds, so barge-in stops playback
  within its lead on every platform). ``BotStarted/StoppedSpeakingFrame`` come
  from the gateway's playback events (:mod:`workers.pipecat.playback`), i.e.
  what the meeting heard. Text becomes ``sendchat`` (interim, then final),
  images ``sendimg`` / ``sendimg_url``.

The transport is created per bot by :class:`~workers.pipecat.PipecatWorker`,
which feeds it the bot's events; it can be driven by hand (``feed_*``) in tests.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import msgpack
import numpy as np
import soxr
from loguru import logger
from pipecat.frames.frames import (
    BotSpeakingFrame,
    BotStartedSpeakingFrame,
    BotStoppedSpeakingFrame,
    CancelFrame,
    ClientConnectedFrame,
    EndFrame,
    Frame,
    InputAudioRawFrame,
    InputTextRawFrame,
    InputTransportMessageFrame,
    InterimTranscriptionFrame,
    InterruptionFrame,
    LLMFullResponseEndFrame,
    OutputAudioRawFrame,
    OutputImageRawFrame,
    OutputTransportMessageFrame,
    OutputTransportMessageUrgentFrame,
    StartFrame,
    TextFrame,
    TranscriptionFrame,
    TTSStartedFrame,
    TTSStoppedFrame,
    URLImageRawFrame,
    UserAudioRawFrame,
)
from pipecat.processors.frame_processor import FrameDirection
from pipecat.transports.base_input import BaseInputTransport
from pipecat.transports.base_output import BaseOutputTransport
from pipecat.transports.base_transport import BaseTransport

from workers import NO_SPEAKER, AudioFrame, Bot, Event, LeaseLost, resample
from workers.pipecat.params import GATEWAY_RATES, MeetstreamParams
from workers.pipecat.playback import PlaybackTracker
from workers.pipecat.speakers import RATE, Block, SpeakerMixer

#: Largest ``sendaudio`` entry written (the SDK's ``say`` uses the same): far below the
#: gateway's command size limit, and one entry never holds a long stretch of the queue.
MAX_ENTRY_S = 2.0
JPEG_MAGIC, PNG_MAGIC = b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n"


@dataclass
class TransportStats:
    """What one transport did and dropped; every bound it hits is counted here."""

    frames_in: int = 0  # bot frames fed in
    frames_to_pipeline: int = 0
    dropped_not_started: int = 0  # frames before the pipeline started (or after it ended)
    dropped_unattributed: int = 0
    dropped_inactive_samples: int = 0  # other speakers' audio under the ``active`` policy
    silence_fill_ms: float = 0.0
    input_backpressure_waits: int = 0
    audio_out_entries: int = 0
    audio_out_ms: float = 0.0
    audio_out_dropped_ms: float = 0.0  # over audio_out_max_buffered_s, or unwritten at an interrupt
    interrupts_sent: int = 0
    chats_sent: int = 0
    images_sent: int = 0
    images_skipped: int = 0  # replaced by a newer one within image_min_interval_s
    commands_dropped: int = 0  # over max_pending_commands
    commands_rejected: int = 0  # by the gateway (command_rejected)
    send_errors: int = 0
    speakers: set[str] = field(default_factory=set)


@dataclass(frozen=True, slots=True)
class ChatMessage:
    """A meeting chat message as the bot reported it (``on_chat_message``)."""

    text: str
    sender: str
    data: dict[str, Any]


class MeetstreamTransport(BaseTransport):
    """One bot's meeting as a Pipecat transport: ``transport.input()`` and ``transport.output()``.

    Event handlers (``@transport.event_handler(name)``), each called with the transport first:

    - ``on_client_connected(transport, bot)``: the pipeline started for a ready bot;
    - ``on_client_disconnected(transport, bot)``: the meeting ended for the bot;
    - ``on_first_participant_joined(transport, speaker)``, ``on_participant_joined(transport,
      speaker)``: someone was heard for the first time (``speaker`` is a dict with
      ``id`` and ``name``);
    - ``on_chat_message(transport, message)``: a :class:`ChatMessage` from the meeting;
    - ``on_message(transport, data)``: any other JSON the bot sent;
    - ``on_command_rejected(transport, fields)``: the gateway refused a command of ours.
    """

    def __init__(
        self,
        bot: Bot,
        params: MeetstreamParams | None = None,
        *,
        name: str | None = None,
        input_name: str | None = None,
        output_name: str | None = None,
    ) -> None:
        super().__init__(name=name, input_name=input_name, output_name=output_name)
        self.bot = bot
        self.params = params or MeetstreamParams()
        self.stats = TransportStats()
        self._input = MeetstreamInputTransport(self, self.params, name=input_name)
        self._output = MeetstreamOutputTransport(self, self.params, name=output_name)
        for event in (
            "on_client_connected",
            "on_client_disconnected",
            "on_first_participant_joined",
            "on_participant_joined",
            "on_chat_message",
            "on_message",
            "on_command_rejected",
        ):
            self._register_event_handler(event)

    @property
    def bot_id(self) -> str:
        return self.bot.bot_id

    def input(self) -> MeetstreamInputTransport:
        return self._input

    def output(self) -> MeetstreamOutputTransport:
        return self._output

    def get_client_id(self, client: Any) -> str:
        """The bot is the one client: its id (``on_client_connected`` passes the Bot)."""
        return client.bot_id if isinstance(client, Bot) else str(client)

    # -- fed by the worker (or a test) -------------------------------------------

    async def feed_audio(self, frame: AudioFrame) -> None:
        """One audio entry of the bot (the SDK has already left out the bot's own voice)."""
        await self._input.feed(frame)

    async def feed_event(self, event: Event) -> None:
        """Any event of the bot: playback, rejections, messages (chat)."""
        t = event.type
        if t.startswith("playback_"):
            await self._output.on_playback(event)
        elif t == "command_rejected":
            self.stats.commands_rejected += 1
            logger.warning(
                f"{self}: bot {self.bot_id}: {event.get('command')} rejected: "
                f"{event.get('reason')}: {event.get('detail')}"
            )
            await self._output.on_rejected(event)
            await self._call_event_handler("on_command_rejected", dict(event.fields))
        elif t == "message":
            await self._input.on_message(event)

    async def feed_session_ended(self) -> None:
        """The meeting is over for the bot: nothing it queued will play any more."""
        await self._output.on_session_ended()
        await self._call_event_handler("on_client_disconnected", self.bot)

    async def _participant(self, speaker_id: str, speaker_name: str) -> None:
        key = speaker_id or speaker_name
        if key in self.stats.speakers:
            return
        first = not self.stats.speakers
        self.stats.speakers.add(key)
        speaker = {"id": speaker_id, "name": speaker_name}
        if first:
            await self._call_event_handler("on_first_participant_joined", speaker)
        await self._call_event_handler("on_participant_joined", speaker)


class MeetstreamInputTransport(BaseInputTransport):
    """The meeting's audio and chat, into the pipeline."""

    def __init__(self, transport: MeetstreamTransport, params: MeetstreamParams, **kwargs: Any) -> None:
        super().__init__(params, **kwargs)
        self._transport = transport
        self._params: MeetstreamParams = params
        self._mixer = SpeakerMixer(
            policy=params.speaker_policy,
            max_skew_ms=params.mix_max_skew_ms,
            switch_db=params.active_switch_db,
            hold_ms=params.active_hold_ms,
        )
        self._resamplers: dict[str | None, soxr.ResampleStream] = {}
        self._running = False
        self._last_push = 0.0
        self._fill_task: asyncio.Task[None] | None = None
        self._in_flight = 0  # audio frames handed to the base queue and not yet pushed on
        self._last_lag_s = 0.0
        self._drained = asyncio.Event()
        self._max_in_flight = 1

    async def start(self, frame: StartFrame) -> None:
        await super().start(frame)
        # The pipeline's rate is known now (setup): 20 ms frames at it bound the queue.
        self._max_in_flight = max(1, int(self._params.audio_in_max_queued_s * 50))
        self._running = True
        self._last_push = time.monotonic()
        await self.set_transport_ready(frame)
        if self._params.silence_fill and self._params.speaker_policy != "per_speaker":
            self._fill_task = self.create_task(self._fill_silence(), name="meetstream-silence")
        await self.push_frame(ClientConnectedFrame())
        await self._transport._call_event_handler("on_client_connected", self._transport.bot)

    async def stop(self, frame: EndFrame) -> None:
        self._running = False
        await self._stop_fill()
        await super().stop(frame)

    async def cancel(self, frame: CancelFrame) -> None:
        self._running = False
        await self._stop_fill()
        await super().cancel(frame)

    async def cleanup(self) -> None:
        self._running = False
        await self._stop_fill()
        await super().cleanup()

    async def _stop_fill(self) -> None:
        if self._fill_task is not None:
            await self.cancel_task(self._fill_task)
            self._fill_task = None

    async def push_frame(self, frame: Frame, direction: FrameDirection = FrameDirection.DOWNSTREAM) -> None:
        # The base class's audio task pushes our frames on from its queue: count them out.
        if isinstance(frame, InputAudioRawFrame) and direction == FrameDirection.DOWNSTREAM:
            self._in_flight = max(0, self._in_flight - 1)
            if self._in_flight <= self._max_in_flight // 2:
                self._drained.set()
        await super().push_frame(frame, direction)

    # -- audio --------------------------------------------------------------------

    async def feed(self, frame: AudioFrame) -> None:
        stats = self._transport.stats
        stats.frames_in += 1
        if not self._running:
            stats.dropped_not_started += 1
            return
        if frame.unattributed and not self._params.include_unattributed:
            stats.dropped_unattributed += 1
            return
        if frame.sample_rate != RATE:
            samples = resample(frame.float32, frame.sample_rate, RATE)
        else:
            samples = frame.float32
        await self._transport._participant(frame.speaker_id, frame.speaker_name)
        dropped = self._mixer.dropped_samples
        blocks = self._mixer.push(frame.speaker_id, frame.speaker_name or NO_SPEAKER, samples)
        stats.dropped_inactive_samples += self._mixer.dropped_samples - dropped
        # How late the bot's frames reach us: silence is filled in only while we keep up.
        self._last_lag_s = max(0.0, time.time() - frame.ts_ms / 1000) if frame.ts_ms else 0.0
        meta = {"meetstream_seq": frame.seq, "meetstream_conn": frame.conn, "meetstream_ts_ms": frame.ts_ms}
        for block in blocks:
            await self._push_block(block, meta)

    async def _push_block(self, block: Block, meta: dict[str, Any] | None = None) -> None:
        resampler = self._resamplers.get(block.source)
        if resampler is None:
            # One stream per output stream: the filter state carries across frames (no seams).
            resampler = self._resamplers[block.source] = soxr.ResampleStream(
                RATE, self.sample_rate, 1, dtype="float32", quality=self._params.audio_in_resample_quality
            )
        out = resampler.resample_chunk(block.samples)
        if not len(out):
            return  # the resampler's filter is still filling: its samples come with the next block
        pcm = (np.clip(out, -1.0, 1.0) * 32767.0).astype("<i2").tobytes()
        frame = UserAudioRawFrame(
            audio=pcm, sample_rate=self.sample_rate, num_channels=1, user_id=block.speaker_id
        )
        frame.transport_source = block.source
        frame.metadata["speaker_name"] = block.speaker_name
        frame.metadata["speakers"] = block.speakers
        if meta:
            frame.metadata.update(meta)
        await self._hand_over(frame)

    async def _hand_over(self, frame: InputAudioRawFrame) -> None:
        if not self._params.audio_in_passthrough:
            await self.push_audio_frame(frame)  # not pushed on by the base class: nothing to count
            return
        if self._in_flight >= self._max_in_flight:
            # The pipeline is behind: stop taking the bot's frames until it catches up
            # (the SDK reads the bot's stream no further meanwhile; Redis holds the rest).
            self._transport.stats.input_backpressure_waits += 1
            self._drained.clear()
            try:
                await asyncio.wait_for(self._drained.wait(), timeout=5.0)
            except TimeoutError:
                # Paused (StopFrame) or stuck: count afresh rather than wait forever.
                logger.warning(f"{self}: bot {self._transport.bot_id}: pipeline took no audio for 5 s")
                self._in_flight = 0
        self._in_flight += 1
        self._transport.stats.frames_to_pipeline += 1
        self._last_push = time.monotonic()
        await self.push_audio_frame(frame)

    async def _fill_silence(self) -> None:
        """While nobody talks, add silence in real time, so the stream never stalls."""
        after_s = self._params.silence_fill_after_ms / 1000
        step_s = 0.02
        while True:
            wait = self._last_push + after_s - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
                continue
            if self._last_lag_s > after_s or self._in_flight > 2:
                # Behind (the bot's frames are late, or the pipeline has not taken what it
                # has): the quiet is ours, not the meeting's. Filling it would put silence
                # between frames that are merely delayed, and add work when short of CPU.
                self._last_push = time.monotonic()
                continue
            for block in self._mixer.flush():  # a mix held back for a speaker who went quiet
                await self._push_block(block)
            # Everything since the last push, in 20 ms frames (at most a second at a time).
            gap_s = min(1.0, time.monotonic() - self._last_push)
            n = int(gap_s / step_s)
            for _ in range(max(1, n)):
                await self._push_block(Block(np.zeros(int(RATE * step_s), np.float32), "", ""))
            self._transport.stats.silence_fill_ms += max(1, n) * step_s * 1000
            await asyncio.sleep(step_s)

    # -- chat -----------------------------------------------------------------------

    async def on_message(self, event: Event) -> None:
        data = event.data
        if data is None:
            return
        kind = data.get("type")
        if isinstance(kind, str) and kind in self._params.chat_message_types:
            text = _first_str(data, ("text", "message", "msg", "content"))
            sender = _first_str(data, ("sender_name", "sender", "user", "speaker_name", "name", "from"))
            if text and sender != (self._transport.bot.name or "\0"):
                message = ChatMessage(text, sender, data)
                if self._running:
                    frame = InputTextRawFrame(text=text)
                    frame.transport_source = sender or None
                    await self.push_frame(frame)
                await self._transport._call_event_handler("on_chat_message", message)
                return
        if self._running:
            await self.broadcast_frame(InputTransportMessageFrame, message=data)
        await self._transport._call_event_handler("on_message", data)


class MeetstreamOutputTransport(BaseOutputTransport):
    """The pipeline's audio, text and images, out to the meeting through the gateway."""

    def __init__(self, transport: MeetstreamTransport, params: MeetstreamParams, **kwargs: Any) -> None:
        super().__init__(params, **kwargs)
        self._transport = transport
        self._params: MeetstreamParams = params
        self._bot = transport.bot
        self._tracker = PlaybackTracker()
        # Unwritten output audio at the pipeline's rate, and since when its oldest sample waits.
        self._pcm = bytearray()
        self._pcm_rate = 0
        self._pcm_since = 0.0
        self._utterance: str | None = None  # current utterance id; None: the next audio starts one
        self._utterance_entries = 0
        self._utterance_prefix = uuid.uuid4().hex[:8]
        self._utterance_seq = 0
        self._commands: deque[tuple[str, dict[str, bytes | str]]] = deque()
        self._interrupt_pending = False
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._sender: asyncio.Task[None] | None = None
        self._speaking_task: asyncio.Task[None] | None = None
        self._chat_text = ""
        self._chat_sent = ""
        self._chat_last = 0.0
        self._image_last = 0.0
        self._image_pending: OutputImageRawFrame | None = None
        self._image_task: asyncio.Task[None] | None = None
        self._closed = False

    # -- lifecycle -------------------------------------------------------------------

    async def start(self, frame: StartFrame) -> None:
        await super().start(frame)
        await self.set_transport_ready(frame)
        if self._sender is None:
            self._sender = self.create_task(self._send_loop(), name="meetstream-sender")

    async def stop(self, frame: EndFrame) -> None:
        await super().stop(frame)
        # Let what the pipeline said go out: buffered audio, the last chat line.
        self._finish_chat()
        self._flush_audio_now = True
        self._wake.set()
        if self._has_work() and not self._closed and self._sender is not None:
            self._idle.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._idle.wait(), 2.0)
        await self._stop_tasks()

    async def cancel(self, frame: CancelFrame) -> None:
        await super().cancel(frame)
        await self._stop_tasks()

    async def cleanup(self) -> None:
        await super().cleanup()
        await self._stop_tasks()

    async def _stop_tasks(self) -> None:
        for name in ("_sender", "_speaking_task", "_image_task"):
            task = getattr(self, name)
            if task is not None:
                await self.cancel_task(task)
                setattr(self, name, None)

    # -- frames ------------------------------------------------------------------------

    async def _handle_frame(self, frame: Frame) -> None:
        """Route what the pipeline sends the meeting; the rest goes to the base class."""
        p = self._params
        if isinstance(frame, InterruptionFrame):
            await self._interrupt()
        elif isinstance(frame, OutputAudioRawFrame):
            if p.audio_out_enabled:
                self._queue_audio(frame.audio, frame.sample_rate, frame.num_channels)
            await self.push_frame(frame)
            return
        elif isinstance(frame, (OutputImageRawFrame, URLImageRawFrame)) and p.image_out_enabled:
            await self._queue_image(frame)
            await self.push_frame(frame)
            return
        elif isinstance(frame, TTSStartedFrame):
            self._utterance = None  # a new response: a new utterance id
        elif isinstance(frame, TTSStoppedFrame):
            self._flush_audio_now = bool(self._pcm)  # the response's tail goes out now
            self._wake.set()
        elif isinstance(frame, TranscriptionFrame):
            if p.chat_transcripts and frame.text.strip():
                self._queue_command("chat", _sendchat(frame.text, True, "user"))
        elif isinstance(frame, TextFrame) and not isinstance(frame, InterimTranscriptionFrame):
            if p.chat_enabled:
                self._add_chat(frame)
        elif isinstance(frame, LLMFullResponseEndFrame) and not (self._tracker.outstanding or self._pcm):
            self._finish_chat()  # a response with no audio (text only): final now
        await super()._handle_frame(frame)

    async def write_audio_frame(self, frame: OutputAudioRawFrame) -> bool:
        """Audio the base class generates itself (DTMF tones): written like any other."""
        self._queue_audio(frame.audio, frame.sample_rate, frame.num_channels)
        return True

    async def send_message(
        self, frame: OutputTransportMessageFrame | OutputTransportMessageUrgentFrame
    ) -> None:
        """A transport message: a string posts to the chat (``sendmsg``); a dict with a
        ``command`` is written as that command (the gateway validates it)."""
        message = frame.message
        if isinstance(message, str):
            self._queue_command(
                "message", {"json": json.dumps({"command": "sendmsg", "message": message, "msg": message})}
            )
        elif isinstance(message, dict) and isinstance(message.get("command"), str):
            self._queue_command("message", {"json": json.dumps(message)})
        else:
            logger.warning(f"{self}: transport message neither text nor a command, not sent: {message!r}")

    # -- audio out ---------------------------------------------------------------------

    def _queue_audio(self, audio: bytes, rate: int, channels: int) -> None:
        if not audio or self._closed:
            return
        if channels != 1:
            # Bots play mono: average the channels.
            x = np.frombuffer(audio, "<i2").reshape(-1, channels).mean(axis=1)
            audio = x.astype("<i2").tobytes()
        if rate not in GATEWAY_RATES:
            audio = (
                (np.clip(resample(np.frombuffer(audio, "<i2"), rate, RATE), -1, 1) * 32767)
                .astype("<i2")
                .tobytes()
            )
            rate = RATE
        if self._pcm and rate != self._pcm_rate:
            self._flush_audio_now = True  # a rate change: what is buffered goes first
            self._wake.set()
        if not self._pcm:
            self._pcm_since = time.monotonic()
            self._pcm_rate = rate
        self._pcm += audio
        limit = int(self._params.audio_out_max_buffered_s * self._pcm_rate) * 2
        if len(self._pcm) > limit:
            # Redis is not taking our writes: keep the newest audio, count what goes.
            cut = len(self._pcm) - limit
            del self._pcm[:cut]
            self._transport.stats.audio_out_dropped_ms += cut / 2 / self._pcm_rate * 1000
            logger.warning(f"{self}: bot {self._bot.bot_id}: output audio over its bound, oldest dropped")
        self._wake.set()

    _flush_audio_now = False
    _writing = False  # a sendaudio XADD is in flight

    def _audio_due_in(self) -> float | None:
        """Seconds until the buffered audio is to be written (0: now; None: nothing buffered)."""
        if not self._pcm:
            return None
        if self._utterance is None or self._flush_audio_now:
            return 0.0  # the first audio of an utterance goes at once: that is the latency heard
        entry_bytes = int(self._params.audio_out_entry_ms * self._pcm_rate / 1000) * 2
        if len(self._pcm) >= entry_bytes:
            return 0.0
        return max(0.0, self._pcm_since + self._params.audio_out_max_wait_ms / 1000 - time.monotonic())

    def _has_work(self) -> bool:
        return bool(self._pcm or self._commands or self._interrupt_pending)

    async def _send_loop(self) -> None:
        """The one writer of this bot's commands: interrupts first, then chat and images,
        then audio, each XADD awaited in turn so they land in the stream in this order."""
        while True:
            if self._interrupt_pending:
                self._interrupt_pending = False
                await self._send(self._bot.interrupt(), "interrupt")
                continue
            if self._commands:
                kind, fields = self._commands.popleft()
                await self._send(self._bot.send(fields), kind)
                continue
            due = self._audio_due_in()
            if due == 0.0:
                await self._write_audio()
                continue
            if due is None:
                self._idle.set()  # everything is written (what stop() waits for)
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=due)

    async def _send(self, call: Any, kind: str) -> Any:
        try:
            return await call
        except LeaseLost:
            self._closed = True  # the bot is another instance's now: write nothing more
            self._pcm.clear()
            self._commands.clear()
        except Exception as exc:  # a Redis error: this command is lost, the next ones go on
            self._transport.stats.send_errors += 1
            logger.warning(f"{self}: bot {self._bot.bot_id}: {kind} not written: {exc!r}")
        return None

    async def _write_audio(self) -> None:
        rate = self._pcm_rate
        max_bytes = int(MAX_ENTRY_S * rate) * 2
        pcm = bytes(self._pcm[:max_bytes])
        del self._pcm[: len(pcm)]
        self._pcm_since = time.monotonic()
        if not self._pcm:
            self._flush_audio_now = False
        if self._utterance is None:
            self._utterance_seq += 1
            self._utterance = f"pc-{self._utterance_prefix}-{self._utterance_seq}"
        utterance = self._utterance
        fields = {
            "msgpack": msgpack.packb(
                {
                    "command": "sendaudio",
                    "audiochunk": pcm,
                    "sample_rate": rate,
                    "encoding": "pcm16",
                    "channels": 1,
                    "endianness": "little",
                    "utterance_id": utterance,
                },
                use_bin_type=True,
            )
        }
        self._writing = True
        try:
            entry_id = await self._send(self._bot.send(fields), "sendaudio")
        finally:
            self._writing = False
        if entry_id is None:
            return
        ms = len(pcm) / 2 / rate * 1000
        self._tracker.wrote(utterance, entry_id, ms)
        stats = self._transport.stats
        stats.audio_out_entries += 1
        stats.audio_out_ms += ms

    async def _interrupt(self) -> None:
        """Barge-in: drop what is not written yet, and have the gateway drop what it holds."""
        if self._pcm:
            self._transport.stats.audio_out_dropped_ms += len(self._pcm) / 2 / self._pcm_rate * 1000
            self._pcm.clear()
        self._utterance = None
        self._finish_chat()
        if (self._tracker.outstanding or self._writing) and not self._closed:
            self._interrupt_pending = True
            self._transport.stats.interrupts_sent += 1
            self._wake.set()

    # -- what the meeting heard -----------------------------------------------------------

    async def on_playback(self, event: Event) -> None:
        if (
            event.type == "playback_interrupted"
            and event.get("reason") == "disconnected"
            and not self._params.replay_after_disconnect
            and not self._closed
        ):
            # The gateway would play it again when the bot is back: the talk has moved on.
            self._interrupt_pending = True
            self._wake.set()
        await self._apply(self._tracker.event(event.type, dict(event.fields)))

    async def on_rejected(self, event: Event) -> None:
        if event.get("command") == "sendaudio":
            await self._apply(self._tracker.rejected(event.get("entry_id") or ""))

    async def on_session_ended(self) -> None:
        self._closed = True
        self._pcm.clear()
        self._commands.clear()
        await self._apply(self._tracker.reset())

    async def _apply(self, transition: str | None) -> None:
        if transition == "started":
            await self._broadcast_speaking(BotStartedSpeakingFrame)
            if self._speaking_task is None:
                self._speaking_task = self.create_task(self._speaking(), name="meetstream-speaking")
        elif transition == "stopped":
            if self._speaking_task is not None:
                await self.cancel_task(self._speaking_task)
                self._speaking_task = None
            await self._broadcast_speaking(BotStoppedSpeakingFrame)
            self._finish_chat()

    async def _broadcast_speaking(self, cls: type[Frame]) -> None:
        down, up = cls(), cls()
        up.broadcast_sibling_id, down.broadcast_sibling_id = down.id, up.id
        await self.push_frame(down)
        await self.push_frame(up, FrameDirection.UPSTREAM)

    async def _speaking(self) -> None:
        while True:
            await asyncio.sleep(self._params.bot_speaking_period_s)
            await self.broadcast_frame(BotSpeakingFrame)

    # -- chat and images -------------------------------------------------------------------

    def _queue_command(self, kind: str, fields: dict[str, bytes | str]) -> None:
        if self._closed:
            return
        if len(self._commands) >= self._params.max_pending_commands:
            self._commands.popleft()
            self._transport.stats.commands_dropped += 1
            logger.warning(f"{self}: bot {self._bot.bot_id}: commands over their bound, oldest dropped")
        self._commands.append((kind, fields))
        if kind == "chat":
            self._transport.stats.chats_sent += 1
        self._wake.set()

    def _add_chat(self, frame: TextFrame) -> None:
        text = frame.text
        if not text:
            return
        if self._chat_text and not frame.includes_inter_frame_spaces and not self._chat_text[-1].isspace():
            text = " " + text.lstrip()
        self._chat_text += text
        now = time.monotonic()
        if now - self._chat_last >= self._params.chat_interim_interval_s:
            self._chat_last = now
            self._chat_sent = self._chat_text
            self._queue_command("chat", _sendchat(self._chat_text.strip(), False, self._params.chat_role))

    def _finish_chat(self) -> None:
        text = self._chat_text.strip()
        self._chat_text = self._chat_sent = ""
        if text and self._params.chat_enabled:
            self._queue_command("chat", _sendchat(text, True, self._params.chat_role))

    async def _queue_image(self, frame: OutputImageRawFrame) -> None:
        wait = self._image_last + self._params.image_min_interval_s - time.monotonic()
        if wait <= 0:
            self._send_image(frame)
            return
        if self._image_pending is not None:
            self._transport.stats.images_skipped += 1
        self._image_pending = frame  # the latest wins
        if self._image_task is None:
            self._image_task = self.create_task(self._later_image(wait), name="meetstream-image")

    async def _later_image(self, wait: float) -> None:
        await asyncio.sleep(wait)
        frame, self._image_pending = self._image_pending, None
        self._image_task = None
        if frame is not None:
            self._send_image(frame)

    def _send_image(self, frame: OutputImageRawFrame) -> None:
        self._image_last = time.monotonic()
        url = frame.url if isinstance(frame, URLImageRawFrame) else None
        if url and url.startswith(("http://", "https://")):
            fields = {"json": json.dumps({"command": "sendimg_url", "img_url": url})}
        else:
            data = _encode_image(frame, self._params.image_format)
            if data is None:
                logger.warning(f"{self}: image frame {frame} has no format to encode it with; not sent")
                return
            fields = {"msgpack": msgpack.packb({"command": "sendimg", "img": data}, use_bin_type=True)}
        self._transport.stats.images_sent += 1
        self._queue_command("image", fields)


def _sendchat(text: str, is_final: bool, role: str) -> dict[str, bytes | str]:
    return {
        "json": json.dumps(
            {"command": "sendchat", "role": role, "text": text, "is_final": is_final}, ensure_ascii=False
        )
    }


def _first_str(data: dict[str, Any], names: tuple[str, ...]) -> str:
    for name in names:
        value = data.get(name)
        if isinstance(value, str) and value:
            return value
    return ""


def _encode_image(frame: OutputImageRawFrame, fmt: str) -> bytes | None:
    """JPEG/PNG bytes of an image frame: passed through if already encoded, else encoded."""
    raw = bytes(frame.image)
    if raw.startswith((JPEG_MAGIC, PNG_MAGIC)):
        return raw
    if not frame.format:
        return None
    from PIL import Image

    image = Image.frombytes(frame.format, frame.size, raw)
    if fmt == "JPEG" and image.mode not in ("RGB", "L"):
        image = image.convert("RGB")
    out = io.BytesIO()
    image.save(out, format=fmt, quality=85) if fmt == "JPEG" else image.save(out, format=fmt)
    return out.getvalue()
