"""The deployment in a box: Redis Cluster with replicas, gateway replicas behind the
Service stand-in, a group of worker processes and the bot processes; every
process started here is stopped here, by PID, whatever happens.

Each gateway replica is scraped (``/metrics``) and probed (``/readyz``) about
once a second, more often while it drains, so that a replica's counters are
known up to its last moments: a SIGKILLed replica's counters die with it, and
the ledger accounts for what it was sent after its last scrape.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil  # type: ignore[import-untyped]
import redis
from prometheus_client.parser import text_string_to_metric_families
from redis.crc import key_slot

from gateway.embedded_redis import RedisServer, free_port, terminate
from gateway.keys import KeySpace
from gateway.testing.cluster import RedisClusterProcesses
from gateway.testing.process import GatewayProcess
from tests.system.plan import DayPlan
from tests.system.service import Endpoint, probe_ready, write_endpoints

ROOT = Path(__file__).resolve().parents[2]
GROUP = "day"
#: The samples of /metrics the ledger and the timeline use (histogram: command delivery only).
SCRAPED = (
    "meetstream_gateway_audio_frames_received_total",
    "meetstream_gateway_stream_entries_published_total",
    "meetstream_gateway_frames_dropped_total",
    "meetstream_gateway_commands_delivered_total",
    "meetstream_gateway_commands_rejected_total",
    "meetstream_gateway_command_acks_refused_total",
    "meetstream_gateway_connections_closed_total",
    "meetstream_gateway_connections_refused_total",
    "meetstream_gateway_connections_opened_total",
    "meetstream_gateway_bots_connected",
    "meetstream_gateway_ready",
    "meetstream_gateway_redis_up",
    "meetstream_gateway_publish_buffer_bytes",
    "meetstream_gateway_redis_errors_total",
    "meetstream_gateway_playback_utterances_total",
    "meetstream_gateway_command_delivery_seconds_count",
    "meetstream_gateway_command_delivery_seconds_sum",
    "meetstream_gateway_event_loop_lag_seconds",
    "meetstream_gateway_bot_failures_total",
)

#: The workers' samples the alerts of the chart's meetstream-workers group read.
WORKER_SCRAPED = (
    "meetstream_worker_bots_owned",
    "meetstream_worker_bots_known",
    "meetstream_worker_stream_lag_entries",
    "meetstream_worker_bots_stopped_total",
    "meetstream_worker_audio_seq_gaps_total",
    "meetstream_worker_handler_failures_total",
    "meetstream_worker_takeovers_total",
)


def sample_key(name: str, labels: tuple[tuple[str, str], ...]) -> str:
    return name + ("{" + ",".join(f"{k}={v}" for k, v in labels) + "}" if labels else "")


@dataclass
class Replica:
    """One gateway process, as the control plane sees a pod."""

    id: str
    proc: GatewayProcess
    started: float
    ready_at: float | None = None
    state: str = "serving"  # serving | terminating | killed | exited
    terminated_at: float | None = None  # SIGTERM or SIGKILL
    exited_at: float | None = None
    exit_code: int | None = None
    scrapes: list[tuple[float, dict[str, float]]] = field(default_factory=list)
    probes: list[tuple[float, bool]] = field(default_factory=list)

    @property
    def endpoint(self) -> Endpoint:
        return Endpoint(self.id, self.proc.url, self.proc.metrics_port)

    def last(self) -> dict[str, float]:
        return self.scrapes[-1][1] if self.scrapes else {}

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "pid": self.proc.proc.pid if self.proc.proc else None,
            "started": self.started,
            "ready_at": self.ready_at,
            "state": self.state,
            "terminated_at": self.terminated_at,
            "exited_at": self.exited_at,
            "exit_code": self.exit_code,
            "scrapes": self.scrapes,
            "probes": self.probes,
        }


@dataclass
class WorkerProc:
    instance: str
    proc: subprocess.Popen[bytes]
    started: float
    metrics_port: int = 0
    state: str = "running"  # running | killed | stopping | exited
    signalled_at: float | None = None
    exited_at: float | None = None
    exit_code: int | None = None
    scrapes: list[tuple[float, dict[str, float]]] = field(default_factory=list)

    def metrics(self) -> dict[str, float]:
        """The SDK's own metrics (meetstream_worker_*), flattened like a replica's."""
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as reply:
            body = reply.read().decode()
        return {
            sample_key(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(body)
            for s in family.samples
            if s.name in WORKER_SCRAPED
        }

    def to_json(self) -> dict[str, Any]:
        return {
            "instance": self.instance,
            "pid": self.proc.pid,
            "scrapes": self.scrapes,
            "started": self.started,
            "state": self.state,
            "signalled_at": self.signalled_at,
            "exited_at": self.exited_at,
            "exit_code": self.exit_code,
        }


class Deployment:
    def __init__(self, plan: DayPlan, run_dir: Path, gateway_args: list[str]) -> None:
        self.plan = plan
        self.run_dir = run_dir
        self.gateway_args = gateway_args
        self.cluster = RedisClusterProcesses(3, replicas=1, node_timeout_ms=1000)
        self.replicas: dict[str, Replica] = {}
        self.listed: list[str] = []  # replica ids in the endpoints file
        self.endpoint_log: list[tuple[float, str, str]] = []  # (t, "list" | "unlist", replica)
        self.workers: dict[str, WorkerProc] = {}
        self.bot_procs: list[subprocess.Popen[bytes]] = []
        self.endpoints_file = run_dir / "endpoints.json"
        self.keyspace = KeySpace()
        self.killed_redis: RedisServer | None = None
        self.start_failures: list[dict[str, Any]] = []
        self.cpu_s: dict[str, float] = {}  # CPU seconds per process, last seen
        self._next_replica = 0
        self._next_worker = 0
        self._stderr: list[Any] = []

    # -- Redis -----------------------------------------------------------------

    def start_cluster(self, full_coverage: bool = True) -> None:
        """Start Redis; ``full_coverage=False`` sets ``cluster-require-full-coverage no``:
        the live shards keep serving while a dead primary's slots have no owner (with
        the default, every node answers CLUSTERDOWN until the promotion)."""
        self.cluster.start()
        if not full_coverage:
            for server in self.cluster.servers:
                client = redis.Redis(port=server.port, socket_timeout=5)
                try:
                    client.config_set("cluster-require-full-coverage", "no")
                finally:
                    client.close()

    def seed_url(self) -> str:
        return self.cluster.url

    # -- gateways ----------------------------------------------------------------

    def start_replica(self, attempts: int = 5) -> Replica:
        """Start one more gateway replica (blocking: waits for it to listen).

        A replica that exits during start-up is started again after a back-off, as the
        kubelet restarts a crashed container (CrashLoopBackOff); each failure is kept
        in ``start_failures`` with what the process said last.
        """
        backoff_s = 1.0
        for attempt in range(1, attempts + 1):
            rid = f"gw{self._next_replica}"
            self._next_replica += 1
            proc = GatewayProcess(self.seed_url(), "--gateway-id", rid, *self.gateway_args)
            started = time.time()
            try:
                proc.start(timeout_s=30)
            except Exception:
                proc.stop()
                lines = [str(r.get("msg", "")) for r in list(proc.logs)[-3:]]
                code = proc.proc.returncode if proc.proc is not None else None
                self.start_failures.append(
                    {"id": rid, "at": started, "attempt": attempt, "exit_code": code, "last_lines": lines}
                )
                if attempt == attempts:
                    raise
                time.sleep(backoff_s)
                backoff_s *= 2
                continue
            replica = Replica(rid, proc, started)
            self.replicas[rid] = replica
            return replica
        raise AssertionError("unreachable")

    def list_replica(self, rid: str) -> None:
        if rid not in self.listed:
            self.listed.append(rid)
            self.endpoint_log.append((time.time(), "list", rid))
        self._write_endpoints()

    def unlist_replica(self, rid: str) -> None:
        if rid in self.listed:
            self.listed.remove(rid)
            self.endpoint_log.append((time.time(), "unlist", rid))
        self._write_endpoints()

    def _write_endpoints(self) -> None:
        write_endpoints(self.endpoints_file, [self.replicas[r].endpoint for r in self.listed])

    def serving(self) -> list[Replica]:
        return [r for r in self.replicas.values() if r.state == "serving"]

    def kill_replica(self, rid: str) -> None:
        replica = self.replicas[rid]
        replica.terminated_at = time.time()
        replica.state = "killed"
        replica.proc.kill()
        replica.exited_at = time.time()
        replica.exit_code = replica.proc.proc.returncode if replica.proc.proc else None

    def sigterm_replica(self, rid: str) -> None:
        replica = self.replicas[rid]
        replica.terminated_at = time.time()
        replica.state = "terminating"
        replica.proc.signal(signal.SIGTERM)

    def wait_replica_exit(self, rid: str, timeout_s: float) -> int | None:
        replica = self.replicas[rid]
        try:
            code = replica.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            return None
        replica.exited_at = time.time()
        replica.exit_code = code
        replica.state = "exited"
        return code

    async def scrape(self, replica: Replica) -> None:
        """One scrape and one readiness probe of a live replica (off the event loop)."""
        if replica.proc.proc is None or replica.proc.proc.poll() is not None:
            return
        now = time.time()
        ready = await probe_ready(replica.proc.metrics_port)
        replica.probes.append((now, ready))
        if ready and replica.ready_at is None:
            replica.ready_at = now
        try:
            samples = await asyncio.to_thread(replica.proc.metrics)
        except Exception:  # it may be dying: the last good scrape stands
            return
        kept = {
            sample_key(name, labels): value
            for (name, labels), value in samples.items()
            if name in SCRAPED
            and (value or name in ("meetstream_gateway_ready", "meetstream_gateway_redis_up"))
        }
        replica.scrapes.append((time.time(), kept))

    def processes(self) -> dict[str, int]:
        """Every process of the deployment by a readable name, with its PID."""
        out: dict[str, int] = {"driver": os.getpid()}
        for rid, r in self.replicas.items():
            if r.proc.proc is not None:
                out[f"gateway {rid}"] = r.proc.proc.pid
        for instance, w in self.workers.items():
            out[f"worker {instance}"] = w.proc.pid
        for n, proc in enumerate(self.bot_procs):
            out[f"bots {n}"] = proc.pid
        for server in self.cluster.servers:
            if server.process is not None:
                out[f"redis {server.port}"] = server.process.pid
        return out

    def sample_cpu(self) -> None:
        """CPU seconds (user + system) each live process has used so far: where the box's
        cores went (the harness shares them with the system under test)."""
        for name, pid in self.processes().items():
            try:
                times = psutil.Process(pid).cpu_times()
            except psutil.Error:
                continue
            self.cpu_s[name] = round(times.user + times.system, 2)

    async def scrape_worker(self, worker: WorkerProc) -> None:
        if worker.proc.poll() is not None:
            return
        try:
            samples = await asyncio.to_thread(worker.metrics)
        except Exception:  # starting, or dying
            return
        worker.scrapes.append((time.time(), samples))

    async def scrape_loop(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            started = time.monotonic()
            self.sample_cpu()
            live = [r for r in self.replicas.values() if r.state in ("serving", "terminating")]
            await asyncio.gather(
                *(self.scrape(r) for r in live),
                *(self.scrape_worker(w) for w in self.workers.values() if w.state in ("running", "stopping")),
                return_exceptions=True,
            )
            fast = any(r.state == "terminating" for r in live)
            interval = 0.2 if fast else 1.0
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), max(0.05, interval - (time.monotonic() - started)))

    def save_gateway_logs(self) -> None:
        for replica in self.replicas.values():
            path = self.run_dir / f"gateway-{replica.id}.log"
            path.write_text("\n".join(json.dumps(r) for r in list(replica.proc.logs)) + "\n")

    # -- workers -----------------------------------------------------------------

    def start_worker(self) -> WorkerProc:
        instance = f"w{self._next_worker}"
        self._next_worker += 1
        metrics_port = free_port()
        stderr = open(self.run_dir / f"worker-{instance}.stderr", "wb")  # noqa: SIM115 (closed in stop)
        self._stderr.append(stderr)
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tests.system.day_worker",
                "--out",
                str(self.run_dir),
                "--instance",
                instance,
                "--redis-url",
                self.seed_url(),
                "--group",
                GROUP,
                "--lease-ttl-s",
                str(self.plan.lease_ttl_s),
                "--read-interval-ms",
                str(self.plan.read_interval_ms),
                "--utterance-s",
                str(self.plan.utterance_s),
                "--log-format",
                "json",
                "--metrics-port",
                str(metrics_port),
            ],
            cwd=ROOT,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            env={k: v for k, v in os.environ.items() if not k.startswith("MEETSTREAM_")},
        )
        worker = WorkerProc(instance, proc, time.time(), metrics_port)
        self.workers[instance] = worker
        return worker

    def kill_worker(self, instance: str) -> None:
        worker = self.workers[instance]
        worker.signalled_at = time.time()
        worker.state = "killed"
        worker.proc.kill()
        worker.exit_code = worker.proc.wait(10)
        worker.exited_at = time.time()

    def sigterm_worker(self, instance: str) -> None:
        worker = self.workers[instance]
        worker.signalled_at = time.time()
        worker.state = "stopping"
        worker.proc.send_signal(signal.SIGTERM)

    def wait_worker_exit(self, instance: str, timeout_s: float) -> int | None:
        worker = self.workers[instance]
        try:
            worker.exit_code = worker.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            return None
        worker.exited_at = time.time()
        worker.state = "exited" if worker.state != "killed" else "killed"
        return worker.exit_code

    def running_workers(self) -> list[WorkerProc]:
        return [w for w in self.workers.values() if w.state == "running"]

    def owners(self, bot_ids: list[str]) -> dict[str, str | None]:
        """Which worker instance holds each bot's lease now (one pipeline)."""
        client = redis.RedisCluster.from_url(self.seed_url(), socket_timeout=5)
        try:
            pipe = client.pipeline()  # type: ignore[no-untyped-call]
            for bot_id in bot_ids:
                pipe.get(f"{self.keyspace.prefix}:{{{bot_id}}}:lease:{GROUP}")
            values = pipe.execute()
        finally:
            client.close()
        return {b: v.decode() if isinstance(v, bytes) else v for b, v in zip(bot_ids, values, strict=True)}

    def slot_owner(self) -> Callable[[str], int]:
        """The port of the primary serving each key, from one CLUSTER SLOTS (a fault that
        asked the cluster once per bot took seconds under load and came late)."""
        client = redis.Redis(port=self.cluster.primaries()[0].port, socket_timeout=5)
        try:
            ranges = sorted(
                (int(r[0]), int(r[1]), int(r[2][1]))
                for r in client.execute_command("CLUSTER", "SLOTS")  # type: ignore[no-untyped-call]
            )
        finally:
            client.close()

        def owner(key: str) -> int:
            slot = key_slot(key.encode())
            return next(port for start, end, port in ranges if start <= slot <= end)

        return owner

    # -- bots ----------------------------------------------------------------------

    def start_bots(self, t0: float) -> list[Path]:
        """Start the bot processes; each writes its records to a file at the end."""
        ids = [m.bot_id for m in self.plan.meetings]
        shards = [ids[i :: self.plan.bot_procs] for i in range(self.plan.bot_procs)]
        outs = []
        for n, mine in enumerate(shards):
            out = self.run_dir / f"bots-{n}.json"
            config = self.run_dir / f"bots-{n}.config.json"
            config.write_text(
                json.dumps(
                    {
                        "plan": self.plan.to_json(),
                        "bot_ids": mine,
                        "t0": t0,
                        "endpoints": str(self.endpoints_file),
                        "out": str(out),
                        "seed": n,
                    }
                )
            )
            stderr = open(self.run_dir / f"bots-{n}.stderr", "wb")  # noqa: SIM115 (closed in stop)
            self._stderr.append(stderr)
            self.bot_procs.append(
                subprocess.Popen(
                    [sys.executable, "-m", "tests.system.daybot", str(config)],
                    cwd=ROOT,
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    stderr=stderr,
                )
            )
            outs.append(out)
        return outs

    def wait_bots(self, timeout_s: float) -> list[int | None]:
        deadline = time.monotonic() + timeout_s
        codes: list[int | None] = []
        for proc in self.bot_procs:
            try:
                codes.append(proc.wait(max(0.1, deadline - time.monotonic())))
            except subprocess.TimeoutExpired:
                proc.send_signal(signal.SIGTERM)  # every bot leaves now and writes its record
                try:
                    codes.append(proc.wait(30))
                except subprocess.TimeoutExpired:
                    codes.append(None)
        return codes

    # -- the end -------------------------------------------------------------------

    def stop(self) -> None:
        """Stop everything started here, by PID; safe to call twice."""
        for proc in self.bot_procs:
            terminate(proc, 10)
        for worker in self.workers.values():
            terminate(worker.proc, 10)
        for replica in self.replicas.values():
            with contextlib.suppress(Exception):
                replica.proc.stop()
        self.cluster.stop()
        for f in self._stderr:
            f.close()
        self._stderr.clear()
