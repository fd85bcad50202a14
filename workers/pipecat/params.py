"""The transport's settings: Pipecat's ``TransportParams`` plus what a meeting needs."""

from __future__ import annotations

from typing import Literal

from pipecat.transports.base_transport import TransportParams
from pydantic import Field, model_validator

from workers.pipecat.speakers import SpeakerPolicy

#: Rates the gateway takes in ``sendaudio`` (docs/PROTOCOL.md); others are resampled here first.
GATEWAY_RATES = (8000, 11025, 12000, 16000, 22050, 24000, 32000, 44100, 48000)


class MeetstreamParams(TransportParams):
    """Configuration of :class:`~workers.pipecat.MeetstreamTransport`.

    Audio in and out are on by default (a meeting bot hears and speaks), and no
    silence is sent after an ``EndFrame``: the gateway already holds what is to
    be played. Units are in the names.

    Parameters:
        speaker_policy: how several people talking at once reach the pipeline:
            ``mix`` (one stream, summed), ``active`` (follow the active speaker)
            or ``per_speaker`` (each person's frames, ``transport_source`` = the
            speaker). See :mod:`workers.pipecat.speakers`.
        mix_max_skew_ms: ``mix``: how long a speaker's audio waits for the others'.
        active_switch_db, active_hold_ms: ``active``: how much louder another
            speaker must be to take over, and how long the active one may be quiet.
        include_unattributed: pass on audio the bot could not attribute
            (``NoSpeaker``); off by default, since it may hold the bot's own voice.
        silence_fill: keep the pipeline's input a continuous real-time stream
            (as WebRTC transports do) by adding silence while nobody talks, so
            VAD and STT see speech end. Not in ``per_speaker`` mode, and not
            while the worker is behind (frames arriving late), when the quiet is ours.
        silence_fill_after_ms: silence is added once no audio came for this long.
        audio_in_max_queued_s: audio handed to the pipeline and not yet taken
            by it; past this the SDK's reading of the bot waits (backpressure,
            counted), so Redis, not memory, holds the backlog.
        audio_in_resample_quality: soxr's quality for 48 kHz -> the pipeline's rate.
            ``LQ`` (default) passes every 20 ms frame on at once, with images
            110 dB down and the top octave (7-8 kHz at 16 kHz) rolled off;
            ``MQ``/``HQ`` are flat to the top but hold output back in blocks of
            about a frame (10 ms more latency on average).
        audio_out_entry_ms: output audio is written in ``sendaudio`` entries of
            at least this much (the first of an utterance at once), and
        audio_out_max_wait_ms: no sample waits longer than this to be written.
        audio_out_max_buffered_s: output audio not yet written (Redis slow or
            away); beyond it the oldest is dropped and counted.
        replay_after_disconnect: if the bot's control channel drops mid-utterance,
            let the gateway play it again on reconnect (default: interrupt it,
            since the conversation has moved on).
        chat_enabled: the bot's text (what it says) goes to the meeting chat as
            ``sendchat``: interim updates, then a final when it stops speaking.
        chat_role: ``assistant`` or ``user``.
        chat_interim_interval_s: least time between two interim updates.
        chat_transcripts: also post final user transcriptions (``role: user``).
        chat_message_types: ``message`` events from the bot whose ``type`` is one
            of these are meeting chat: they reach the pipeline as an
            ``InputTextRawFrame`` and ``on_chat_message``.
        image_out_enabled: image frames become ``sendimg`` / ``sendimg_url``
            (the bot's camera shows a still image).
        image_min_interval_s: at most one image per this long; the latest wins.
        image_format: how raw image frames are encoded for ``sendimg``.
        bot_speaking_period_s: how often ``BotSpeakingFrame`` is broadcast
            while the bot is heard speaking.
        max_pending_commands: chat and image commands waiting to be written;
            past it the oldest is dropped and counted.
    """

    audio_in_enabled: bool = True
    audio_out_enabled: bool = True
    audio_out_end_silence_secs: int = 0

    speaker_policy: SpeakerPolicy = "mix"
    mix_max_skew_ms: int = Field(default=60, ge=0, le=1000)
    active_switch_db: float = 6.0
    active_hold_ms: int = Field(default=600, ge=0)
    include_unattributed: bool = False
    silence_fill: bool = True
    silence_fill_after_ms: int = Field(default=100, ge=20, le=5000)
    audio_in_max_queued_s: float = Field(default=0.5, gt=0)
    audio_in_resample_quality: Literal["LQ", "MQ", "HQ", "VHQ"] = "LQ"

    audio_out_entry_ms: int = Field(default=100, ge=10, le=2000)
    audio_out_max_wait_ms: int = Field(default=40, ge=0, le=2000)
    audio_out_max_buffered_s: float = Field(default=30.0, gt=0)
    replay_after_disconnect: bool = False

    chat_enabled: bool = True
    chat_role: Literal["assistant", "user"] = "assistant"
    chat_interim_interval_s: float = Field(default=0.3, ge=0)
    chat_transcripts: bool = False
    chat_message_types: tuple[str, ...] = ("chat", "chat_message", "chatMessage")

    image_out_enabled: bool = True
    image_min_interval_s: float = Field(default=1.0, ge=0)
    image_format: Literal["JPEG", "PNG"] = "JPEG"

    bot_speaking_period_s: float = Field(default=0.2, gt=0)
    max_pending_commands: int = Field(default=64, ge=1)

    @model_validator(mode="after")
    def _check(self) -> MeetstreamParams:
        if self.audio_in_channels != 1 or self.audio_out_channels != 1:
            raise ValueError("meeting bots hear and play mono audio: audio_in/out_channels must be 1")
        if self.audio_out_max_wait_ms > self.audio_out_entry_ms * 4:
            raise ValueError("audio_out_max_wait_ms should not exceed 4 x audio_out_entry_ms")
        return self
