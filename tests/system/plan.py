"""The day's script, decided before anything starts: meetings, faults and phases (pure).

Both sizes run the same script: fault times are fractions of the run, so the CI
size compresses it and the full size stretches it. Everything is seeded, so
two runs of one size are the same day (what differs is how the system copes).
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass, field
from typing import Any

#: Every fault of the day, in order, with the fraction of the run at which it starts.
#: ``heal_s`` is the bound (seconds after the start) within which what the fault costs
#: must fall for a loss or repeat to be explained by it; ``docs/OPERATIONS.md`` says why.
FAULTS: tuple[tuple[str, float], ...] = (
    ("worker_kill", 0.12),
    ("worker_join", 0.17),
    ("gateway_kill", 0.21),
    ("redis_primary_kill", 0.32),
    ("redis_rejoin", 0.46),
    ("slot_migration", 0.53),
    ("rolling_restart", 0.61),
    ("burst_join", 0.63),
    ("worker_sigterm", 0.68),
)


@dataclass(frozen=True)
class Meeting:
    """One bot's meeting: when it joins and leaves, seconds from the start of the day."""

    bot_id: str
    join_s: float
    leave_s: float
    burst: bool = False  # one of the bots that join all at once during the rolling restart


@dataclass(frozen=True)
class Fault:
    name: str
    at_s: float


@dataclass
class DayPlan:
    """Sizes and timings of one day; ``build`` makes the meetings and fault times."""

    bots: int = 16
    seconds: float = 80.0
    seed: int = 16
    workers: int = 3
    bot_procs: int = 1
    frame_ms: int = 20
    #: A conversation cycle: the person speaks, asks in the chat, the agent answers and speaks.
    cycle_s: float = 4.0
    turn_s: float = 1.6
    utterance_s: float = 0.8
    #: Every n-th answer a second person barges in while the agent speaks.
    barge_every: int = 2
    #: The workers' lease TTL: short for quick takeovers at the reduced size; the SDK's
    #: default (5 s) at full size, where a loaded 2-core box delays a renewal past 2 s.
    lease_ttl_s: float = 2.0
    #: The workers' read_interval_ms: at full size, what lets 200 bots' workers share two
    #: cores with everything else (docs/BENCHMARKS.md); 0 (a read per frame) otherwise.
    read_interval_ms: int = 0
    #: Bots that join all at once during the rolling restart, as a share of ``bots``.
    burst_share: float = 0.25
    #: Share of the bots whose meeting ends mid-day, replaced by a new bot soon after.
    turnover_share: float = 0.3
    meetings: list[Meeting] = field(default_factory=list)
    faults: list[Fault] = field(default_factory=list)

    def build(self) -> DayPlan:
        rng = random.Random(self.seed)
        end_s = self.seconds - 6.0  # everyone has left by then; the rest is for the ledger
        meetings: list[Meeting] = []
        n = 0

        def new(join_s: float, leave_s: float, burst: bool = False) -> None:
            nonlocal n
            meetings.append(Meeting(f"day-{n:04d}", round(join_s, 3), round(leave_s, 3), burst))
            n += 1

        first_fault_s = FAULTS[0][1] * self.seconds
        turnover = round(self.bots * self.turnover_share)
        for i in range(self.bots):
            join_s = rng.uniform(0.5, min(6.0, first_fault_s - 2.0))
            if i < turnover:
                # Ends mid-day (between two faults or during one), and a new meeting starts.
                leave_s = rng.uniform(0.3, 0.75) * self.seconds
                new(join_s, leave_s)
                new(leave_s + rng.uniform(1.0, 4.0), end_s - rng.uniform(0.0, 2.0))
            else:
                new(join_s, end_s - rng.uniform(0.0, 2.0))
        faults = [Fault(name, round(frac * self.seconds, 3)) for name, frac in FAULTS]
        burst_s = next(f.at_s for f in faults if f.name == "burst_join")
        for _ in range(max(1, round(self.bots * self.burst_share))):
            new(burst_s + rng.uniform(0.0, 0.3), end_s - rng.uniform(0.0, 2.0), burst=True)
        self.meetings = sorted(meetings, key=lambda m: m.bot_id)
        self.faults = faults
        return self

    def fault_at(self, name: str) -> float:
        return next(f.at_s for f in self.faults if f.name == name)

    def phases(self) -> list[tuple[str, float, float]]:
        """(name, start, end) in seconds: ``steady`` before the first fault, then each
        fault until the next one starts, then ``wind_down``."""
        out = [("steady", 0.0, self.faults[0].at_s)]
        for a, b in zip(self.faults, [*self.faults[1:], None], strict=True):
            out.append((a.name, a.at_s, b.at_s if b is not None else self.seconds - 6.0))
        out.append(("wind_down", self.seconds - 6.0, self.seconds + 3600.0))
        return out

    def phase_of(self, t_s: float) -> str:
        for name, start, end in self.phases():
            if start <= t_s < end:
                return name
        return "wind_down" if t_s >= 0 else "steady"

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> DayPlan:
        values = dict(data)
        values["meetings"] = [Meeting(**m) for m in data.get("meetings", [])]
        values["faults"] = [Fault(**f) for f in data.get("faults", [])]
        return cls(**values)
