"""Whether the bot is speaking, from the gateway's playback events (pure; no I/O).

Pipecat's ``BotStartedSpeakingFrame`` / ``BotStoppedSpeakingFrame`` drive turn
taking and interruptions, so they must say what the meeting *hears*, not what
the pipeline generated: the gateway paces audio at real time, minutes of
it may be queued there. The gateway reports each utterance it plays
(``playback_started``, then ``playback_finished`` or ``playback_interrupted``,
docs/PLAYBACK.md). This tracker folds those into one speaking state:

* **started** when the first of our utterances starts playing;
* **stopped** when nothing is playing *and* every bit of audio we wrote is
  accounted for (played, dropped by an interrupt, or rejected). A gap inside a
  response (the pipeline wrote slower than real time: the gateway ended an
  utterance and starts the next part later) is not a stop, since more audio
  we wrote is still to come.

Accounting is by duration: the gateway may cut one of our utterance ids into
several utterances (one per stretch it could play without a gap), each
reporting its ``duration_ms``; ours is done when those add up to what we wrote.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

Transition = Literal["started", "stopped"]


@dataclass
class _Utterance:
    written_ms: float = 0.0
    ended_ms: float = 0.0
    entries: int = 0


@dataclass
class PlaybackTracker:
    """Feed it what was written (:meth:`wrote`) and the gateway's events (:meth:`event`)."""

    #: Rounding slack per entry written (the gateway reports whole milliseconds per utterance).
    slack_ms_per_entry: float = 1.0
    speaking: bool = False
    _utterances: dict[str, _Utterance] = field(default_factory=dict)  # insertion = write order
    _entry_utterance: dict[str, tuple[str, float]] = field(default_factory=dict)  # id -> (uid, ms)
    _playing: set[str] = field(default_factory=set)  # entry_ids of gateway utterances playing

    @property
    def outstanding(self) -> bool:
        """Audio we wrote that the gateway has not reported played or dropped yet."""
        return bool(self._utterances)

    @property
    def playing(self) -> bool:
        return bool(self._playing)

    def wrote(self, utterance_id: str, entry_id: str, ms: float) -> None:
        """One ``sendaudio`` entry of ``ms`` milliseconds went into the command stream."""
        u = self._utterances.setdefault(utterance_id, _Utterance())
        u.written_ms += ms
        u.entries += 1
        self._entry_utterance[entry_id] = (utterance_id, ms)

    def event(self, kind: str, fields: dict[str, str]) -> Transition | None:
        """A playback event of the bot's events stream; returns the transition it causes."""
        entry_id = fields.get("entry_id", "")
        uid = fields.get("utterance_id") or self._entry_utterance.get(entry_id, ("", 0.0))[0]
        if kind == "playback_started":
            if uid not in self._utterances:
                return None  # not ours (another worker's audio), or already accounted
            self._playing.add(entry_id)
        elif kind == "playback_finished":
            self._playing.discard(entry_id)
            u = self._utterances.get(uid)
            if u is not None:
                u.ended_ms += _number(fields.get("duration_ms"))
                self._maybe_done(uid, u)
        elif kind == "playback_interrupted":
            self._playing.discard(entry_id)
            if uid in self._utterances:
                # An interrupt (or a drop of the control socket, after which we interrupt
                # too) drops everything the gateway held: this and every older utterance.
                for older in list(self._utterances):
                    self._forget(older)
                    if older == uid:
                        break
        else:
            return None
        return self._transition()

    def rejected(self, entry_id: str) -> Transition | None:
        """The gateway rejected one of our entries (``command_rejected``): it will never play."""
        uid, ms = self._entry_utterance.pop(entry_id, ("", 0.0))
        u = self._utterances.get(uid)
        if u is not None:
            u.written_ms -= ms
            u.entries -= 1
            self._maybe_done(uid, u)
        return self._transition()

    def reset(self) -> Transition | None:
        """Forget everything (the bot left): a speaking bot stops."""
        self._utterances.clear()
        self._entry_utterance.clear()
        self._playing.clear()
        return self._transition()

    def _maybe_done(self, uid: str, u: _Utterance) -> None:
        if u.ended_ms >= u.written_ms - self.slack_ms_per_entry * (u.entries + 1):
            self._forget(uid)

    def _forget(self, uid: str) -> None:
        self._utterances.pop(uid, None)
        for entry in [e for e, (u, _) in self._entry_utterance.items() if u == uid]:
            del self._entry_utterance[entry]

    def _transition(self) -> Transition | None:
        if not self.speaking and self._playing:
            self.speaking = True
            return "started"
        if self.speaking and not self._playing and not self._utterances:
            self.speaking = False
            return "stopped"
        return None


def _number(raw: str | None) -> float:
    try:
        return float(raw) if raw else 0.0
    except ValueError:
        return 0.0
