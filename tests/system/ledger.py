"""The ledger of a day: every frame, command and bot message accounted for (pure).

    python -m tests.system.ledger RUN_DIR      (recompute from a finished run's files)

Inputs are what each party recorded by itself: the bots (what they sent, on
which connection, what they received), the auditor (what Redis held, read as
it was written), the workers (what they handled and wrote), the gateways'
``/metrics`` (what they counted as dropped, by reason), and the driver's fault
log. Every loss or repeat is classified by a rule below; what no rule explains
goes into ``problems``, with its evidence. The rules are the documented bounds
(docs/OPERATIONS.md, "What the ledger allows"):

* ``in_flight_at_close``: a frame the bot wrote at most ``CLOSE_IN_FLIGHT_S``
  before it saw the gateway close the connection (1012 at the end of a drain,
  4409, 1011, 1013): the gateway had stopped reading.
* ``gateway_crash``: a frame sent to a SIGKILLed replica at most ``CRASH_HELD_S``
  before the kill: what the process held (its 2 ms write batch, a round trip,
  socket buffers) dies with it.
* ``failover_unreplicated``: an entry a primary acknowledged and had not yet
  replicated when it was SIGKILLed (Redis replication is asynchronous): seen by
  the auditor and gone after the promotion, or a ``seq`` gap on a key of that
  primary within ``REPLICATION_LAG_S`` before the kill.
* repeats: a frame stored twice by a publisher retry after a Redis error; a
  command sent again on a *new* control connection (at least once); a worker
  handling again what an instance it took over from had not acknowledged.

Everything counted as dropped by a gateway is a loss too: it must fall inside
a fault window and be one the configured bounds allow (``buffer_full`` only if
Redis was away longer than the publish buffer holds).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import sys
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tests.system.plan import DayPlan

CLOSE_IN_FLIGHT_S = 0.25
CRASH_HELD_S = 0.5
REPLICATION_LAG_S = 1.0
#: Interrupts written within this of each other and received once were pending together.
COALESCE_S = 5.0
#: A frame's handling by a worker may lag this much outside fault windows.
HANDLING_LAG_OK_S = 2.0
#: Worker takeover beyond the lease TTL: claim interval (0.5 s) + a read block (1 s) + margin.
TAKEOVER_OVER_TTL_S = 3.0
#: How long after a fault's start its effects may last and still be explained by it.
FAULT_BOUND_S = {
    "worker_kill": 8.0,  # at least; with the plan's lease TTL: TTL + 6 s (Ledger.fault_bound)
    "worker_join": 5.0,
    "gateway_kill": 8.0,
    "redis_primary_kill": 15.0,
    "redis_rejoin": 8.0,
    "slot_migration": 8.0,
    "rolling_restart": 40.0,
    "burst_join": 10.0,
    "worker_sigterm": 8.0,
}
#: How long each fault may take to heal, by what the design promises: a bot reconnects
#: within its backoff plus the Service's probe period; a promoted replica takes the
#: node timeout (1 s) plus an election; bots whose keys are elsewhere must not stop.
HEAL_BOUNDS_S: dict[tuple[str, ...], float] = {
    ("gateway_kill", "reconnect_s", "max"): 3.0,
    ("gateway_kill", "first_frame_stored_again_s", "max"): 3.0,
    ("redis_primary_kill", "promoted_after_s"): 10.0,
    ("redis_primary_kill", "first_frame_stored_after_kill_s", "bots_on_dead_primary", "max"): 10.0,
    ("redis_primary_kill", "first_frame_stored_after_kill_s", "bots_elsewhere", "max"): 1.0,
    ("redis_primary_kill", "all_replicas_ready_again_s"): 15.0,
    ("redis_rejoin", "rejoined_as_replica_s"): 15.0,
    ("rolling_restart", "audio_socket_gap_s", "max"): 3.0,
    ("burst_join", "join_to_first_frame_stored_s", "max"): 5.0,
}
#: Bounds that follow the plan's lease TTL: ``TAKEOVER_OVER_TTL_S`` past it.
TAKEOVER_BOUNDS: tuple[tuple[str, ...], ...] = (
    ("worker_kill", "handled_by_another_after_s", "max"),
    ("worker_sigterm", "handled_by_another_after_s", "max"),
)
AUDIO_DROP_REASONS = ("buffer_full", "redis_error", "rate_limited", "overload", "bot_budget", "too_large")


def pct(values: list[float], q: float) -> float | None:
    return round(float(np.percentile(values, q)), 4) if values else None


def summary(values: list[float]) -> dict[str, Any]:
    return {
        "n": len(values),
        "p50": pct(values, 50),
        "p99": pct(values, 99),
        "max": round(max(values), 4) if values else None,
    }


@dataclass
class DayData:
    """Everything recorded during one day (see ``day.py`` for how it is saved)."""

    plan: DayPlan
    t0: float
    bots: dict[str, dict[str, Any]]
    audit_frames: dict[str, dict[str, list[Any]]]  # bot -> columns idx, ms, conn, seq, spk
    audit_events: dict[str, list[dict[str, str]]]
    audit_lost: dict[str, list[int]]  # bot -> frame idx seen then gone after a failover
    audit_events_lost: dict[str, list[str]]  # bot -> event entry ids gone after a failover
    workers: dict[str, dict[str, Any]]  # instance -> process facts
    worker_lines: dict[str, list[list[str]]]  # instance -> log lines split
    replicas: dict[str, dict[str, Any]]
    faults: list[dict[str, Any]]
    command_exists: dict[str, bool] = field(default_factory=dict)  # entry id -> still in its stream
    endpoint_log: list[tuple[float, str, str]] = field(default_factory=list)  # (t, list|unlist, replica)
    start_failures: list[dict[str, Any]] = field(default_factory=list)  # replicas that died starting
    settings: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def load(cls, run_dir: Path) -> DayData:
        raw = json.loads((run_dir / "raw.json").read_text())
        bots: dict[str, dict[str, Any]] = {}
        for path in sorted(run_dir.glob("bots-*.json")):
            if path.name.endswith(".config.json"):
                continue
            for record in json.loads(path.read_text()):
                bots[record["bot_id"]] = record
        lines: dict[str, list[list[str]]] = {}
        for path in sorted(run_dir.glob("w*.log")):
            lines[path.stem] = [line.split() for line in path.read_text().splitlines() if line.strip()]
        return cls(
            plan=DayPlan.from_json(raw["plan"]),
            t0=raw["t0"],
            bots=bots,
            audit_frames=raw["audit_frames"],
            audit_events=raw["audit_events"],
            audit_lost=raw["audit_lost"],
            audit_events_lost=raw.get("audit_events_lost", {}),
            workers=raw["workers"],
            worker_lines=lines,
            replicas=raw["replicas"],
            faults=raw["faults"],
            command_exists=raw.get("command_exists", {}),
            endpoint_log=[tuple(e) for e in raw.get("endpoint_log", [])],
            start_failures=raw.get("start_failures", []),
            settings=raw.get("settings", {}),
        )


class Ledger:
    """Builds the report (``self.report``) and the list of ``problems``."""

    def __init__(self, data: DayData) -> None:
        self.d = data
        self.problems: list[dict[str, Any]] = []
        self.report: dict[str, Any] = {}
        self.fault = {f["name"]: f for f in data.faults}

    # -- helpers -------------------------------------------------------------------

    def fault_bound(self, name: str) -> float:
        """How long after a fault its effects may last; a worker's death lasts its leases."""
        bound = FAULT_BOUND_S.get(name, 8.0)
        if name in ("worker_kill", "worker_sigterm"):
            bound = max(bound, self.d.plan.lease_ttl_s + 6.0)
        return bound

    def rel(self, t: float) -> float:
        return round(t - self.d.t0, 3)

    def phase(self, t: float) -> str:
        return self.d.plan.phase_of(t - self.d.t0)

    def in_fault(self, t: float, *names: str) -> str | None:
        """The latest fault (among ``names``, default all) whose window holds ``t``."""
        found = None
        for f in sorted(self.d.faults, key=lambda f: f["at"]):
            if names and f["name"] not in names:
                continue
            start = f["at"]
            end = max(f.get("done") or start, start) + self.fault_bound(f["name"])
            if start - 0.5 <= t <= end:
                found = str(f["name"])
        return found

    def problem(self, what: str, **evidence: Any) -> None:
        self.problems.append({"what": what, **evidence})

    def replica_drops(self, rid: str) -> dict[str, float]:
        scrapes = self.d.replicas[rid]["scrapes"]
        last = scrapes[-1][1] if scrapes else {}
        out: dict[str, float] = {}
        for key, value in last.items():
            if key.startswith("meetstream_gateway_frames_dropped_total{"):
                out[key.split("reason=", 1)[1].rstrip("}")] = value
        return out

    def counter(self, rid: str, key: str) -> float:
        scrapes = self.d.replicas[rid]["scrapes"]
        return scrapes[-1][1].get(key, 0.0) if scrapes else 0.0

    # -- the whole ledger --------------------------------------------------------

    def build(self) -> Ledger:
        self.report["run"] = {
            "bots": self.d.plan.bots,
            "meetings": len(self.d.plan.meetings),
            "seconds": self.d.plan.seconds,
            "t0": self.d.t0,
            "settings": self.d.settings,
        }
        self.report["faults"] = [
            {k: (self.rel(v) if k in ("at", "done") and isinstance(v, float) else v) for k, v in f.items()}
            for f in self.d.faults
        ]
        self._frames()
        self._chats()
        self._commands()
        self._workers()
        self._gateways()
        self._healing()
        self._start_failures()
        self._alerts()
        self._harness()
        self.report["problems"] = self.problems
        return self

    # -- frames --------------------------------------------------------------------

    def _frames(self) -> None:
        totals: Counter[str] = Counter()
        per_bot: dict[str, dict[str, int]] = {}
        latency: dict[str, list[float]] = defaultdict(list)
        gap_by_replica: Counter[str] = Counter()
        explained: Counter[str] = Counter()
        unexplained: list[dict[str, Any]] = []
        duplicates: Counter[str] = Counter()
        unsent_by_phase: Counter[str] = Counter()
        sent_by_replica: Counter[str] = Counter()
        stored_by_replica: Counter[str] = Counter()
        self.stored_idx: dict[str, set[int]] = {}
        for bot_id, rec in self.d.bots.items():
            links = {link["n"]: link for link in rec["links"]}
            f_t, f_link = rec["frame_t"], rec["frame_link"]
            cols = self.d.audit_frames.get(bot_id, {"idx": [], "ms": [], "conn": [], "seq": [], "spk": []})
            lost_fo = set(self.d.audit_lost.get(bot_id, []))
            by_idx: dict[int, list[int]] = defaultdict(list)  # idx -> rows in the audit columns
            for row, idx in enumerate(cols["idx"]):
                by_idx[idx].append(row)
            stored = {i for i in by_idx if i not in lost_fo and 0 <= i < len(f_t)}
            self.stored_idx[bot_id] = stored
            counts: Counter[str] = Counter()
            counts["captured"] = len(f_t)
            # Order: a connection's frames must be in its stream in the order it sent them
            # (PROTOCOL.md); the auditor's rows are in stream order.
            top: dict[str, int] = {}
            late: dict[str, list[tuple[int, int, int]]] = defaultdict(list)  # conn -> (seq, after, ms)
            for row, (conn, seq) in enumerate(zip(cols["conn"], cols["seq"], strict=True)):
                if seq < top.get(conn, -1) and len(by_idx[cols["idx"][row]]) == 1:
                    late[conn].append((seq, top[conn], cols["ms"][row]))
                top[conn] = max(top.get(conn, -1), seq)
            for conn, overtaken in late.items():
                counts["stored_out_of_order"] += len(overtaken)
                self.problem(
                    "frames stored after frames the bot sent after them",
                    bot=bot_id,
                    conn=conn,
                    frames=len(overtaken),
                    seqs=f"{overtaken[0][0]}..{overtaken[-1][0]} after {overtaken[0][1]}",
                    stored_at_s=self.rel(overtaken[0][2] / 1000),
                    fault=self.in_fault(overtaken[0][2] / 1000),
                )
            for idx, rows in by_idx.items():
                if len(rows) > 1:
                    t_store = cols["ms"][rows[1]] / 1000
                    why = self.in_fault(t_store, "redis_primary_kill", "slot_migration", "redis_rejoin")
                    duplicates["explained" if why else "unexplained"] += len(rows) - 1
                    counts["duplicates"] += len(rows) - 1
                    if not why:
                        self.problem(
                            "frame stored twice outside a Redis fault",
                            bot=bot_id,
                            idx=idx,
                            at_s=self.rel(t_store),
                        )
            # Sent frames, link by link, in send order.
            on_link: dict[int, list[int]] = defaultdict(list)
            for idx, link_n in enumerate(f_link):
                if link_n < 0:
                    counts["not_sent"] += 1
                    unsent_by_phase[self.phase(f_t[idx])] += 1
                    continue
                counts["sent"] += 1
                on_link[link_n].append(idx)
                replica = links[link_n]["replica"]
                sent_by_replica[replica] += 1
                if idx in stored:
                    counts["stored"] += 1
                    stored_by_replica[replica] += 1
                    row = by_idx[idx][0]
                    latency[self.phase(f_t[idx])].append(cols["ms"][row] / 1000 - f_t[idx])
            for link_n, idxs in on_link.items():
                link = links[link_n]
                for cls_, idx in self._classify_link(bot_id, link, idxs, stored, by_idx, cols, lost_fo):
                    counts[cls_] += 1
                    if cls_ == "gateway_dropped":
                        gap_by_replica[link["replica"]] += 1
                    elif cls_.startswith("unexplained"):
                        unexplained.append(
                            {
                                "bot": bot_id,
                                "idx": idx,
                                "sent_at_s": self.rel(f_t[idx]),
                                "phase": self.phase(f_t[idx]),
                                "replica": link["replica"],
                                "link": link_n,
                                "why": cls_,
                                "link_closed_at_s": self.rel(link["down"]) if link["down"] else None,
                                "close_code": link["code"],
                            }
                        )
                    else:
                        explained[cls_] += 1
            per_bot[bot_id] = dict(counts)
            totals.update(counts)
        # Gaps in seq are frames a gateway took and dropped: its counters must say so.
        for rid in self.d.replicas:
            counted = sum(v for k, v in self.replica_drops(rid).items() if k in AUDIO_DROP_REASONS)
            if gap_by_replica[rid] > counted:
                self.problem(
                    "frames missing inside a connection's seq range and not counted as dropped",
                    replica=rid,
                    missing_in_gaps=gap_by_replica[rid],
                    counted_dropped=counted,
                )
        self._check_counted_drops()
        if unexplained:
            by_key = Counter((u["replica"], u["phase"], u["why"]) for u in unexplained)
            for (replica, phase, why), n in sorted(by_key.items()):
                example = next(
                    u for u in unexplained if (u["replica"], u["phase"], u["why"]) == (replica, phase, why)
                )
                bots = sorted(
                    {
                        u["bot"]
                        for u in unexplained
                        if (u["replica"], u["phase"], u["why"]) == (replica, phase, why)
                    }
                )
                self.problem(
                    "frames sent and not in Redis, not explained by any bound",
                    replica=replica,
                    phase=phase,
                    why=why,
                    frames=n,
                    bots=len(bots),
                    example=example,
                )
        self.report["frames"] = {
            "total": dict(totals),
            "explained_losses": dict(explained),
            "unexplained_losses": len(unexplained),
            "stored_out_of_order": totals.get("stored_out_of_order", 0),
            "duplicates": dict(duplicates),
            "not_sent_by_phase": dict(unsent_by_phase),
            "sent_by_replica": dict(sent_by_replica),
            "stored_by_replica": dict(stored_by_replica),
            "missing_in_seq_gaps_by_replica": dict(gap_by_replica),
            "arrival_latency_s_by_phase": {p: summary(v) for p, v in latency.items()},
            "per_bot": per_bot,
            "unexplained_examples": unexplained[:50],
        }
        self.latency_frames = latency

    def _classify_link(
        self,
        bot_id: str,
        link: dict[str, Any],
        idxs: list[int],
        stored: set[int],
        by_idx: dict[int, list[int]],
        cols: dict[str, list[Any]],
        lost_fo: set[int],
    ) -> list[tuple[str, int]]:
        """Why each frame sent on this connection and not stored is missing."""
        rec = self.d.bots[bot_id]
        f_t = rec["frame_t"]
        out: list[tuple[str, int]] = []
        positions = [(p, idx) for p, idx in enumerate(idxs) if idx in stored]
        seq_of = {idx: cols["seq"][by_idx[idx][0]] for _, idx in positions}
        conns = {cols["conn"][by_idx[idx][0]] for _, idx in positions}
        if len(conns) > 1:
            self.problem(
                "one bot connection's frames stored under several conn ids", bot=bot_id, link=link["n"]
            )
        stored_pos = [p for p, _ in positions]
        replica = self.d.replicas.get(link["replica"], {})
        killed_at = replica.get("terminated_at") if replica.get("state") == "killed" else None
        j = 0
        for p, idx in enumerate(idxs):
            if idx in stored:
                continue
            t = f_t[idx]
            if idx in lost_fo:
                out.append(("failover_unreplicated", idx))
                continue
            while j < len(stored_pos) and stored_pos[j] < p:
                j += 1
            nxt = stored_pos[j] if j < len(stored_pos) else None
            prv = stored_pos[j - 1] if j > 0 else None
            if nxt is not None:
                seq_b = seq_of[idxs[nxt]]
                seq_a, p_a = (seq_of[idxs[prv]], prv) if prv is not None else (-1, -1)
                if seq_b - seq_a == nxt - p_a:
                    kill = self.fault.get("redis_primary_kill")
                    if (
                        kill is not None
                        and kill["at"] - REPLICATION_LAG_S <= t <= kill["at"] + 0.2
                        and bot_id in kill.get("bots_on_victim", [])
                    ):
                        out.append(("failover_unreplicated", idx))
                    else:
                        out.append(("gateway_dropped", idx))
                else:
                    out.append(("unexplained_not_received_mid_connection", idx))
                continue
            # After the last frame stored from this connection.
            if killed_at is not None and killed_at - CRASH_HELD_S <= t <= killed_at + 0.1:
                out.append(("gateway_crash", idx))
            elif killed_at is not None and t < killed_at:
                out.append(("unexplained_held_by_crashed_gateway", idx))
            elif link["down"] is not None and not link["by_bot"] and t >= link["down"] - CLOSE_IN_FLIGHT_S:
                out.append((f"in_flight_at_close_{link['code']}", idx))
            elif link["by_bot"]:
                out.append(("unexplained_lost_before_bot_left", idx))
            else:
                out.append(("unexplained_tail_not_stored", idx))
        return out

    def _check_counted_drops(self) -> None:
        """Every drop a gateway counted must fall in a fault window, for a reason it allows."""
        per: dict[str, dict[str, Any]] = {}
        for rid, rep in self.d.replicas.items():
            prev: dict[str, float] = {}
            rows: list[dict[str, Any]] = []
            for t, sample in rep["scrapes"]:
                for key, value in sample.items():
                    if not key.startswith("meetstream_gateway_frames_dropped_total{"):
                        continue
                    reason = key.split("reason=", 1)[1].rstrip("}")
                    delta = value - prev.get(reason, 0.0)
                    prev[reason] = value
                    if delta > 0:
                        fault = self.in_fault(t)
                        rows.append({"at_s": self.rel(t), "reason": reason, "frames": delta, "fault": fault})
                        allowed = reason in ("buffer_full", "redis_error") and fault in (
                            "redis_primary_kill",
                            "slot_migration",
                        )
                        if reason == "buffer_full" and allowed:
                            allowed = self._buffer_could_fill(rid)
                        if not allowed:
                            self.problem(
                                "a gateway dropped frames (counted) that no bound allows here",
                                replica=rid,
                                reason=reason,
                                frames=delta,
                                at_s=self.rel(t),
                                fault=fault,
                            )
            per[rid] = {"final": self.replica_drops(rid), "increments": rows}
        self.report["gateway_drops"] = per

    def _buffer_could_fill(self, rid: str) -> bool:
        """Whether Redis was away from this replica long enough to fill its publish buffer."""
        buffer_bytes = float(self.d.settings.get("publish_buffer_bytes", 64 << 20))
        rep = self.d.replicas[rid]
        down = [t for t, s in rep["scrapes"] if s.get("meetstream_gateway_redis_up", 1.0) == 0.0]
        if not down:
            return False
        outage_s = max(down) - min(down)
        # A replica takes about a third of the bots; each sends ~55 frames/s of ~2 KB.
        rate = len(self.d.plan.meetings) / 3 * 55 * 2000
        return bool(outage_s * rate >= buffer_bytes * 0.9)

    # -- bot chat messages (bot -> worker) -------------------------------------------

    def _chats(self) -> None:
        handled: dict[str, set[str]] = defaultdict(set)
        for lines in self.d.worker_lines.values():
            for f in lines:
                if f[0] == "M":
                    handled[f[2]].add(f[3])
        totals: Counter[str] = Counter()
        for bot_id, rec in self.d.bots.items():
            in_redis = set()
            for ev in self.d.audit_events.get(bot_id, []):
                if ev.get("type") == "message" and ev.get("data"):
                    try:
                        data = json.loads(ev["data"])
                    except ValueError:
                        continue
                    if isinstance(data, dict) and "id" in data:
                        in_redis.add(data["id"])
            links = {link["n"]: link for link in rec["links"]}
            unhandled: list[tuple[float, str]] = []
            for chat_id, t, link_n in rec["chats"]:
                if link_n < 0:
                    totals["not_sent"] += 1
                    continue
                totals["sent"] += 1
                if chat_id in in_redis:
                    totals["in_redis"] += 1
                    if chat_id in handled[bot_id]:
                        totals["handled_by_worker"] += 1
                    else:
                        totals["not_handled"] += 1
                        unhandled.append((t, chat_id))
                    continue
                link = links[link_n]
                why = self._lost_message_reason(link, t)
                totals[why] += 1
                if why.startswith("unexplained"):
                    self.problem(
                        "bot message sent and not in Redis",
                        bot=bot_id,
                        chat=chat_id,
                        at_s=self.rel(t),
                        replica=link["replica"],
                        why=why,
                    )
            if unhandled:
                self.problem(
                    "bot messages in Redis never handled by a worker",
                    bot=bot_id,
                    messages=len(unhandled),
                    first_at_s=self.rel(unhandled[0][0]),
                    first=unhandled[0][1],
                )
        self.report["bot_messages"] = dict(totals)

    def _lost_message_reason(self, link: dict[str, Any], t: float) -> str:
        replica = self.d.replicas.get(link["replica"], {})
        if replica.get("state") == "killed":
            killed = replica["terminated_at"]
            if killed - CRASH_HELD_S <= t <= killed + 0.1:
                return "gateway_crash"
        if link["down"] is not None and not link["by_bot"] and t >= link["down"] - CLOSE_IN_FLIGHT_S:
            return f"in_flight_at_close_{link['code']}"
        kill = self.fault.get("redis_primary_kill")
        if kill is not None and kill["at"] - REPLICATION_LAG_S <= t <= kill["at"] + 0.2:
            return "failover_unreplicated"
        return "unexplained_lost"

    # -- commands (worker -> bot) ------------------------------------------------------

    def _commands(self) -> None:
        written: list[dict[str, Any]] = []
        failed_writes: list[dict[str, Any]] = []
        for instance, lines in self.d.worker_lines.items():
            for f in lines:
                if f[0] == "C":
                    written.append(
                        {
                            "t": float(f[1]),
                            "bot": f[2],
                            "kind": f[3],
                            "tag": f[4],
                            "entry": f[5],
                            "by": instance,
                        }
                    )
                elif f[0] == "X":
                    failed_writes.append(
                        {"t": float(f[1]), "bot": f[2], "kind": f[3], "tag": f[4], "by": instance}
                    )
        rejected: dict[str, str] = {}
        self.cut_before_playing: set[str] = set()
        for events in self.d.audit_events.values():
            for ev in events:
                if ev.get("type") == "command_rejected":
                    rejected[ev.get("entry_id", "")] = ev.get("reason", "")
                elif (
                    ev.get("type") == "playback_interrupted"
                    and ev.get("reason") == "interrupt"
                    and ev.get("sent_ms") == "0"
                ):
                    # An interrupt drops every utterance the gateway holds for the bot
                    # (PROTOCOL.md, Delivery): those behind the one playing never start.
                    self.cut_before_playing.add(ev.get("entry_id", ""))
        totals: Counter[str] = Counter()
        by_kind: dict[str, Counter[str]] = defaultdict(Counter)
        latency: dict[str, list[float]] = defaultdict(list)
        interrupt_latency: dict[str, list[float]] = defaultdict(list)
        barge_reaction: list[float] = []
        undelivered: list[dict[str, Any]] = []
        utterances: Counter[str] = Counter()
        for bot_id, rec in self.d.bots.items():
            mine = sorted((w for w in written if w["bot"] == bot_id), key=lambda w: w["entry"])
            got_msg: dict[tuple[str, str], list[tuple[float, int]]] = defaultdict(list)
            got_audio: dict[str, dict[int, list[tuple[float, int]]]] = defaultdict(lambda: defaultdict(list))
            got_int: list[tuple[float, int]] = []
            for t, kind, tag, chunk, link in rec["received"]:
                if kind == "audio":
                    got_audio[tag][chunk].append((t, link))
                elif kind == "interrupt":
                    got_int.append((t, link))
                else:
                    got_msg[(kind, tag)].append((t, link))
            ints = [w for w in mine if w["kind"] == "int"]
            matched = self._match_tagged(bot_id, mine, got_msg, totals, by_kind)
            for w in mine:
                ms = int(w["entry"].partition("-")[0])
                t_xadd = ms / 1000
                kind = w["kind"]
                by_kind[kind]["written"] += 1
                totals["written"] += 1
                if w["entry"] in rejected:
                    by_kind[kind][f"rejected_{rejected[w['entry']]}"] += 1
                    totals[f"rejected_{rejected[w['entry']]}"] += 1
                    continue
                if kind == "int":
                    continue  # matched by order below
                if kind == "say":
                    chunks = got_audio.get(w["tag"], {})
                    receipts = chunks.get(0, [])
                    expected = math.ceil(self.d.plan.utterance_s * 10)
                    if receipts:
                        utterances["complete" if len(chunks) >= expected else "cut"] += 1
                        replays = max(len(v) for v in chunks.values()) - 1
                        if replays:
                            utterances["replayed"] += 1
                            new_link = len({link for v in chunks.values() for _, link in v}) > 1
                            totals[
                                "repeats_on_new_connection" if new_link else "repeats_same_connection"
                            ] += 1
                            if not new_link:
                                self.problem(
                                    "utterance replayed on the same connection", bot=bot_id, tag=w["tag"]
                                )
                else:
                    got = matched.get(w["entry"])
                    receipts = [got] if got is not None else []
                if receipts:
                    by_kind[kind]["delivered"] += 1
                    totals["delivered"] += 1
                    latency[self.phase(t_xadd)].append(receipts[0][0] - t_xadd)
                    continue
                undelivered.append({**w, "t_xadd": t_xadd})
            # Interrupts carry no tag. Each one received delivers the oldest interrupt written
            # before it and not delivered yet; one written and left over was delivered with a
            # later one if that came soon after it (interrupts pending together are sent once,
            # PLAYBACK.md); one received with nothing left to deliver is a repeat.
            waiting = sorted(
                (int(w["entry"].partition("-")[0]) / 1000, w) for w in ints if w["entry"] not in rejected
            )
            receipts_int = sorted(got_int)
            last_link = None
            for t_got, link in receipts_int:
                due = [(t, w) for t, w in waiting if t <= t_got + 0.001]
                if not due:
                    if link != last_link:
                        totals["repeats_on_new_connection"] += 1
                    else:
                        totals["repeats_same_connection"] += 1
                        self.problem(
                            "interrupt delivered twice on one connection", bot=bot_id, at_s=self.rel(t_got)
                        )
                    continue
                last_link = link
                t_xadd, w = due[0]
                waiting.remove(due[0])
                by_kind["int"]["delivered"] += 1
                totals["delivered"] += 1
                interrupt_latency[self.phase(t_xadd)].append(t_got - t_xadd)
            for t_xadd, w in list(waiting):
                later = [t for t, _ in receipts_int if 0 <= t - t_xadd <= COALESCE_S]
                if later:
                    waiting.remove((t_xadd, w))
                    by_kind["int"]["delivered"] += 1
                    totals["delivered"] += 1
                    totals["interrupts_coalesced"] += 1
                    interrupt_latency[self.phase(t_xadd)].append(later[0] - t_xadd)
            undelivered += [{**w, "t_xadd": t} for t, w in waiting]
            for t_barge, _number in rec["barges"]:
                after = [t for t, _ in got_int if t >= t_barge]
                if after and after[0] - t_barge < 5:
                    barge_reaction.append(after[0] - t_barge)
        for w in undelivered:
            self._classify_undelivered(w, totals)
        self.undelivered = undelivered
        self.report["commands"] = {
            "total": dict(totals),
            "by_kind": {k: dict(v) for k, v in by_kind.items()},
            "writes_failed": len(failed_writes),
            "utterances": dict(utterances),
            "delivery_latency_s_by_phase": {p: summary(v) for p, v in latency.items()},
            "interrupt_latency_s_by_phase": {p: summary(v) for p, v in interrupt_latency.items()},
            "barge_in_to_interrupt_s": summary(barge_reaction),
            "undelivered": [
                {k: (self.rel(v) if k in ("t", "t_xadd") else v) for k, v in u.items()}
                for u in undelivered[:100]
            ],
        }
        self.latency_commands = latency
        self.latency_interrupts = interrupt_latency

    def _match_tagged(
        self,
        bot_id: str,
        mine: list[dict[str, Any]],
        got_msg: dict[tuple[str, str], list[tuple[float, int]]],
        totals: Counter[str],
        by_kind: dict[str, Counter[str]],
    ) -> dict[str, tuple[float, int]]:
        """Match each tagged command written (greet, ans, barge) with the first receipt of
        its tag after its XADD; classify the receipts left over."""
        writes: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
        for w in mine:
            if w["kind"] in ("greet", "ans", "barge"):
                writes[(w["kind"], w["tag"])].append(w)
        matched: dict[str, tuple[float, int]] = {}
        killed = [
            w["signalled_at"]
            for w in self.d.workers.values()
            if w.get("state") == "killed" and w.get("signalled_at")
        ]
        for key in set(writes) | {k for k in got_msg if k[0] in ("greet", "ans", "barge")}:
            receipts = sorted(got_msg.get(key, []))
            used = [False] * len(receipts)
            ws = sorted(writes.get(key, []), key=lambda w: w["entry"])
            if len(ws) > 1:
                # A new owner handled the question again (WORKERS.md, what can repeat).
                totals["written_twice_by_workers"] += len(ws) - 1
            for w in ws:
                t_xadd = int(w["entry"].partition("-")[0]) / 1000
                for i, (t, _link) in enumerate(receipts):
                    if not used[i] and t >= t_xadd - 0.005:
                        used[i] = True
                        matched[w["entry"]] = receipts[i]
                        break
            first_write = min((int(w["entry"].partition("-")[0]) / 1000 for w in ws), default=float("inf"))
            links_matched = {matched[w["entry"]][1] for w in ws if w["entry"] in matched}
            for i, (t, link) in enumerate(receipts):
                if used[i]:
                    continue
                if t < first_write - 0.005:
                    # Written by an instance killed between its XADD and its log line.
                    if any(t - 5.0 <= k <= t + 0.5 for k in killed):
                        totals["delivered_written_by_a_killed_worker"] += 1
                    else:
                        self.problem(
                            "bot received a command nobody wrote", bot=bot_id, kind=key[0], tag=key[1]
                        )
                elif link not in links_matched:
                    totals["repeats_on_new_connection"] += 1
                    by_kind[key[0]]["repeats"] += 1
                else:
                    totals["repeats_same_connection"] += 1
                    by_kind[key[0]]["repeats"] += 1
                    self.problem(
                        "command delivered twice on one connection", bot=bot_id, kind=key[0], tag=key[1]
                    )
        return matched

    def _classify_undelivered(self, w: dict[str, Any], totals: Counter[str]) -> None:
        rec = self.d.bots.get(w["bot"], {})
        leave = rec.get("leave", 0.0)
        t = w["t_xadd"]
        w["phase"] = self.phase(t)
        # Was the bot's control channel up for a while, after the write and before it left?
        there = 0.0
        for link in rec.get("links", []):
            if link["channel"] == "control":
                end = min(link["down"] or leave, leave)
                there += max(0.0, end - max(link["up"], t))
        connected_after = there > 0.5
        kill = self.fault.get("redis_primary_kill")
        exists = self.d.command_exists.get(w["entry"])
        audio_at = [r[0] for r in rec.get("received", []) if r[1] == "audio" and r[0] >= t]
        if w["kind"] == "say" and w["entry"] in self.cut_before_playing:
            w["why"] = "dropped_by_interrupt"
        elif t >= leave - 1.0 or not connected_after:
            w["why"] = "bot_left"
        elif w["kind"] == "say" and audio_at and max(audio_at) >= leave - 0.5:
            # Queued behind other utterances that were still playing when the meeting ended.
            w["why"] = "bot_left_while_playing"
        elif exists is False and kill is not None and kill["at"] - REPLICATION_LAG_S <= t <= kill["at"] + 0.2:
            w["why"] = "failover_unreplicated"
        else:
            w["why"] = "unexplained"
            self.problem(
                "command written and never delivered",
                bot=w["bot"],
                kind=w["kind"],
                entry=w["entry"],
                written_at_s=self.rel(t),
                phase=w["phase"],
                still_in_stream=exists,
                bot_left_at_s=self.rel(leave),
            )
        totals[f"undelivered_{w['why']}"] += 1

    # -- workers --------------------------------------------------------------------------

    def _workers(self) -> None:
        # A stint: from on_bot_start to on_bot_stop. Handling means the records in between
        # (frames, events, commands): that is what must never happen in two instances at once.
        stints: dict[str, list[dict[str, Any]]] = defaultdict(list)
        handled: dict[str, Counter[int]] = defaultdict(Counter)
        lag: dict[str, list[float]] = defaultdict(list)
        stats: Counter[str] = Counter()
        for instance, lines in self.d.worker_lines.items():
            current: dict[str, dict[str, Any]] = {}
            for f in lines:
                kind, t, bot = f[0], float(f[1]), f[2]
                if kind == "S":
                    current[bot] = {
                        "instance": instance,
                        "start": t,
                        "first": None,
                        "last": None,
                        "stop": None,
                        "acts": [],  # (t, kind) of every record while it owned the bot
                    }
                    stints[bot].append(current[bot])
                    continue
                stint = current.get(bot)
                if kind == "E":
                    if stint is not None:
                        stint["stop"], stint["reason"] = t, f[3]
                        del current[bot]
                    continue
                if stint is None:  # a record outside any stint: handled without owning
                    stats["records_outside_a_stint"] += 1
                    self.problem(
                        "a worker handled a bot it had not started",
                        instance=instance,
                        bot=bot,
                        at_s=self.rel(t),
                    )
                elif kind != "X":  # a refused or failed write did not act
                    stint["first"] = t if stint["first"] is None else stint["first"]
                    stint["last"] = t
                    stint["acts"].append((t, kind))
                if kind == "F":
                    idx = int(f[5])
                    handled[bot][idx] += 1
                    stored_at = int(f[7]) / 1000
                    lag[self.phase(stored_at)].append(t - stored_at)
                    stats["frames_handled"] += 1
        self.report_stints = {
            bot: [
                (
                    r["instance"],
                    self.rel(r["start"]),
                    self.rel(r["last"]) if r["last"] else None,
                    r.get("reason"),
                )
                for r in sorted(rows, key=lambda r: r["start"])
            ]
            for bot, rows in stints.items()
        }
        overlaps = []
        late_stops = []
        for bot, rows in stints.items():
            busy = sorted((r for r in rows if r["first"] is not None), key=lambda r: r["first"])
            for a, b in itertools.pairwise(busy):
                if a["instance"] != b["instance"] and b["first"] < a["last"]:
                    late = [kind for t, kind in a["acts"] if t > b["first"]]
                    if set(late) == {"C"}:
                        # Only writes completing: commands handed to Redis before the lease
                        # lapsed (say, to a node that died) land late; the gateway does not
                        # check leases (WORKERS.md, one owner at a time).
                        stats["commands_landed_after_lease_lapsed"] += len(late)
                        continue
                    overlaps.append(
                        {
                            "bot": bot,
                            "first": a["instance"],
                            "second": b["instance"],
                            "overlap_s": round(a["last"] - b["first"], 3),
                            "at_s": self.rel(b["first"]),
                        }
                    )
                if a["instance"] != b["instance"] and a["stop"] is not None and a["stop"] > b["first"]:
                    # Not a double handling (nothing was dispatched), but on_bot_stop ran late:
                    # what a worker closes there stays open while the next owner works.
                    late_stops.append(
                        {
                            "bot": bot,
                            "instance": a["instance"],
                            "reason": a.get("reason"),
                            "stop_after_next_owner_s": round(a["stop"] - b["first"], 3),
                            "at_s": self.rel(b["first"]),
                        }
                    )
        for o in overlaps:
            self.problem("two worker instances handled one bot at once", **o)
        # Every frame in Redis was handled; repeats only around takeovers.
        not_handled = 0
        repeats = 0
        for bot, stored in self.stored_idx.items():
            counts = handled.get(bot, Counter())
            missing = [i for i in stored if counts[i] == 0]
            not_handled += len(missing)
            if missing:
                first = min(missing)
                self.problem(
                    "frames in Redis never handled by a worker",
                    bot=bot,
                    frames=len(missing),
                    first_idx=first,
                    first_sent_at_s=self.rel(self.d.bots[bot]["frame_t"][first]),
                    last_stint=self.report_stints[bot][-1] if self.report_stints.get(bot) else None,
                )
            repeats += sum(c - 1 for c in counts.values() if c > 1)
        # Coverage: the longest stretch a bot's frames waited for a worker, per phase.
        for phase, values in lag.items():
            worst = max(values) if values else 0.0
            if worst > HANDLING_LAG_OK_S and phase in ("steady", "wind_down"):
                self.problem(
                    "a bot waited for a worker outside any fault", phase=phase, max_lag_s=round(worst, 3)
                )
        self.report["workers"] = {
            "instances": self.d.workers,
            "ownership_overlaps": overlaps,
            "on_bot_stop_after_next_owner_started": late_stops,
            "frames_in_redis_not_handled": not_handled,
            "frames_handled_twice": repeats,
            "handling_lag_s_by_phase": {p: summary(v) for p, v in lag.items()},
            "stats": dict(stats),
            "stints": self.report_stints,
        }

    # -- gateways --------------------------------------------------------------------------

    def _gateways(self) -> None:
        out = {}
        sent = self.report["frames"]["sent_by_replica"]
        stored = self.report["frames"]["stored_by_replica"]
        for rid, rep in self.d.replicas.items():
            last_t = rep["scrapes"][-1][0] if rep["scrapes"] else None
            received = self.counter(rid, "meetstream_gateway_audio_frames_received_total")
            published = self.counter(rid, "meetstream_gateway_stream_entries_published_total{kind=audio}")
            row = {
                "state": rep["state"],
                "started_s": self.rel(rep["started"]),
                "ready_s": self.rel(rep["ready_at"]) if rep.get("ready_at") else None,
                "terminated_s": self.rel(rep["terminated_at"]) if rep.get("terminated_at") else None,
                "exit_code": rep.get("exit_code"),
                "last_scrape_s": self.rel(last_t) if last_t else None,
                "frames_sent_to_it": sent.get(rid, 0),
                "frames_received": received,
                "frames_published": published,
                "frames_stored_from_it": stored.get(rid, 0),
                "dropped": self.replica_drops(rid),
                "commands_delivered": sum(
                    v
                    for k, v in (rep["scrapes"][-1][1] if rep["scrapes"] else {}).items()
                    if k.startswith("meetstream_gateway_commands_delivered_total")
                ),
            }
            if rep["state"] == "killed" and last_t is not None:
                # Its counters died with it: what it was sent after its last scrape is unknown to them.
                after = 0
                for rec in self.d.bots.values():
                    links = {link["n"]: link for link in rec["links"]}
                    for t, n in zip(rec["frame_t"], rec["frame_link"], strict=True):
                        if n >= 0 and links[n]["replica"] == rid and t > last_t:
                            after += 1
                row["frames_sent_after_last_scrape"] = after
            # Not-ready stretches while it served (a drain's 503 excluded), as its probes saw them.
            gone = rep.get("terminated_at") or float("inf")
            flaps, down_since = [], None
            for t, ok in rep["probes"]:
                if t >= gone or t < self.d.t0:
                    continue
                if not ok and down_since is None:
                    down_since = t
                elif ok and down_since is not None:
                    flaps.append((self.rel(down_since), round(t - down_since, 2), self.in_fault(down_since)))
                    down_since = None
            row["not_ready"] = flaps
            out[rid] = row
        self.report["gateways"] = out

    # -- healing --------------------------------------------------------------------------

    def _healing(self) -> None:
        heal: dict[str, Any] = {}
        stored_ms = {bot: sorted(self.d.audit_frames.get(bot, {}).get("ms", [])) for bot in self.d.bots}

        def first_stored_after(bot: str, t: float) -> float | None:
            for ms in stored_ms.get(bot, []):
                if ms / 1000 > t:
                    return float(ms / 1000)
            return None

        def alive(bot: str, t: float) -> bool:
            rec = self.d.bots[bot]
            return bool(rec["join"] <= t and rec["leave"] > t + 3.0)

        # Gateway SIGKILL: its bots reconnect elsewhere and are stored again.
        f = self.fault.get("gateway_kill")
        if f:
            victim = f.get("replica")
            reconnect, restored = [], []
            for bot, rec in self.d.bots.items():
                on_victim = [
                    link
                    for link in rec["links"]
                    if link["replica"] == victim
                    and link["up"] <= f["at"]
                    and (link["down"] or 1e18) >= f["at"]
                ]
                if not on_victim or not alive(bot, f["at"]):
                    continue
                for link in on_victim:
                    nxt = [
                        x["up"] for x in rec["links"] if x["channel"] == link["channel"] and x["up"] > f["at"]
                    ]
                    if nxt:
                        reconnect.append(min(nxt) - f["at"])
                if any(link["channel"] == "audio" for link in on_victim):
                    t = first_stored_after(bot, f["at"])
                    if t is not None:
                        restored.append(t - f["at"])
            heal["gateway_kill"] = {
                "victim": victim,
                "bots_affected": len(restored),
                "reconnect_s": summary(reconnect),
                "first_frame_stored_again_s": summary(restored),
                "replacement_ready_s": (f["replacement_ready"] - f["at"])
                if f.get("replacement_ready")
                else None,
            }
        f = self.fault.get("redis_primary_kill")
        if f:
            victims = set(f.get("bots_on_victim", []))
            on: list[float] = []
            off: list[float] = []
            never = []
            stall: list[float] = []
            for bot in self.d.bots:
                if not alive(bot, f["at"]):
                    continue
                t = first_stored_after(bot, f["at"] + 0.05)
                if t is None:
                    never.append(bot)
                    continue
                (on if bot in victims else off).append(t - f["at"])
                if bot not in victims:
                    stall.append(
                        self._worst_frame_delay(bot, f["at"], (f.get("promoted_at") or f["at"]) + 1.0)
                    )
            ready_back = self._all_ready_again(f["at"])
            heal["redis_primary_kill"] = {
                "victim_port": f.get("victim_port"),
                "promoted_after_s": (f["promoted_at"] - f["at"]) if f.get("promoted_at") else None,
                "first_frame_stored_after_kill_s": {
                    "bots_on_dead_primary": summary(on),
                    "bots_elsewhere": summary(off),
                },
                # Bots elsewhere are not held up by the dead node, but Redis Cluster itself
                # refuses every write (CLUSTERDOWN) from the moment the failure is agreed
                # until the promotion, when cluster-require-full-coverage is yes (default).
                "bots_elsewhere_worst_frame_delay_s": summary(stall),
                "bots_never_stored_again": len(never),
                "all_replicas_ready_again_s": ready_back,
                "frames_lost_unreplicated_seen_by_auditor": sum(len(v) for v in self.d.audit_lost.values()),
            }
            promoted = f.get("promoted_at")
            if stall and promoted is not None and max(stall) > promoted - f["at"] + 1.0:
                # Held only by Redis's own CLUSTERDOWN window, at most from kill to promotion.
                self.problem(
                    "bots whose keys were on live nodes were held up longer than the failover",
                    worst_s=max(stall),
                    promoted_after_s=round(promoted - f["at"], 3),
                )
            if never:
                self.problem(
                    "bots never stored a frame again after the Redis primary died",
                    bots=len(never),
                    example=sorted(never)[:5],
                )
        f = self.fault.get("redis_rejoin")
        if f:
            heal["redis_rejoin"] = {
                "rejoined_as_replica_s": (f["rejoined_at"] - f["at"]) if f.get("rejoined_at") else None,
                "role": f.get("role"),
            }
        f = self.fault.get("slot_migration")
        if f:
            heal["slot_migration"] = {
                "migrations": f.get("migrations"),
                "took_s": (f["done"] - f["at"]) if f.get("done") else None,
            }
        f = self.fault.get("rolling_restart")
        if f:
            gaps = []
            for rec in self.d.bots.values():
                audio = sorted((x for x in rec["links"] if x["channel"] == "audio"), key=lambda x: x["up"])
                for a, b in itertools.pairwise(audio):
                    if a["down"] and f["at"] <= a["down"] <= (f.get("done") or f["at"]) + 5:
                        gaps.append(b["up"] - a["down"])
            heal["rolling_restart"] = {
                "took_s": (f["done"] - f["at"]) if f.get("done") else None,
                "replaced": f.get("replaced"),
                "audio_socket_gap_s": summary(gaps),
            }
        for name in ("worker_kill", "worker_sigterm"):
            f = self.fault.get(name)
            if not f:
                continue
            moved = []
            for bot in f.get("bots_owned", []):
                if not alive(bot, f["at"]):
                    continue
                t_next = self._first_handled_after(bot, f["at"], exclude=f.get("instance"))
                if t_next is not None:
                    moved.append(t_next - f["at"])
            heal[name] = {
                "instance": f.get("instance"),
                "bots_moved": len(moved),
                "handled_by_another_after_s": summary(moved),
                "exit_code": f.get("exit_code"),
            }
        f = self.fault.get("worker_join")
        if f:
            first = self._first_record(f.get("instance"), "S")
            heal["worker_join"] = {"first_bot_taken_s": (first - f["at"]) if first else None}
        f = self.fault.get("burst_join")
        if f:
            ready = []
            for m in self.d.plan.meetings:
                if not m.burst:
                    continue
                joined = self.d.bots.get(m.bot_id, {}).get("join")
                t = first_stored_after(m.bot_id, joined) if joined is not None else None
                if joined is not None and t is not None:
                    ready.append(t - joined)
            heal["burst_join"] = {"bots": len(ready), "join_to_first_frame_stored_s": summary(ready)}
        self.report["healing"] = heal
        self._check_heal_bounds(heal)

    def _check_heal_bounds(self, heal: dict[str, Any]) -> None:
        """Each fault must heal within what its design promises (HEAL_BOUNDS_S; takeovers:
        the plan's lease TTL plus TAKEOVER_OVER_TTL_S)."""
        takeover_s = self.d.plan.lease_ttl_s + TAKEOVER_OVER_TTL_S
        bounds = {**HEAL_BOUNDS_S, **dict.fromkeys(TAKEOVER_BOUNDS, takeover_s)}
        for (fault, *path), bound in bounds.items():
            value: Any = heal.get(fault)
            for part in path:
                value = value.get(part) if isinstance(value, dict) else None
            if value is None:
                if fault in heal:
                    self.problem("a fault did not heal at all", fault=fault, measure="/".join(path))
                continue
            if value > bound:
                self.problem(
                    "a fault took longer to heal than its bound",
                    fault=fault,
                    measure="/".join(path),
                    seconds=value,
                    bound_s=bound,
                )

    def _worst_frame_delay(self, bot: str, start: float, end: float) -> float:
        """The longest a frame this bot sent in [start, end] took to be stored."""
        rec = self.d.bots[bot]
        cols = self.d.audit_frames.get(bot, {"idx": [], "ms": []})
        first: dict[int, int] = {}
        for idx, ms in zip(cols["idx"], cols["ms"], strict=True):
            first.setdefault(idx, ms)
        delays = [
            first[i] / 1000 - t for i, t in enumerate(rec["frame_t"]) if start <= t <= end and i in first
        ]
        return round(max(delays), 3) if delays else 0.0

    def _all_ready_again(self, since: float) -> float | None:
        """Seconds after ``since`` until every replica serving then answered /readyz 200
        again (0 if none stopped being ready); None if one never did before it went away."""
        worst = 0.0
        for rep in self.d.replicas.values():
            if rep["started"] > since or (rep.get("terminated_at") or float("inf")) < since:
                continue
            went_unready = None
            back = None
            gone = rep.get("terminated_at") or float("inf")
            for t, ok in rep["probes"]:
                if t < since:
                    continue
                if t >= gone:  # a drain's 503 is not the fault's
                    break
                if not ok and went_unready is None:
                    if t > since + FAULT_BOUND_S["redis_primary_kill"]:
                        break  # a later blip is another event's (a MOVED parks a write for ms)
                    went_unready = t
                elif ok and went_unready is not None:
                    back = t
                    break
            if went_unready is None:
                continue
            if back is None:
                return None
            worst = max(worst, back - since)
        return round(worst, 3)

    def _first_handled_after(self, bot: str, t: float, exclude: str | None) -> float | None:
        best = None
        for instance, lines in self.d.worker_lines.items():
            if instance == exclude:
                continue
            for f in lines:
                if f[0] == "F" and f[2] == bot and float(f[1]) > t:
                    best = float(f[1]) if best is None else min(best, float(f[1]))
                    break
        return best

    def _first_record(self, instance: str | None, kind: str) -> float | None:
        for f in self.d.worker_lines.get(instance or "", []):
            if f[0] == kind:
                return float(f[1])
        return None

    def _alerts(self) -> None:
        """The chart's PrometheusRule conditions, evaluated on the day's scrapes: when each
        first held, how long at most, and whether that outlasts its ``for:``."""
        rows: list[dict[str, Any]] = []

        def runs(points: list[tuple[float, bool]]) -> tuple[float | None, float]:
            first: float | None = None
            longest, start = 0.0, None
            for t, on in sorted(points):
                if on:
                    first = t if first is None else first
                    start = t if start is None else start
                    longest = max(longest, t - start)
                else:
                    start = None
            return first, longest

        def add(alert: str, points: list[tuple[float, bool]], for_s: float) -> None:
            first, longest = runs(points)
            rows.append(
                {
                    "alert": alert,
                    "condition_first_true_s": self.rel(first) if first is not None else None,
                    "condition_held_s": round(longest, 1),
                    "for_s": for_s,
                    "fires": first is not None and longest >= for_s,
                }
            )

        reps = self.d.replicas.values()
        add(
            "MeetstreamGatewayRedisUnreachable",
            [(t, s.get("meetstream_gateway_redis_up", 1.0) == 0.0) for r in reps for t, s in r["scrapes"]],
            120,
        )
        grid = sorted({round(t * 2) / 2 for r in reps for t, _ in r["probes"] if t >= self.d.t0})
        ready_points = []
        for t in grid:
            ready = 0
            for r in reps:
                seen = [ok for pt, ok in r["probes"] if pt <= t]
                alive = r["started"] <= t and (r.get("exited_at") or float("inf")) > t
                ready += bool(alive and seen and seen[-1])
            ready_points.append((t, ready < 1))
        add("MeetstreamGatewayNoReadyReplicas", ready_points, 300)
        for reason, frames in self._total_drops().items():
            rows.append(
                {
                    "alert": f"MeetstreamGatewayFramesDropped{{reason={reason}}}",
                    "dropped": frames,
                    "fires": False,
                    "note": "needs > 1 drop/s sustained for 10 min",
                }
            )
        workers = list(self.d.workers.values())

        def increase(key: str) -> list[tuple[float, float]]:
            out = []
            for w in workers:
                scrapes = w.get("scrapes", [])
                base = scrapes[0][1].get(key, 0.0) if scrapes else 0.0
                out += [(t, s.get(key, 0.0) - base) for t, s in scrapes]
            return out

        lost = increase("meetstream_worker_bots_stopped_total{group=day,reason=lease_lost}")
        add("MeetstreamWorkerLeasesLost", [(t, v > 0) for t, v in lost], 0)
        gaps = increase("meetstream_worker_audio_seq_gaps_total{group=day}")
        add("MeetstreamWorkersLostAudio", [(t, v > 0) for t, v in gaps], 0)
        maxlen = 3000  # the day's --audio-maxlen
        lag = [
            (t, s.get("meetstream_worker_stream_lag_entries{group=day,stream=audio}", 0.0) > 0.5 * maxlen)
            for w in workers
            for t, s in w.get("scrapes", [])
        ]
        add("MeetstreamWorkersFallingBehind", lag, 60)
        seconds: dict[int, dict[str, dict[str, float]]] = defaultdict(dict)
        for w in workers:
            for t, s in w.get("scrapes", []):
                seconds[int(t)][w["instance"]] = s
        unowned = []
        for t, by_instance in sorted(seconds.items()):
            known = max(s.get("meetstream_worker_bots_known{group=day}", 0.0) for s in by_instance.values())
            owned = sum(s.get("meetstream_worker_bots_owned{group=day}", 0.0) for s in by_instance.values())
            unowned.append((float(t), known - owned > 0))
        add("MeetstreamWorkerBotsUnowned", unowned, 120)
        self.report["alerts"] = rows

    def _total_drops(self) -> dict[str, float]:
        out: dict[str, float] = defaultdict(float)
        for rid in self.d.replicas:
            for reason, value in self.replica_drops(rid).items():
                out[reason] += value
        return dict(out)

    def _start_failures(self) -> None:
        for failure in self.d.start_failures:
            self.problem(
                "a gateway replica exited while starting",
                replica=failure["id"],
                at_s=self.rel(failure["at"]),
                exit_code=failure.get("exit_code"),
                said=failure.get("last_lines", [])[-1:],
            )
        self.report["start_failures"] = self.d.start_failures

    def _harness(self) -> None:
        late = [rec["max_late_s"] for rec in self.d.bots.values()]
        self.report["harness"] = {
            "bot_ticks_late": sum(rec["late_ticks"] for rec in self.d.bots.values()),
            "bot_max_late_s": max(late) if late else 0.0,
            "refusals": Counter(r[3] for rec in self.d.bots.values() for r in rec["refusals"]),
            "cpu_s": self.d.settings.get("cpu_s", {}),
        }


def main(argv: list[str] | None = None) -> int:
    """``RUN_DIR [--report PREFIX]``: the ledger again from a run's records; with
    ``--report``, the report files written again too (the run's wall time kept)."""
    args = sys.argv[1:] if argv is None else argv
    run_dir = Path(args[0])
    ledger = Ledger(DayData.load(run_dir)).build()
    if "--report" in args:
        from tests.system.report import write_report

        prefix = Path(args[args.index("--report") + 1])
        with contextlib.suppress(OSError, ValueError, KeyError):
            old = json.loads(prefix.with_suffix(".json").read_text())
            ledger.report["run"]["wall_s"] = old["run"].get("wall_s")
        write_report(ledger, prefix)
    print(
        json.dumps({k: ledger.report[k] for k in ("frames", "commands", "healing")}, indent=1, default=str)[
            :20000
        ]
    )
    print(f"{len(ledger.problems)} problems")
    for p in ledger.problems[:40]:
        print(" -", json.dumps(p, default=str)[:400])
    return 0


if __name__ == "__main__":
    sys.exit(main())
