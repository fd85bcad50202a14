"""What the conformance kit concludes from what it saw (pure; no I/O).

Inputs are the group's journal (the records every worker under test writes,
in stream order, each with its Redis entry time), what the kit did to the
instances (kill -9, SIGSTOP/SIGCONT, SIGTERM, with wall-clock times: the kit,
Redis and the workers share one machine, so one clock), what the gateway
published (each bot's audio ``(conn, seq)``) and what the bots received.
Every check returns a :class:`Check` with the figures it measured.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

Frame = tuple[str, int]  # conn, seq


@dataclass(frozen=True, slots=True)
class Record:
    """One journal entry (docs/PROTOCOL.md, "The journal")."""

    id: str  # the Redis entry id
    type: str
    instance: str
    fields: Mapping[str, str]

    @property
    def t(self) -> float:
        """Redis time the record was written, Unix seconds."""
        return int(self.id.split("-")[0]) / 1000

    @property
    def bot(self) -> str:
        return self.fields.get("bot_id", "")

    @property
    def at(self) -> float:
        """A frame record: when the worker dispatched it (its ``at``, Unix ms); else ``t``."""
        raw = self.fields.get("at")
        return int(raw) / 1000 if raw else self.t

    @property
    def frame(self) -> Frame:
        return self.fields.get("conn", ""), int(self.fields.get("seq", "-1"))


@dataclass(frozen=True, slots=True)
class Action:
    """What the kit did to an instance, and when (Unix seconds)."""

    kind: str  # start | kill | pause | resume | term
    instance: str
    t: float


@dataclass
class Check:
    name: str
    passed: bool
    summary: str
    figures: dict[str, Any] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    def fail(self, problem: str) -> None:
        self.passed = False
        if len(self.problems) < 20:
            self.problems.append(problem)


@dataclass
class Stint:
    """One instance's ownership of one bot: from its ``start`` to its ``stop`` (or its death)."""

    bot: str
    instance: str
    start: Record
    stop: Record | None = None
    frames: list[Record] = field(default_factory=list)


def stints(records: Iterable[Record]) -> dict[str, list[Stint]]:
    """Each bot's stints in the order they began; frame records go to their instance's open stint."""
    by_bot: dict[str, list[Stint]] = defaultdict(list)
    open_: dict[tuple[str, str], Stint] = {}
    for r in records:
        key = (r.bot, r.instance)
        if r.type == "start":
            s = Stint(r.bot, r.instance, r)
            by_bot[r.bot].append(s)
            open_[key] = s
        elif r.type == "stop":
            ended = open_.pop(key, None)
            if ended is not None:
                ended.stop = r
        elif r.type == "frame":
            stint = open_.get(key)
            if stint is not None:
                stint.frames.append(r)
    return by_bot


def _bound(hellos: Mapping[str, Record], instance: str, field_name: str, default_s: float) -> float:
    hello = hellos.get(instance)
    raw = hello.fields.get(field_name) if hello is not None else None
    return int(raw) / 1000 if raw else default_s


def check_hello(records: list[Record], instances: Iterable[str]) -> Check:
    hellos = {r.instance for r in records if r.type == "hello"}
    c = Check("hello", True, "every instance announced itself (hello: lease_ttl_ms, claim_interval_ms)")
    for i in instances:
        if i not in hellos:
            c.fail(f"{i} wrote no hello record (or not under the instance id it was given)")
    return c


def check_frames_outside_stints(records: list[Record]) -> Check:
    c = Check("handled only when owned", True, "every frame record falls inside its instance's stint")
    open_: set[tuple[str, str]] = set()
    n = 0
    for r in records:
        key = (r.bot, r.instance)
        if r.type == "start":
            open_.add(key)
        elif r.type == "stop":
            open_.discard(key)
        elif r.type == "frame" and key not in open_:
            n += 1
            c.fail(f"{r.instance} handled {r.bot} {r.frame} without a start record")
    c.figures["frames_outside"] = n
    return c


def check_one_owner(by_bot: Mapping[str, list[Stint]]) -> Check:
    """Stints of different instances never overlap in handling: a later stint's first dispatch
    comes after every earlier stint's last one (dispatch times, the frame records' ``at``)."""
    c = Check("one owner at a time", True, "no two instances handled one bot's entries at once")
    moves = 0
    for bot, rows in by_bot.items():
        busy = [s for s in rows if s.frames]
        for i, a in enumerate(busy):
            for b in busy[i + 1 :]:
                if a.instance == b.instance:
                    continue
                moves += 1
                last_a = max(f.at for f in a.frames)
                first_b = min(f.at for f in b.frames)
                if first_b > last_a:
                    continue
                c.fail(
                    f"{bot}: {b.instance} handled a frame at {first_b:.3f} before {a.instance} "
                    f"handled its last at {last_a:.3f} ({last_a - first_b:.3f} s of overlap)"
                )
    c.figures["stint_pairs_compared"] = moves
    return c


def _taken_after(by_bot: Mapping[str, list[Stint]], bot: str, instance: str, after: float) -> Stint | None:
    for s in by_bot.get(bot, []):
        if s.instance != instance and s.start.t >= after:
            return s
    return None


def _owned_at(by_bot: Mapping[str, list[Stint]], instance: str, t: float) -> list[str]:
    owned = []
    for bot, rows in by_bot.items():
        for s in rows:
            if s.instance == instance and s.start.t <= t and (s.stop is None or s.stop.t > t):
                owned.append(bot)
                break
    return owned


def check_takeover(
    name: str,
    by_bot: Mapping[str, list[Stint]],
    hellos: Mapping[str, Record],
    action: Action,
    survivors: Iterable[str],
    *,
    default_lease_s: float,
    default_claim_s: float,
    slack_s: float,
) -> Check:
    """After ``kill -9`` (or SIGSTOP) of an instance, each bot it owned is started by another
    within its lease TTL plus the survivors' claim interval (plus ``slack_s``)."""
    lease = _bound(hellos, action.instance, "lease_ttl_ms", default_lease_s)
    claim = max((_bound(hellos, i, "claim_interval_ms", default_claim_s) for i in survivors), default=0.0)
    limit = lease + claim + slack_s
    c = Check(
        name,
        True,
        f"bots of {action.instance} taken over within lease_ttl_s + claim_interval_s "
        f"({lease:g} + {claim:g} s, +{slack_s:g} s slack)",
    )
    owned = _owned_at(by_bot, action.instance, action.t)
    times = []
    if not owned:
        c.fail(f"{action.instance} owned no bot when it was stopped: nothing to take over")
    for bot in owned:
        nxt = _taken_after(by_bot, bot, action.instance, action.t)
        if nxt is None:
            c.fail(f"{bot} was never taken over from {action.instance}")
            continue
        took = nxt.start.t - action.t
        times.append(took)
        if took > limit:
            c.fail(f"{bot} taken by {nxt.instance} {took:.2f} s after, over the {limit:.2f} s bound")
    c.figures.update(bots=len(owned), bound_s=round(lease + claim, 3))
    if times:
        c.figures.update(max_s=round(max(times), 3), min_s=round(min(times), 3))
    return c


def check_handback(
    by_bot: Mapping[str, list[Stint]],
    hellos: Mapping[str, Record],
    action: Action,
    survivors: Iterable[str],
    *,
    exit_code: int | None,
    exit_s: float | None,
    default_claim_s: float,
    slack_s: float,
) -> Check:
    """SIGTERM: the instance lets every bot go (``stop``, then the lease is free), another
    instance starts each within one claim interval of that ``stop``, no frame is handled by
    both (a clean hand-back acknowledged everything it handled), and the process exits 0."""
    claim = max((_bound(hellos, i, "claim_interval_ms", default_claim_s) for i in survivors), default=0.0)
    limit = claim + slack_s
    c = Check(
        "clean hand-back on SIGTERM",
        True,
        f"bots of {action.instance} handed back and taken within claim_interval_s ({claim:g} s, "
        f"+{slack_s:g} s slack) of its stop record, nothing handled twice, exit 0",
    )
    owned = _owned_at(by_bot, action.instance, action.t)
    gaps, stops = [], []
    if not owned:
        c.fail(f"{action.instance} owned no bot when it was stopped: nothing to hand back")
    for bot in owned:
        mine = [s for s in by_bot[bot] if s.instance == action.instance and s.start.t <= action.t][-1]
        if mine.stop is None:
            c.fail(f"{bot}: {action.instance} wrote no stop record")
            continue
        stops.append(mine.stop.t - action.t)
        nxt = _taken_after(by_bot, bot, action.instance, mine.stop.t)
        if nxt is None:
            c.fail(f"{bot} was not taken by another instance after the hand-back")
            continue
        gap = nxt.start.t - mine.stop.t
        gaps.append(gap)
        if gap > limit:
            c.fail(f"{bot} taken by {nxt.instance} {gap:.2f} s after the stop record, over {limit:.2f} s")
        twice = {f.frame for f in mine.frames} & {f.frame for f in nxt.frames}
        if twice:
            c.fail(f"{bot}: {len(twice)} frame(s) handled by both {action.instance} and {nxt.instance}")
    if exit_code is None:
        c.fail(f"{action.instance} did not exit after SIGTERM")
    elif exit_code != 0:
        c.fail(f"{action.instance} exited {exit_code} after SIGTERM")
    c.figures.update(bots=len(owned))
    if gaps:
        c.figures.update(max_gap_s=round(max(gaps), 3))
    if stops:
        c.figures.update(last_stop_after_sigterm_s=round(max(stops), 3))
    if exit_s is not None:
        c.figures.update(exit_s=round(exit_s, 3))
    return c


def check_found(by_bot: Mapping[str, list[Stint]], early: Iterable[str], group_start: float) -> Check:
    c = Check(
        "bots already connected are found",
        True,
        "bots that connected before any instance started are owned and handled from their first frame",
    )
    times = []
    for bot in early:
        rows = by_bot.get(bot, [])
        if not rows:
            c.fail(f"{bot} (connected before the group) was never owned")
            continue
        times.append(rows[0].start.t - group_start)
        first = [f.frame[1] for s in rows for f in s.frames]
        if first and min(first) != 0:
            c.fail(f"{bot}: handling began at seq {min(first)}, not 0")
    if times:
        c.figures["owned_after_first_instance_s"] = round(max(times), 3)
    return c


def check_no_frame_skipped(
    by_bot: Mapping[str, list[Stint]], published: Mapping[str, set[Frame]], allowed_repeats: int | None = None
) -> Check:
    c = Check(
        "no frame skipped",
        True,
        "every audio entry the gateway published was handled by some instance",
    )
    total = missing = repeats = 0
    for bot, frames in published.items():
        handled = Counter(f.frame for s in by_bot.get(bot, []) for f in s.frames)
        total += len(frames)
        lost = sorted(frames - set(handled))
        missing += len(lost)
        repeats += sum(n - 1 for n in handled.values() if n > 1)
        if lost:
            c.fail(f"{bot}: {len(lost)} frame(s) never handled, first {lost[0]}")
    c.figures.update(frames=total, missing=missing, handled_twice=repeats)
    return c


def check_commands(pings: Mapping[str, list[str]], pongs: Mapping[str, list[str]]) -> Check:
    c = Check(
        "every command delivered",
        True,
        "each ping a bot sent was answered with a sendmsg pong:ID that reached the bot",
    )
    sent = answered = dup = 0
    for bot, ids in pings.items():
        got = Counter(pongs.get(bot, []))
        sent += len(ids)
        answered += sum(1 for i in ids if got[i])
        dup += sum(n - 1 for n in got.values() if n > 1)
        lost = [i for i in ids if not got[i]]
        if lost:
            c.fail(f"{bot}: {len(lost)} ping(s) never answered, first {lost[0]}")
    c.figures.update(pings=sent, answered=answered, answered_twice=dup)
    return c


def check_session_end(
    by_bot: Mapping[str, list[Stint]], left: Mapping[str, float], leases_left: int
) -> Check:
    c = Check(
        "let go when the session ends",
        True,
        "after a bot leaves, its owner reads its streams dry and lets it go (stop: session_ended, "
        "lease released)",
    )
    worst = 0.0
    for bot, t in left.items():
        rows = by_bot.get(bot, [])
        last = rows[-1] if rows else None
        if last is None or last.stop is None or last.stop.fields.get("reason") != "session_ended":
            c.fail(f"{bot}: the last owner did not stop with reason session_ended")
            continue
        worst = max(worst, last.stop.t - t)
    if leases_left:
        c.fail(f"{leases_left} lease key(s) still held after every bot left")
    c.figures["stopped_after_leaving_s"] = round(worst, 3)
    return c
