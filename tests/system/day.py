"""A day of production in a box (issue 16): the deployment, the meetings, the faults
at known times, and the ledger at the end.

    .venv/bin/python -m tests.system.day --bots 200 --minutes 3 --bot-procs 2 \\
        --report docs/system-results/day-200x3m

writes ``REPORT.json``, ``REPORT.md`` and ``REPORT.png`` (the timeline), and keeps
the run's raw files (bots', workers' and gateways' records) in ``REPORT.run/``;
``python -m tests.system.ledger REPORT.run`` recomputes the ledger from them.
``tests/system/test_day.py`` runs the same day, small, in CI.

Everything runs on 127.0.0.1: a Redis Cluster of 3 primaries with a replica
each (1 s node timeout), three gateway replicas behind a Service stand-in
(``service.py``), a group of SDK worker processes (``day_worker.py``) and the
bots (``daybot.py``). The faults (``plan.FAULTS``) run at fixed fractions of
the day, each as its own task, so a long one (the rolling restart) overlaps
the next ones as it would in production.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import shutil
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import redis
from redis.crc import key_slot

from tests.system.auditor import Auditor
from tests.system.deployment import Deployment, Replica
from tests.system.ledger import DayData, Ledger
from tests.system.plan import DayPlan
from tests.system.report import build_commit, write_report
from tests.system.service import probe_ready

log = logging.getLogger("day")

#: Compressed from production (a drain there lasts up to 300 s, preStop sleeps 10 s).
DRAIN_TIMEOUT_S = 3.0
PRESTOP_SLEEP_S = 0.5
#: Kubernetes restarts a crashed container after a back-off; compressed too.
RESTART_DELAY_S = 1.0
#: Audio kept per bot: a minute of 20 ms frames from one speaker; the auditor and the
#: workers are never that far behind, so nothing is trimmed before it is read.
AUDIO_MAXLEN = 3000


def gateway_args(overload_lag_s: float) -> list[str]:
    return [
        "--drain-timeout-s",
        str(DRAIN_TIMEOUT_S),
        "--audio-maxlen",
        str(AUDIO_MAXLEN),
        "--overload-lag-s",
        str(overload_lag_s),
        "--log-level",
        "info",
    ]


class Day:
    """Runs one day; ``await run()`` returns the ledger."""

    def __init__(
        self, plan: DayPlan, run_dir: Path, overload_lag_s: float = 0.0, full_coverage: bool = True
    ) -> None:
        self.full_coverage = full_coverage
        self.plan = plan.build() if not plan.meetings else plan
        self.run_dir = run_dir
        self.args = gateway_args(overload_lag_s)
        self.dep = Deployment(self.plan, run_dir, self.args)
        self.t0 = 0.0
        self.commit = build_commit()  # the code that ran, not the code that reports later
        self.faults: list[dict[str, Any]] = []
        self.auditor: Auditor | None = None
        self._stop_scrapes = asyncio.Event()

    def now_s(self) -> float:
        return time.time() - self.t0

    def alive_bots(self, at_s: float, for_s: float = 0.0) -> list[str]:
        return [m.bot_id for m in self.plan.meetings if m.join_s + 1.0 <= at_s and m.leave_s > at_s + for_s]

    # -- the day ----------------------------------------------------------------------

    async def run(self) -> Ledger:
        dep = self.dep
        scraping: asyncio.Task[None] | None = None
        try:
            started = time.monotonic()
            await asyncio.to_thread(dep.start_cluster, self.full_coverage)
            replicas = await asyncio.gather(*(asyncio.to_thread(dep.start_replica) for _ in range(3)))
            for replica in replicas:
                dep.list_replica(replica.id)
            for _ in range(self.plan.workers):
                dep.start_worker()
            log.info("deployment up in %.1f s", time.monotonic() - started)
            self.t0 = time.time() + 3.0
            outs = dep.start_bots(self.t0)
            scraping = asyncio.create_task(dep.scrape_loop(self._stop_scrapes))
            meetings = {m.bot_id: m for m in self.plan.meetings}
            self.auditor = Auditor(dep.seed_url, meetings)
            self.auditor.active = lambda b: meetings[b].join_s - 1 <= self.now_s() <= meetings[b].leave_s + 20
            self.auditor.start()
            tasks = [asyncio.create_task(self._fault(f.name, f.at_s)) for f in self.plan.faults]
            codes = await asyncio.to_thread(dep.wait_bots, self.plan.seconds + 40)
            log.info("bots done (exit codes %s) at %.1f s", codes, self.now_s())
            done, pending = await asyncio.wait(tasks, timeout=90)
            for task in pending:
                task.cancel()
            for task in done:
                if task.exception() is not None:
                    log.error("fault task failed: %r", task.exception())
            await self._catch_up()
            self._stop_scrapes.set()
            await scraping
            for replica in dep.serving():
                await dep.scrape(replica)
            dep.sample_cpu()
            await self.auditor.read_once()
            data = self._data(outs)
            self._save(data)  # first: a ledger that fails can be rerun from the records
            ledger = Ledger(data).build()
            # Commands never delivered: are they still in their stream (or lost to the failover)?
            data.command_exists = await self._exists(ledger)
            self._save(data)
            return Ledger(data).build()
        finally:
            self._stop_scrapes.set()
            if scraping is not None and not scraping.done():
                scraping.cancel()
            if self.auditor is not None:
                await self.auditor.stop()
            with contextlib.suppress(Exception):
                dep.save_gateway_logs()
            await asyncio.to_thread(dep.stop)

    async def _fault(self, name: str, at_s: float) -> None:
        await asyncio.sleep(max(0.0, self.t0 + at_s - time.time()))
        record: dict[str, Any] = {"name": name, "at": time.time()}
        self.faults.append(record)
        action: Callable[[dict[str, Any]], Awaitable[None]] = getattr(self, f"_do_{name}")
        log.info("fault %s at %.1f s", name, self.now_s())
        try:
            await action(record)
        except Exception as exc:
            record["error"] = repr(exc)
            log.exception("fault %s failed", name)
        record.setdefault("done", time.time())

    # -- workers ---------------------------------------------------------------------

    async def _busiest_worker(self) -> tuple[str, list[str]]:
        alive = self.alive_bots(self.now_s())
        owners = await asyncio.to_thread(self.dep.owners, alive)
        running = [w.instance for w in self.dep.running_workers()]
        victim = max(running, key=lambda i: sum(1 for o in owners.values() if o == i))
        return victim, [b for b, o in owners.items() if o == victim]

    async def _do_worker_kill(self, record: dict[str, Any]) -> None:
        victim, bots = await self._busiest_worker()
        record.update(instance=victim, bots_owned=bots)
        record["at"] = time.time()
        await asyncio.to_thread(self.dep.kill_worker, victim)

    async def _do_worker_join(self, record: dict[str, Any]) -> None:
        record["instance"] = self.dep.start_worker().instance

    async def _do_worker_sigterm(self, record: dict[str, Any]) -> None:
        victim, bots = await self._busiest_worker()
        record.update(instance=victim, bots_owned=bots)
        record["at"] = time.time()
        self.dep.sigterm_worker(victim)
        record["exit_code"] = await asyncio.to_thread(self.dep.wait_worker_exit, victim, 40)
        record["done"] = time.time()

    # -- gateways --------------------------------------------------------------------

    async def _wait_ready(self, replica: Replica, timeout_s: float = 30.0) -> float | None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if await probe_ready(replica.proc.metrics_port):
                return time.time()
            await asyncio.sleep(0.1)
        return None

    async def _do_gateway_kill(self, record: dict[str, Any]) -> None:
        serving = self.dep.serving()
        victim = max(serving, key=lambda r: r.last().get("meetstream_gateway_bots_connected", 0.0))
        record["replica"] = victim.id
        record["at"] = time.time()
        await asyncio.to_thread(self.dep.kill_replica, victim.id)
        # The control plane restarts it (a new process: a new gateway id and port).
        await asyncio.sleep(RESTART_DELAY_S)
        new = await asyncio.to_thread(self.dep.start_replica)
        self.dep.list_replica(new.id)
        self.dep.unlist_replica(victim.id)
        record["replacement"] = new.id
        record["replacement_ready"] = await self._wait_ready(new)
        record["done"] = time.time()

    async def _do_rolling_restart(self, record: dict[str, Any]) -> None:
        replaced = []
        for old in list(self.dep.serving()):
            new = await asyncio.to_thread(self.dep.start_replica)
            ready = await self._wait_ready(new)
            self.dep.list_replica(new.id)
            if ready is None:
                # maxUnavailable 0: a rollout whose new pod never gets ready stalls there.
                record["stalled"] = new.id
                break
            # Terminating: out of the endpoints first, preStop sleeps, then SIGTERM.
            self.dep.unlist_replica(old.id)
            await asyncio.sleep(PRESTOP_SLEEP_S)
            self.dep.sigterm_replica(old.id)
            code = await asyncio.to_thread(self.dep.wait_replica_exit, old.id, DRAIN_TIMEOUT_S + 40)
            replaced.append(
                {
                    "old": old.id,
                    "new": new.id,
                    "new_ready_s": round(ready - record["at"], 3) if ready else None,
                    "old_exit_code": code,
                    "old_exited_s": round(time.time() - record["at"], 3),
                }
            )
        record["replaced"] = replaced
        record["done"] = time.time()

    async def _do_burst_join(self, record: dict[str, Any]) -> None:
        record["bots"] = [m.bot_id for m in self.plan.meetings if m.burst]

    # -- Redis -----------------------------------------------------------------------

    async def _do_redis_primary_kill(self, record: dict[str, Any]) -> None:
        cluster, keys = self.dep.cluster, self.dep.keyspace
        # The primary of the discovery stream (every worker reads it; every bot's arrival
        # is announced there): the one whose loss tests the most. Its bots go with it.
        owner = await asyncio.to_thread(self.dep.slot_owner)
        victim_port = owner(keys.global_events)
        victim = next(s for s in cluster.servers if s.port == victim_port)
        # Decided at the moment of the kill (one slot map, no round trip per bot): a bot
        # that joined a moment ago counts.
        alive = [m.bot_id for m in self.plan.meetings if m.join_s <= self.now_s() < m.leave_s]
        on_victim = [b for b in alive if owner(keys.bot(b).audio) == victim_port]
        record.update(
            victim_port=victim_port,
            bots_on_victim=on_victim,
            command_streams_on_victim=[b for b in alive if owner(keys.bot(b).commands) == victim_port],
            global_events_on_victim=True,
        )
        slot = key_slot(keys.bot(on_victim[0]).audio.encode()) if on_victim else 0
        record["at"] = time.time()
        await asyncio.to_thread(cluster.kill, victim)
        self.dep.killed_redis = victim
        try:
            new = await asyncio.to_thread(cluster.wait_failover, victim, slot, 30.0)
            record["promoted_at"] = time.time()
            record["new_primary_port"] = new.port
        except RuntimeError as exc:
            record["error"] = repr(exc)
        await asyncio.sleep(2.0)
        assert self.auditor is not None
        kill_ms = int(record["at"] * 1000)
        record["auditor_lost"] = await self.auditor.recheck(on_victim, kill_ms - 5000, kill_ms + 500)
        record["done"] = time.time()

    async def _do_redis_rejoin(self, record: dict[str, Any]) -> None:
        victim = self.dep.killed_redis
        if victim is None:
            record["error"] = "no primary was killed"
            return
        await asyncio.to_thread(self.dep.cluster.restart, victim)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            client = redis.Redis(port=victim.port, socket_timeout=2)
            try:
                info = client.info("replication")
            except redis.RedisError:
                info = {}
            finally:
                client.close()
            if info.get("role") == "slave" and info.get("master_link_status") == "up":
                record["rejoined_at"] = time.time()
                record["role"] = "replica"
                break
            await asyncio.sleep(0.2)
        record["done"] = time.time()

    async def _do_slot_migration(self, record: dict[str, Any]) -> None:
        cluster, keys = self.dep.cluster, self.dep.keyspace
        alive = self.alive_bots(self.now_s(), for_s=10.0)
        if not alive:
            record["error"] = "no bot alive to migrate under"
            return
        moves = [("audio", keys.bot(alive[0]).audio), ("commands", keys.bot(alive[-1]).commands)]
        done = []
        for what, key in moves:
            slot = key_slot(key.encode())
            started = time.time()
            source, target = await asyncio.to_thread(cluster.migrate_slot, slot)
            done.append(
                {
                    "what": what,
                    "key": key,
                    "slot": slot,
                    "from": source.port,
                    "to": target.port,
                    "took_s": round(time.time() - started, 3),
                }
            )
        record["migrations"] = done
        record["done"] = time.time()

    # -- the end ---------------------------------------------------------------------

    async def _catch_up(self, timeout_s: float = 60.0) -> None:
        """Let the workers handle what is left in Redis (bounded), then count."""
        assert self.auditor is not None
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            await self.auditor.read_once()
            stored = sum(len(s.frames) for s in self.auditor.bots.values())
            handled = 0
            for path in self.run_dir.glob("w*.log"):
                with path.open("rb") as f:
                    handled += sum(1 for line in f if line.startswith(b"F "))
            if handled >= stored:
                return
            await asyncio.sleep(1.0)
        log.warning("workers did not catch up within %.0f s", timeout_s)

    async def _exists(self, ledger: Ledger) -> dict[str, bool]:
        assert self.auditor is not None
        out: dict[str, bool] = {}
        by_bot: dict[str, list[str]] = {}
        for u in ledger.undelivered:
            by_bot.setdefault(u["bot"], []).append(u["entry"])
        for bot, ids in by_bot.items():
            with contextlib.suppress(Exception):
                out.update(await self.auditor.entries_exist(self.dep.keyspace.bot(bot).commands, ids))
        return out

    def _data(self, outs: list[Path]) -> DayData:
        assert self.auditor is not None
        bots: dict[str, dict[str, Any]] = {}
        for out in outs:
            if out.exists():
                for record in json.loads(out.read_text()):
                    bots[record["bot_id"]] = record
        lines: dict[str, list[list[str]]] = {}
        for path in sorted(self.run_dir.glob("w*.log")):
            lines[path.stem] = [line.split() for line in path.read_text().splitlines() if line.strip()]
        frames: dict[str, dict[str, list[Any]]] = {
            b: {
                "idx": [f.idx for f in s.frames],
                "ms": [f.ms for f in s.frames],
                "conn": [f.conn for f in s.frames],
                "seq": [f.seq for f in s.frames],
                "spk": [f.spk for f in s.frames],
            }
            for b, s in self.auditor.bots.items()
        }
        events = {b: s.events for b, s in self.auditor.bots.items()}
        return DayData(
            plan=self.plan,
            t0=self.t0,
            bots=bots,
            audit_frames=frames,
            audit_events=events,
            audit_lost={b: [f.idx for f in v] for b, v in self.auditor.lost_to_failover.items()},
            audit_events_lost={
                b: [e["entry"] for e in v] for b, v in self.auditor.events_lost_to_failover.items()
            },
            workers={i: w.to_json() for i, w in self.dep.workers.items()},
            worker_lines=lines,
            replicas={r: rep.to_json() for r, rep in self.dep.replicas.items()},
            faults=self.faults,
            endpoint_log=self.dep.endpoint_log,
            start_failures=self.dep.start_failures,
            settings={
                "gateway_args": self.args,
                "publish_buffer_bytes": 64 << 20,
                "auditor_errors": self.auditor.errors,
                "auditor_rounds": self.auditor.rounds,
                "cpu_s": self.dep.cpu_s,
                "commit": self.commit,
                "cluster_require_full_coverage": self.full_coverage,
            },
        )

    def _save(self, data: DayData) -> None:
        raw = {
            "plan": data.plan.to_json(),
            "t0": data.t0,
            "audit_frames": data.audit_frames,
            "audit_events": data.audit_events,
            "audit_lost": data.audit_lost,
            "audit_events_lost": data.audit_events_lost,
            "workers": data.workers,
            "replicas": data.replicas,
            "faults": data.faults,
            "endpoint_log": data.endpoint_log,
            "start_failures": data.start_failures,
            "command_exists": data.command_exists,
            "settings": data.settings,
        }
        (self.run_dir / "raw.json").write_text(json.dumps(raw, default=str))


async def run_day(
    plan: DayPlan, run_dir: Path, overload_lag_s: float = 0.0, full_coverage: bool = True
) -> Ledger:
    return await Day(plan, run_dir, overload_lag_s, full_coverage).run()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.system.day", description=__doc__.split("\n\n")[0])
    p.add_argument("--bots", type=int, default=200)
    p.add_argument("--minutes", type=float, default=3.0)
    p.add_argument("--seconds", type=float, help="the day's length in seconds (instead of --minutes)")
    p.add_argument("--workers", type=int, default=3)
    p.add_argument(
        "--read-interval-ms",
        type=int,
        default=40,
        help="the workers' read_interval_ms (40: fewer reads, less CPU; the reduced size uses 0)",
    )
    p.add_argument(
        "--lease-ttl-s",
        type=float,
        default=5.0,
        help="the workers' lease TTL (the SDK's default, 5 s; the reduced size in CI uses 2 s)",
    )
    p.add_argument("--bot-procs", type=int, default=2, help="processes the bots are spread over")
    p.add_argument("--seed", type=int, default=16)
    p.add_argument(
        "--overload-lag-s",
        type=float,
        default=0.25,
        help="the gateways' --overload-lag-s (production default 0.25; 0 turns load shedding off)",
    )
    p.add_argument(
        "--cluster-full-coverage",
        choices=("yes", "no"),
        default="yes",
        help="Redis's cluster-require-full-coverage (default yes: every node refuses writes until a"
        " dead primary's replica is promoted)",
    )
    p.add_argument("--report", required=True, help="path prefix of REPORT.json/.md/.png")
    p.add_argument(
        "--run-dir", help="where the run's raw records go (default REPORT.run/; hundreds of MB at full size)"
    )
    ns = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    prefix = Path(ns.report)
    run_dir = Path(ns.run_dir) if ns.run_dir else prefix.with_name(prefix.name + ".run")
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    plan = DayPlan(
        bots=ns.bots,
        seconds=ns.seconds or ns.minutes * 60,
        seed=ns.seed,
        workers=ns.workers,
        bot_procs=ns.bot_procs,
        lease_ttl_s=ns.lease_ttl_s,
        read_interval_ms=ns.read_interval_ms,
    ).build()
    started = time.monotonic()
    ledger = asyncio.run(run_day(plan, run_dir, ns.overload_lag_s, ns.cluster_full_coverage == "yes"))
    ledger.report["run"]["wall_s"] = round(time.monotonic() - started, 1)
    write_report(ledger, prefix)
    print(f"{prefix}.md: {len(ledger.problems)} problems")
    return 0 if not ledger.problems else 1


if __name__ == "__main__":
    sys.exit(main())
