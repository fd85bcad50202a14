"""A worker instance's counters, as plain numbers (the same counts as its Prometheus metrics)."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field, fields
from typing import Any


@dataclass
class WorkerStats:
    """Counters of one instance; every bound the SDK hits shows up here and in a log line."""

    bots_started: int = 0
    bots_stopped: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    events: int = 0
    frames: int = 0
    own_voice_skipped: int = 0
    entries_claimed: int = 0  # taken over from a previous owner (may repeat)
    seq_gaps: int = 0  # frames missing before we read them (trimmed by MAXLEN, lost upstream)
    seq_repeats: int = 0
    handler_errors: int = 0
    handler_timeouts: int = 0
    max_bots_hit: int = 0
    redis_errors: int = 0
    takeovers: int = 0  # bots taken that an instance of the group had handled before
    bots_handed_over: int = 0  # handed back to balance the group

    def as_dict(self) -> dict[str, Any]:
        """Every counter, for a log line."""
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["bots_stopped"] = dict(self.bots_stopped)
        return out
