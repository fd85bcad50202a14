"""How several people talking at once reach one pipeline (pure; no I/O, no clock).

The gateway publishes one entry per frame *per speaker*: three people talking
make three 48 kHz streams, interleaved in the bot's audio stream. A Pipecat
pipeline has one audio input, so a policy decides what it hears:

``mix``
    every speaker summed into one stream (what a phone call sounds like). A
    speaker's frame waits until every speaker heard in the last ``max_skew_ms``
    has its frame for that time too, or until the leading speaker is
    ``max_skew_ms`` ahead (a speaker who stopped is then padded with silence
    and, after ``max_skew_ms`` of silence, forgotten). One person talking is
    passed on at once; overlap costs at most ``max_skew_ms`` of delay.
``active``
    only the active speaker, switched to another one who is ``switch_db``
    louder for ``switch_frames`` frames in a row, or once the active one has
    been silent for ``hold_ms``. Others' audio is dropped (counted).
``per_speaker``
    every speaker's frames as they come, tagged with their speaker: for
    pipelines that route by ``transport_source`` (one STT per person).

Each :class:`Block` carries who it is from (the loudest contributor for a mix),
so frames reaching the pipeline keep the speaker's identity.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np

SpeakerPolicy = Literal["mix", "active", "per_speaker"]
POLICIES: tuple[SpeakerPolicy, ...] = ("mix", "active", "per_speaker")
RATE = 48_000


@dataclass(frozen=True, slots=True)
class Block:
    """Audio for the pipeline, at 48 kHz float32, with who it is from."""

    samples: np.ndarray
    speaker_id: str
    speaker_name: str
    #: Set in ``per_speaker`` mode: the stream this block belongs to.
    source: str | None = None
    #: Everyone whose voice is in it (a mix may hold several).
    speakers: tuple[str, ...] = ()


def _level_db(x: np.ndarray) -> float:
    if not len(x):
        return -120.0
    rms = float(np.sqrt(np.mean(np.square(x, dtype=np.float64))))
    return 20.0 * np.log10(max(rms, 1e-6))


@dataclass
class _Lane:
    name: str
    buf: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    starved: int = 0  # samples of silence padded in for it since its last frame
    level_db: float = -120.0


@dataclass
class SpeakerMixer:
    """Feed it frames with :meth:`push`; it returns the blocks to pass on now.

    ``block_ms`` sets the size of mixed blocks (``mix`` only); the other
    policies pass frames on whole.
    """

    policy: SpeakerPolicy = "mix"
    max_skew_ms: int = 60
    block_ms: int = 20
    switch_db: float = 6.0
    switch_frames: int = 3
    hold_ms: int = 600
    silence_db: float = -50.0
    #: Samples of other speakers dropped by the ``active`` policy.
    dropped_samples: int = 0
    _lanes: dict[str, _Lane] = field(default_factory=dict)
    _active: str | None = None
    _active_quiet: int = 0  # samples since the active speaker was last voiced
    _challenger: tuple[str, int] | None = None

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ValueError(f"speaker policy {self.policy!r}: one of {', '.join(POLICIES)}")
        if self.block_ms <= 0 or self.max_skew_ms < 0 or self.hold_ms < 0 or self.switch_frames < 1:
            raise ValueError("block_ms must be positive; max_skew_ms, hold_ms >= 0; switch_frames >= 1")
        self._block = RATE * self.block_ms // 1000
        self._skew = RATE * self.max_skew_ms // 1000
        self._hold = RATE * self.hold_ms // 1000

    @property
    def speakers(self) -> list[str]:
        """Speakers the mixer is waiting on or holding audio of."""
        return list(self._lanes)

    @property
    def active_speaker(self) -> str | None:
        return self._active

    def push(self, speaker_id: str, speaker_name: str, samples: np.ndarray) -> list[Block]:
        """One frame of one speaker (48 kHz float32); returns what is ready now."""
        if samples.dtype != np.float32:
            raise TypeError(f"samples must be float32 at {RATE} Hz, not {samples.dtype}")
        key = speaker_id or speaker_name
        if self.policy == "per_speaker":
            return [Block(samples, speaker_id, speaker_name, source=key, speakers=(key,))]
        if self.policy == "active":
            return self._push_active(key, speaker_id, speaker_name, samples)
        return self._push_mix(key, speaker_name, samples)

    def flush(self) -> list[Block]:
        """Everything held (``mix``), padded: the stream is ending or going quiet."""
        if self.policy != "mix":
            return []
        out: list[Block] = []
        while any(len(lane.buf) for lane in self._lanes.values()):
            out.append(self._mix_one())
        self._lanes.clear()
        return out

    # -- mix -------------------------------------------------------------------

    def _push_mix(self, key: str, name: str, samples: np.ndarray) -> list[Block]:
        lane = self._lanes.get(key)
        if lane is None:
            lane = self._lanes[key] = _Lane(name)
        lane.name = name
        lane.buf = np.concatenate((lane.buf, samples)) if len(lane.buf) else samples
        lane.starved = 0
        out: list[Block] = []
        while True:
            lengths = [len(x.buf) for x in self._lanes.values()]
            lead = max(lengths)
            if lead < self._block:
                break
            # Someone heard lately has no audio for this time yet: wait for them,
            # unless the leader is too far ahead (they have stopped talking).
            if min(lengths) < self._block and lead < self._block + self._skew:
                break
            out.append(self._mix_one())
        return out

    def _mix_one(self) -> Block:
        n = self._block
        mixed = np.zeros(n, np.float32)
        loudest, loudest_db, names, voices = "", -1e9, {}, []
        for key, lane in list(self._lanes.items()):
            part = lane.buf[:n]
            lane.buf = lane.buf[n:]
            if len(part):
                mixed[: len(part)] += part
                db = _level_db(part)
                if db > loudest_db:
                    loudest, loudest_db = key, db
                names[key] = lane.name
                voices.append(key)
            lane.starved += n - len(part)
            if not len(lane.buf) and lane.starved > self._skew:
                del self._lanes[key]  # silent for longer than we wait: stop waiting for it
        np.clip(mixed, -1.0, 1.0, out=mixed)
        return Block(mixed, loudest, names.get(loudest, ""), speakers=tuple(voices))

    # -- active ----------------------------------------------------------------

    def _push_active(self, key: str, speaker_id: str, name: str, samples: np.ndarray) -> list[Block]:
        db = _level_db(samples)
        lane = self._lanes.setdefault(key, _Lane(name))
        lane.level_db = db
        voiced = db > self.silence_db
        if self._active is None or (key != self._active and self._active_quiet >= self._hold):
            if voiced or self._active is None:
                self._switch(key)
        elif key != self._active:
            current = self._lanes.get(self._active)
            louder = voiced and (current is None or db >= current.level_db + self.switch_db)
            if louder:
                run = self._challenger[1] + 1 if self._challenger and self._challenger[0] == key else 1
                self._challenger = (key, run)
                if run >= self.switch_frames:
                    self._switch(key)
            elif self._challenger and self._challenger[0] == key:
                self._challenger = None
        if key != self._active:
            self.dropped_samples += len(samples)
            self._active_quiet += len(samples) // max(1, len(self._lanes))
            return []
        self._active_quiet = 0 if voiced else self._active_quiet + len(samples)
        return [Block(samples, speaker_id, name, speakers=(key,))]

    def _switch(self, key: str) -> None:
        self._active = key
        self._active_quiet = 0
        self._challenger = None
