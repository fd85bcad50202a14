"""What to send a bot, and when: paced audio, urgent interrupts, coalesced chat (pure; no I/O).

One :class:`PlaybackScheduler` per ready control connection. It is fed
validated commands with :meth:`~PlaybackScheduler.submit` and a clock reading,
and says what to write next with :meth:`~PlaybackScheduler.next_send` (or
when to ask again, :meth:`~PlaybackScheduler.next_deadline`). The socket code
writes what it is given and reports back with :meth:`~PlaybackScheduler.sent`.

Three lanes, highest priority first:

1. **interrupt**: jumps every queue. Submitting one drops all audio held for
   the bot at once, so playback stops within the lead even on Zoom and Teams,
   whose bots ignore ``interrupt``. Interrupts pending together are sent once.
2. **commands** (chat, images): sent as soon as the socket takes them, in
   stream order. An interim ``sendchat`` (``is_final`` false) still waiting at
   the tail of the lane is replaced by a newer one of the same role (interim or
   final), so a slow socket gets only the latest text; a final is never dropped
   or reordered. Each replaced interim is reported (``command_superseded``).
3. **audio**: cut into ``chunk_ms`` chunks at 48 kHz and paced at real time,
   keeping at most ``lead_ms`` of audio queued at the bot. The scheduler models
   the bot's queue (``_play_end``, when it will run dry) from what it sent and
   when; a chunk is due once sending it keeps the queue within the lead.

Consecutive ``sendaudio`` entries with the same ``utterance_id`` form one
utterance; an entry without one is an utterance of its own. Utterances play
back to back, in order. Playback events are emitted when the modelled bot
would start and finish playing, not when chunks are written.

Acknowledgement: each :class:`Outgoing` lists the entry ids to XACK once it
is written: a command's own id (plus interims it superseded), an audio
entry's id with the chunk that sends its last sample, and the ids of audio an
interrupt dropped with that interrupt. What was never acked stays pending in
Redis when the connection dies (:meth:`~PlaybackScheduler.abort`) and is
delivered again, from its start, on the bot's next control connection.
"""

from __future__ import annotations

import base64
import json
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from gateway.audio import StreamResampler
from gateway.commands import Command
from gateway.exceptions import CommandRejected
from gateway.protocol import BOT_SAMPLE_RATE
from gateway.settings import Settings

Lane = Literal["interrupt", "command", "audio"]
_EPSILON_S = 1e-6  # clock readings this close to a deadline count as on time (float sums)
PLAYBACK_EVENTS = ("playback_started", "playback_finished", "playback_interrupted")


@dataclass(frozen=True, slots=True)
class PlaybackConfig:
    """Pacing and bounds of one bot's playback (from :class:`~gateway.settings.Settings`)."""

    chunk_ms: int = 100
    lead_ms: int = 300
    max_held_s: float = 120.0
    max_entries: int = 1024
    max_commands: int = 256

    def __post_init__(self) -> None:
        if not 0 < self.chunk_ms <= self.lead_ms:
            raise ValueError("need 0 < chunk_ms <= lead_ms")

    @classmethod
    def from_settings(cls, settings: Settings) -> PlaybackConfig:
        return cls(
            chunk_ms=settings.playback_chunk_ms,
            lead_ms=settings.playback_lead_ms,
            max_held_s=settings.playback_max_held_s,
            max_entries=settings.playback_max_entries,
            max_commands=settings.outbox_max_commands,
        )

    @property
    def chunk_samples(self) -> int:
        return BOT_SAMPLE_RATE * self.chunk_ms // 1000


@dataclass(eq=False, slots=True)
class _Clip:
    entry_id: str
    source: StreamResampler


@dataclass(eq=False)
class _Utterance:
    utterance_id: str
    entry_id: str  # of its first entry
    clips: deque[_Clip] = field(default_factory=deque)
    total: int = 0  # 48 kHz samples, all entries so far
    sent: int = 0
    start_at: float | None = None  # modelled time the bot starts playing it
    end_at: float = 0.0  # modelled time the bot finishes what was sent of it
    announced: bool = False

    def fields(self) -> dict[str, str | int]:
        return {"utterance_id": self.utterance_id, "entry_id": self.entry_id}


@dataclass(eq=False, slots=True)
class Outgoing:
    """One message to write to the bot, and the entries to XACK once written."""

    lane: Lane
    name: str
    text: str
    entry_id: str = ""
    acks: list[str] = field(default_factory=list)
    utterance: _Utterance | None = None
    samples: int = 0  # 48 kHz samples in an audio chunk
    late_s: float = 0.0  # an audio chunk: how long after it was due it was taken
    role: str = ""
    interim: bool = False


@dataclass(frozen=True, slots=True)
class PlaybackEvent:
    type: str
    fields: dict[str, str | int]


def _ms(samples: int) -> int:
    return round(samples * 1000 / BOT_SAMPLE_RATE)


class PlaybackScheduler:
    """Decides, for one bot's control connection, what to write and when (see the module doc)."""

    def __init__(self, bot_id: str, config: PlaybackConfig | None = None) -> None:
        self.bot_id = bot_id
        self.config = config or PlaybackConfig()
        self._chunk = self.config.chunk_samples
        self._lead_s = self.config.lead_ms / 1000
        self._interrupt: Outgoing | None = None
        self._commands: deque[Outgoing] = deque()
        self.command_bytes = 0  # text of the commands waiting in _commands
        self._utterances: deque[_Utterance] = deque()
        self._play_end = float("-inf")  # when the modelled bot queue runs dry
        self._events: list[PlaybackEvent] = []
        self._carry: list[str] = []  # acks waiting for the next message written
        self._audio_since = 0.0  # when the audio lane last became non-empty
        self.held_samples = 0  # 48 kHz samples accepted and not yet sent
        self.held_entries = 0  # sendaudio entries not yet fully sent
        #: Things worth counting, for the driver to move into metrics:
        #: ``coalesced``, ``underruns``, ``interrupted_samples``, ``chunks``.
        self.counts: Counter[str] = Counter()

    # -- input ----------------------------------------------------------------

    def submit(self, command: Command, now: float) -> None:
        """Take a validated command. Raises CommandRejected(``queue_full``) past a bound."""
        if command.name == "interrupt":
            self._interrupt_all(command, now)
        elif command.name == "sendaudio":
            if not self.held_samples:
                self._audio_since = now
            self._add_audio(command)
        else:
            self._add_command(command)

    def _add_command(self, command: Command) -> None:
        payload = command.payload
        out = Outgoing("command", command.name, command.to_json(), command.entry_id, [command.entry_id])
        if command.name == "sendchat":
            out.role, out.interim = payload["role"], not payload["is_final"]
            tail = self._commands[-1] if self._commands else None
            # Only the tail: superseding anything earlier would reorder the lane.
            if tail is not None and tail.interim and tail.role == out.role:
                self._commands.pop()
                self.command_bytes -= len(tail.text)
                out.acks[:0] = tail.acks
                self.counts["coalesced"] += 1
                # A worker must be able to tell "dropped on purpose" from "lost".
                self._events.append(
                    PlaybackEvent(
                        "command_superseded",
                        {"entry_id": tail.entry_id, "command": "sendchat", "superseded_by": out.entry_id},
                    )
                )
        self._commands.append(out)
        self.command_bytes += len(out.text)

    def _add_audio(self, command: Command) -> None:
        samples = command.samples if command.samples is not None else np.zeros(0, np.int16)
        source = StreamResampler(samples, command.payload["sample_rate"])
        cfg = self.config
        held_s = (self.held_samples + source.total) / BOT_SAMPLE_RATE
        if held_s > cfg.max_held_s:
            raise CommandRejected(
                "queue_full",
                f"{held_s:.1f}s of audio would be held for this bot, the limit is {cfg.max_held_s:g}s",
                "sendaudio",
                limit="held_seconds",
            )
        if self.held_entries >= cfg.max_entries:
            raise CommandRejected(
                "queue_full",
                f"{self.held_entries} sendaudio entries held, the limit is {cfg.max_entries}",
                "sendaudio",
                limit="entries",
            )
        last = self._utterances[-1] if self._utterances else None
        if command.utterance_id and last is not None and last.utterance_id == command.utterance_id:
            utterance = last
        else:
            utterance = _Utterance(command.utterance_id, command.entry_id)
            self._utterances.append(utterance)
        utterance.clips.append(_Clip(command.entry_id, source))
        utterance.total += source.total
        self.held_samples += source.total
        self.held_entries += 1

    def _interrupt_all(self, command: Command, now: float) -> None:
        self._advance(now)
        if self._interrupt is None:
            self._interrupt = Outgoing("interrupt", "interrupt", command.to_json(), command.entry_id)
        self._interrupt.acks.append(command.entry_id)
        # The dropped audio is fully handled once the interrupt is written.
        self._interrupt.acks += self._drop_all(now, "interrupt")
        # On Google Meet the bot's queue is cleared now; on Zoom and Teams it
        # keeps at most the lead, which the next utterance simply follows.
        self._play_end = min(self._play_end, now)

    def _drop_all(self, now: float, reason: str) -> list[str]:
        dropped_ids: list[str] = []
        for u in self._utterances:
            queued_s = 0.0
            if u.start_at is not None:
                queued_s = min(u.sent / BOT_SAMPLE_RATE, max(0.0, u.end_at - max(now, u.start_at)))
            played = max(0, u.sent - round(queued_s * BOT_SAMPLE_RATE))
            self.counts["interrupted_samples"] += u.total - played
            self._events.append(
                PlaybackEvent(
                    "playback_interrupted",
                    {
                        **u.fields(),
                        "reason": reason,
                        "played_ms": _ms(played),
                        "dropped_ms": _ms(u.total - played),
                        "sent_ms": _ms(u.sent),
                        "duration_ms": _ms(u.total),
                    },
                )
            )
            dropped_ids += [clip.entry_id for clip in u.clips]
        self._utterances.clear()
        self.held_samples = 0
        self.held_entries = 0
        return dropped_ids

    def abort(self, now: float) -> None:
        """The connection is gone: report what was cut off; unsent entries stay unacked."""
        self._advance(now)
        self._drop_all(now, "disconnected")
        self._commands.clear()
        self.command_bytes = 0
        self._interrupt = None

    # -- output ---------------------------------------------------------------

    def next_send(self, now: float) -> Outgoing | None:
        """The next message to write now, or None (then wait for :meth:`next_deadline` or input)."""
        out = self._next(now)
        if out is not None and self._carry:
            out.acks += self._carry
            self._carry = []
        return out

    def _next(self, now: float) -> Outgoing | None:
        self._advance(now)
        if self._interrupt is not None:
            out, self._interrupt = self._interrupt, None
            return out
        if self._commands:
            command = self._commands.popleft()
            self.command_bytes -= len(command.text)
            return command
        while (due := self._audio_due()) is not None and now >= due - _EPSILON_S:
            chunk = self._take_chunk(now - max(due, self._audio_since))
            if chunk is not None:
                return chunk
        return None

    def sent(self, out: Outgoing, now: float) -> None:
        """``out`` was written at ``now``: advance the model of the bot's queue."""
        if out.lane != "audio" or out.utterance is None:
            return
        u = out.utterance
        if not self._utterances or u not in self._utterances:
            return  # interrupted while being written: the interrupt that follows clears it
        if now > self._play_end and u.sent:
            self.counts["underruns"] += 1  # the modelled bot ran dry inside an utterance
        start = max(self._play_end, now)
        if u.start_at is None:
            u.start_at = start
        self._play_end = start + out.samples / BOT_SAMPLE_RATE
        u.sent += out.samples
        u.end_at = self._play_end
        self.counts["chunks"] += 1

    def next_deadline(self) -> float | None:
        """When :meth:`next_send` or an event may next have something (None: only new input)."""
        times = []
        due = self._audio_due()
        if due is not None:
            times.append(due)
        for u in self._utterances:
            if u.start_at is not None and not u.announced:
                times.append(u.start_at)
            if not u.clips and u.start_at is not None:
                times.append(u.end_at)
            break  # only the head can change state next
        return min(times) if times else None

    def take_events(self) -> list[PlaybackEvent]:
        events, self._events = self._events, []
        return events

    @property
    def held_bytes(self) -> int:
        """What this bot's queue holds in memory, roughly: command text and audio samples."""
        return self.command_bytes + 2 * self.held_samples

    @property
    def pending_commands(self) -> int:
        return len(self._commands)

    @property
    def speaking(self) -> bool:
        return bool(self._utterances)

    @property
    def idle(self) -> bool:
        """Nothing to write now or later: only new input can change that."""
        return self._interrupt is None and not self._commands and not self._utterances

    # -- internals --------------------------------------------------------------

    def _audio_due(self) -> float | None:
        if not any(u.clips for u in self._utterances):
            return None
        # Due when, after sending one more chunk, the bot holds at most the lead.
        return self._play_end - (self._lead_s - self._chunk / BOT_SAMPLE_RATE)

    def _take_chunk(self, late_s: float) -> Outgoing | None:
        u = next(u for u in self._utterances if u.clips)
        pieces: list[np.ndarray] = []
        need = self._chunk
        acks: list[str] = []
        while need and u.clips:
            clip = u.clips[0]
            piece = clip.source.read(need)
            if len(piece):
                pieces.append(piece)
                need -= len(piece)
            if clip.source.exhausted:
                u.clips.popleft()
                acks.append(clip.entry_id)
                self.held_entries -= 1
        n = self._chunk - need
        self.held_samples = max(0, self.held_samples - n)
        if not n:
            # Entries whose audio came out empty: acknowledged with whatever goes next.
            self._carry += acks
            if not u.clips and u.start_at is None:
                self._utterances.remove(u)
                self._events.append(
                    PlaybackEvent("playback_finished", {**u.fields(), "played_ms": 0, "duration_ms": 0})
                )
            return None
        pcm = pieces[0] if len(pieces) == 1 else np.concatenate(pieces)
        payload = {
            "command": "sendaudio",
            "bot_id": self.bot_id,
            "audiochunk": base64.b64encode(pcm.astype("<i2", copy=False).tobytes()).decode(),
            "sample_rate": BOT_SAMPLE_RATE,
            "encoding": "pcm16",
            "channels": 1,
            "endianness": "little",
        }
        text = json.dumps(payload, separators=(",", ":"))
        return Outgoing("audio", "sendaudio", text, u.entry_id, acks, u, n, late_s=max(0.0, late_s))

    def _advance(self, now: float) -> None:
        """Emit the playback events the modelled bot has reached by ``now``, in order."""
        while self._utterances:
            u = self._utterances[0]
            if u.start_at is None or u.start_at > now + _EPSILON_S:
                return
            if not u.announced:
                u.announced = True
                self._events.append(
                    PlaybackEvent("playback_started", {**u.fields(), "duration_ms": _ms(u.total)})
                )
            if u.clips or u.end_at > now + _EPSILON_S:
                return
            self._utterances.popleft()
            self._events.append(
                PlaybackEvent(
                    "playback_finished", {**u.fields(), "played_ms": _ms(u.sent), "duration_ms": _ms(u.total)}
                )
            )
