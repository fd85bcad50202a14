"""The one command: the gateway and the reference bridge, side by side on one real redis-server.

    .venv/bin/python -m bench.run --quick      # about two minutes, small bot counts
    .venv/bin/python -m bench.run              # the figures in docs/BENCHMARKS.md (about 10 minutes)
    .venv/bin/python -m bench.report bench/results/latest-full.json   # the tables again

Each phase starts its server fresh (gateway or bridge, same Redis, FLUSHALL between phases), so
CPU and RSS belong to that phase alone; generator processes connect every bot, then all start on
one clock; numbers are taken over a measurement window after a warm-up. Results go to
``bench/results/<time>-<config>.json`` and ``latest-<config>.json`` (gitignored).

CPU is the kernel's account of the server process (user + system, psutil), never wall time.
The machine has few cores, shared by the generator, Redis and whoever else runs: each phase also
records the generator's own CPU and the machine's total busy CPU, so a figure limited by the
machine says so.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import redis

from bench import profile as pyspy
from bench import redis_limit
from bench.cgroup import CgroupError, CpuQuota
from bench.commander import Commander, CommanderSpec
from bench.loadgen import LoadGen, LoadSpec, merge
from bench.procstat import BridgeProcess, cpu_busy_total, machine_load, redis_sample, sample
from gateway.embedded_redis import RedisServer
from gateway.testing.process import GatewayProcess

RESULTS = Path(__file__).parent / "results"
Target = Literal["gateway", "reference"]


@dataclass
class Phase:
    name: str
    target: Target
    bots: int
    frame_ms: int = 100
    speakers: int = 1
    mode: Literal["realtime", "flood", "commands"] = "realtime"
    warmup_s: float = 2.0
    window_s: float = 8.0
    command_rate_per_s: float = 100.0
    ping_s: float | None = None  # server keepalive interval = timeout; None: the server's default
    profile: bool = False
    processes: int = 2
    connect_concurrency: int = 4  # handshakes in flight per generator process
    # The generator writes its bots' frames in groups this far apart (cheap at 1,000 bots);
    # independent bots each keep their own phase: a group per bot is --group-ms 0.
    group_ms: float = 5.0


@dataclass
class Config:
    name: str
    phases: list[Phase] = field(default_factory=list)
    limit_seconds: float = 3.0
    audio_maxlen: int = 100  # both servers: bounds Redis memory at 1,000 bots (10 s of 100 ms frames)
    settle_s: float = 1.0  # pauses: after connecting, before the start, for the server to drain
    gateway_args: list[str] = field(default_factory=list)  # extra flags for the gateway under test
    cpu_quota: float | None = None  # cores the server under test may use (a cgroup quota), or all of its own


def _both(name: str, **kw: Any) -> list[Phase]:
    return [Phase(f"{name}", "gateway", **kw), Phase(f"{name}", "reference", **kw)]


def config(name: str, processes: int, profile: bool) -> Config:
    p = dict(processes=processes)
    if name == "tiny":  # the test suite: does it run, not how fast
        return Config(
            name,
            [
                *_both("realtime-100ms", bots=4, warmup_s=1.0, window_s=2.0, command_rate_per_s=20, **p),
                *_both(
                    "flood-100ms", bots=2, mode="flood", warmup_s=0.5, window_s=1.5, command_rate_per_s=0, **p
                ),
                *_both(
                    "commands",
                    bots=4,
                    mode="commands",
                    warmup_s=0.5,
                    window_s=1.5,
                    command_rate_per_s=50,
                    **p,
                ),
            ],
            limit_seconds=0.3,
        )
    if name == "quick":
        return Config(
            name,
            [
                *(ph for n in (20, 100) for ph in _both("realtime-100ms", bots=n, window_s=5.0, **p)),
                *_both("realtime-20ms", bots=50, frame_ms=20, window_s=5.0, ping_s=5.0, **p),
                *_both(
                    "flood-100ms",
                    bots=20,
                    mode="flood",
                    warmup_s=1.0,
                    window_s=4.0,
                    command_rate_per_s=0,
                    profile=profile,
                    **p,
                ),
                *_both("commands", bots=20, mode="commands", window_s=4.0, command_rate_per_s=200, **p),
            ],
            limit_seconds=1.0,
        )
    phases: list[Phase] = []
    for n in (100, 500, 1000):
        phases += _both(
            "realtime-100ms",
            bots=n,
            warmup_s=3.0,
            window_s=10.0,
            command_rate_per_s=200,
            profile=profile and n == 1000,
            **p,
        )
    for n in (200, 500, 1000):
        phases += _both(
            "realtime-20ms",
            bots=n,
            frame_ms=20,
            warmup_s=3.0,
            window_s=20.0,
            ping_s=5.0,
            command_rate_per_s=200,
            **p,
        )
    # Commands alone (a voice agent streaming sendaudio while the meeting is quiet), at 10 per bot per second.
    phases += _both(
        "commands", bots=100, mode="commands", warmup_s=2.0, window_s=10.0, command_rate_per_s=1000, **p
    )
    # Bots arriving together (e.g. after a replica restart): 16 handshakes in flight per process.
    phases += _both("connect-burst", bots=200, warmup_s=1.0, window_s=4.0, connect_concurrency=16, **p)
    phases += _both(
        "flood-100ms",
        bots=50,
        mode="flood",
        warmup_s=2.0,
        window_s=10.0,
        command_rate_per_s=0,
        profile=profile,
        **p,
    )
    phases += _both(
        "flood-20ms",
        bots=50,
        frame_ms=20,
        mode="flood",
        warmup_s=2.0,
        window_s=10.0,
        command_rate_per_s=0,
        **p,
    )
    return Config(name, phases, limit_seconds=3.0)


# -- helpers ------------------------------------------------------------------


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q / 100 * (len(s) - 1))))]


def dist(values: list[float]) -> dict[str, Any]:
    return {
        "n": len(values),
        "p50": pct(values, 50),
        "p99": pct(values, 99),
        "max": max(values) if values else None,
        "mean": statistics.fmean(values) if values else None,
    }


def git_meta() -> dict[str, Any]:
    def git(*args: str) -> str:
        with contextlib.suppress(Exception):
            return subprocess.run(
                ["git", *args], capture_output=True, text=True, timeout=10, cwd=Path(__file__).parent.parent
            ).stdout.strip()
        return ""

    # The gateway code actually run (others may be editing the work tree): a hash of its sources.
    import gateway

    root = Path(gateway.__file__).parent
    digest = hashlib.sha1()
    for f in sorted(root.rglob("*.py")):
        digest.update(f.read_bytes())
    return {
        # A run from a snapshot of the tree (see docs/BENCHMARKS.md) names its commit in the env.
        "commit": os.environ.get("BENCH_SOURCE_COMMIT") or git("rev-parse", "--short", "HEAD"),
        "gateway_dirty": os.environ.get("BENCH_SOURCE_DIRTY") == "1"
        or bool(git("status", "--porcelain", "--", "gateway")),
        "gateway_path": str(root),
        "gateway_sources_sha1": digest.hexdigest()[:12],
    }


def gateway_counters(gw: GatewayProcess) -> dict[str, float]:
    """The gateway's own counters, flattened to ``name{label=value}``."""
    out: dict[str, float] = {}
    with contextlib.suppress(Exception):
        for (name, labels), value in gw.metrics().items():
            if not name.startswith("meetstream_gateway_") or name.endswith(("_bucket", "_created")):
                continue
            short = name.removeprefix("meetstream_gateway_")
            if labels:
                short += "{" + ",".join(f"{k}={v}" for k, v in labels) + "}"
            out[short] = value
    return out


def _dropped(counters: dict[str, float]) -> dict[str, float]:
    return {
        k.split("reason=", 1)[1].rstrip("}"): v
        for k, v in counters.items()
        if k.startswith("frames_dropped_total{") and v
    }


def _pipeline(g0: dict[str, float], g1: dict[str, float], window_s: float) -> dict[str, float]:
    """The publisher's round trips over the window: how often, how long, how many pauses."""

    def delta(key: str) -> float:
        return g1.get(key, 0.0) - g0.get(key, 0.0)

    trips = delta("redis_roundtrip_seconds_count{op=publish}")
    return {
        "publish_roundtrips_per_s": trips / window_s if window_s else 0.0,
        "publish_roundtrip_mean_ms": delta("redis_roundtrip_seconds_sum{op=publish}") / trips * 1e3
        if trips
        else 0.0,
        "entries_per_roundtrip": delta("stream_entries_published_total{kind=audio}") / trips
        if trips
        else 0.0,
        "backpressure_pauses": delta("publish_backpressure_total"),
        "overload_shed": delta("frames_dropped_total{reason=overload}"),
        "loop_lag_s_at_window_end": g1.get("event_loop_lag_seconds", 0.0),
    }


class _Profiler(threading.Thread):
    def __init__(self, pid: int, at: float, seconds: float, out: Path) -> None:
        super().__init__(daemon=True)
        self.pid, self.at, self.seconds, self.out = pid, at, seconds, out
        self.ok, self.message = False, "not run"

    def run(self) -> None:
        time.sleep(max(0.0, self.at - time.time()))
        self.ok, self.message = pyspy.record(self.pid, self.seconds, self.out)


# -- one phase ------------------------------------------------------------------


def pin_cores() -> tuple[set[int], set[int]] | None:
    """Give the server under test a core of its own: (harness cores, server cores).

    On a small machine the load generator, Redis and the server otherwise take
    turns on the same cores, and the server's latency measures the scheduler as
    much as the server. This process (and so Redis, the generator and the command
    writer, started from it) keeps every core but the last; the server gets the
    last. None when there is only one core.
    """
    available = sorted(os.sched_getaffinity(0))
    if len(available) < 2:
        return None
    harness, server = set(available[:-1]), {available[-1]}
    os.sched_setaffinity(0, harness)
    return harness, server


def run_phase(
    server: RedisServer,
    cfg: Config,
    ph: Phase,
    tag: str,
    results_dir: Path = RESULTS,
    server_cores: set[int] | None = None,
) -> dict[str, Any]:
    r = redis.Redis.from_url(server.url)
    r.flushall()
    ping = [] if ph.ping_s is None else [str(ph.ping_s), str(ph.ping_s)]
    if ph.target == "gateway":
        flags = ["--audio-maxlen", str(cfg.audio_maxlen), *cfg.gateway_args]
        if ph.mode == "flood":  # the per-bot limits would measure themselves, not the pipeline
            flags += ["--max-frames-per-s", "1000000", "--bot-max-bytes-per-s", str(1 << 30)]
        if ping:
            flags += ["--ws-ping-interval-s", ping[0], "--ws-ping-timeout-s", ping[1]]
        proc: Any = GatewayProcess(server.url, *flags).start()
        pid = proc.proc.pid
    else:
        flags = ["--audio-maxlen", str(cfg.audio_maxlen)]
        if ping:
            flags += ["--ws-ping-interval-s", ping[0], "--ws-ping-timeout-s", ping[1]]
        proc = BridgeProcess(server.url, *flags).start()
        pid = proc.proc.pid  # type: ignore[union-attr]
    if server_cores:
        os.sched_setaffinity(pid, server_cores)
    quota = None
    if cfg.cpu_quota is not None:
        quota = CpuQuota(cfg.cpu_quota, f"meetstream-bench-{pid}")
        try:
            quota.add(pid)
        except CgroupError:
            proc.stop()
            raise
    gen: LoadGen | None = None
    cmd: Commander | None = None
    out: dict[str, Any] = {
        "phase": ph.name,
        **dataclasses.asdict(ph),
        "server_pid": pid,
        "server_flags": flags,
        "server_cpu_quota": cfg.cpu_quota,
    }
    try:
        time.sleep(0.5)
        idle = sample(pid)
        bot_ids = [f"{ph.target[:3]}-{ph.name}-{ph.bots}-{i}" for i in range(ph.bots)]
        duration = ph.warmup_s + ph.window_s
        spec = LoadSpec(
            url=proc.url,
            bot_ids=bot_ids,
            frame_ms=ph.frame_ms,
            speakers=ph.speakers,
            mode=ph.mode,
            duration_s=duration,
            window_start_s=ph.warmup_s,
            window_end_s=duration,
            connect_concurrency=ph.connect_concurrency,
            tail_s=cfg.settle_s,
            group_ms=ph.group_ms,
        )
        gen = LoadGen(spec, ph.processes).start()
        cmd = Commander(
            CommanderSpec(
                server.url,
                bot_ids,
                rate_per_s=ph.command_rate_per_s,
                window_start_s=ph.warmup_s,
                window_end_s=duration,
                duration_s=duration,
            ),
            gen.go,
            gen.start_at,
        ).start()
        t_conn = time.monotonic()
        connected, failed = gen.wait_connected(timeout_s=180)
        out["connect_s"] = time.monotonic() - t_conn
        time.sleep(cfg.settle_s)
        conn_sample = sample(pid)
        r0_total = redis_sample(r)
        start = time.time() + cfg.settle_s
        gen.go_at(start)
        prof = None
        if ph.profile:
            prof = _Profiler(
                pid,
                start + ph.warmup_s + 0.5,
                max(2.0, ph.window_s - 1.0),
                results_dir / f"{tag}-{ph.target}-{ph.name}-{ph.bots}.pyspy.txt",
            )
            prof.start()
        time.sleep(max(0.0, start + ph.warmup_s - time.time()))
        s0, rs0, m0 = sample(pid), redis_sample(r), cpu_busy_total()
        g0 = gateway_counters(proc) if ph.target == "gateway" else {}
        time.sleep(max(0.0, start + duration - time.time()))
        s1, rs1, m1 = sample(pid), redis_sample(r), cpu_busy_total()
        g1 = gateway_counters(proc) if ph.target == "gateway" else {}
        results = gen.results(timeout_s=duration + 90)
        cres = cmd.result(timeout_s=30)
        time.sleep(cfg.settle_s)  # let the server write what it still holds
        g2 = gateway_counters(proc) if ph.target == "gateway" else {}
        r2_total = redis_sample(r)
        if prof is not None:
            prof.join(60)
    finally:
        if gen is not None:
            gen.stop()
        if cmd is not None:
            cmd.stop()
        proc.stop()
        if quota is not None:
            quota.remove()
        with contextlib.suppress(Exception):
            r.flushall()
        r.close()

    load = merge(results)
    window = s1.at - s0.at
    cmds = cres["commands_written"]
    audio_xadds_window = (rs1.xadd_calls - rs0.xadd_calls) - cmds  # commands are written in the window only
    audio_xadds_total = (r2_total.xadd_calls - r0_total.xadd_calls) - cmds
    if ph.target == "gateway":
        # The gateway also XADDs events (few after the connect phase); its own counter is exact.
        audio_total = g2.get("stream_entries_published_total{kind=audio}", 0.0)
        audio_window = g1.get("stream_entries_published_total{kind=audio}", 0.0) - g0.get(
            "stream_entries_published_total{kind=audio}", 0.0
        )
    else:
        audio_total, audio_window = audio_xadds_total, audio_xadds_window
    server_cpu = s1.cpu_s - s0.cpu_s
    wakeups = s1.wakeups - s0.wakeups
    redis_cpu = rs1.cpu_s - rs0.cpu_s
    intended = ph.bots * ph.speakers * 1000 / ph.frame_ms if ph.mode == "realtime" else None
    offered = load["frames_sent_window"] / window if window else 0.0
    lost = int(load["frames_sent"] - audio_total)
    tap = dist(cres["tap_latency_ms"])
    cmd_lat = dist(load["cmd_latency_ms"])
    machine_cpu = m1 - m0
    out.update(
        {
            "bots_connected": connected,
            "connect_failures": failed,
            "connect_errors": load["connect_errors"],
            "window_s": window,
            "intended_fps": intended,
            "offered_fps": offered,
            "offered_ratio": offered / intended if intended else None,
            "send_lateness_ms": dist(load["lateness_ms"]),
            "frames_sent": load["frames_sent"],
            "frames_blocked_at_bot": load["frames_blocked"],
            # How far the generator itself fell behind: the most audio any bot held unsent
            # in its own buffer (written late, in a burst, once the socket took it).
            "loadgen_behind_s": load.get("max_write_buffer_bytes", 0)
            / max(1, (ph.frame_ms * 96 + 64) * ph.speakers)
            * ph.frame_ms
            / 1000,
            "frames_on_closed_socket": load["frames_on_closed"],
            "bot_close_s_max": load["max_close_s"],
            "frames_in_redis": int(audio_total),
            "frames_lost": lost,
            "lost_ratio": lost / load["frames_sent"] if load["frames_sent"] else None,
            "frames_in_redis_window": audio_window,
            "redis_fps": audio_window / window if window else 0.0,
            "server_cpu_s": server_cpu,
            "server_system_share": (s1.system_s - s0.system_s) / server_cpu if server_cpu else None,
            "server_cores": server_cpu / window if window else 0.0,
            "server_cpu_us_per_frame": server_cpu / audio_window * 1e6 if audio_window else None,
            "frames_per_cpu_s": audio_window / server_cpu if server_cpu else None,
            "server_wakeups_per_s": wakeups / window if window else 0.0,
            "server_wakeups_per_frame": wakeups / audio_window if audio_window else None,
            "server_cpu_us_per_wakeup": server_cpu / wakeups * 1e6 if wakeups else None,
            # Commands are written in the window only; a commands phase has no audio to share the CPU.
            "server_cpu_us_per_command": server_cpu / cmds * 1e6 if cmds and ph.mode == "commands" else None,
            "server_wakeups_per_command": wakeups / cmds if cmds and ph.mode == "commands" else None,
            "redis_cpu_s": redis_cpu,
            "redis_cores": redis_cpu / window if window else 0.0,
            "redis_cpu_us_per_frame": redis_cpu / audio_window * 1e6 if audio_window else None,
            "redis_xadd_usec_per_call": (rs1.xadd_usec - rs0.xadd_usec)
            / max(1, rs1.xadd_calls - rs0.xadd_calls),
            "redis_clients": rs1.clients,
            "redis_used_memory": rs1.used_memory,
            "loadgen_cpu_s": load["cpu_window_s"],
            "loadgen_cores": load["cpu_window_s"] / window if window else 0.0,
            "machine_busy_cores": machine_cpu / window if window else 0.0,
            "other_cores": max(0.0, machine_cpu - server_cpu - redis_cpu - load["cpu_window_s"]) / window
            if window
            else 0.0,
            "rss_idle_bytes": idle.rss_bytes,
            "rss_connected_bytes": conn_sample.rss_bytes,
            "rss_streaming_bytes": s1.rss_bytes,
            "rss_per_bot_connected_bytes": (conn_sample.rss_bytes - idle.rss_bytes) / max(1, connected),
            "rss_per_bot_streaming_bytes": (s1.rss_bytes - idle.rss_bytes) / max(1, connected),
            "ingest_latency_ms": tap,
            "tap_entries": cres["tap_entries"],
            "tap_gaps": cres["tap_gaps"],
            "commands_written": cmds,
            "commands_received": load["commands_received"],
            "commands_lost": cmds - load["commands_received"],
            "command_latency_ms": cmd_lat,
            "closed_by_server": load["closed_by_server"],
            "errors": "; ".join(e for e in (load["error"], cres["error"]) if e),
        }
    )
    if ph.target == "gateway":
        errors = [rec for rec in list(proc.logs) if rec.get("level") in ("error", "ERROR", "critical")]
        out["gateway_error_logs"] = len(errors)
        out["gateway_first_errors"] = [
            {k: str(v)[:600] for k, v in rec.items() if k in ("msg", "logger", "exc", "error")}
            for rec in errors[:3]
        ]
        out["gateway_dropped"] = _dropped(g2)
        out["gateway_received_total"] = g2.get("audio_frames_received_total", 0.0)
        out["gateway_publish_buffer_bytes_at_window_end"] = g1.get("publish_buffer_bytes", 0.0)
        out["gateway_pipeline"] = _pipeline(g0, g1, window)
        out["gateway_closed"] = {
            k.split("{", 1)[1].rstrip("}"): v
            for k, v in g2.items()
            if k.startswith("connections_closed_total{") and v
        }
    ok = (
        connected == ph.bots
        and not failed
        and lost <= 0
        and load["frames_blocked"] == 0
        and not any(load["closed_by_server"].get(ch) for ch in ("audio", "control"))
    )
    if ph.mode == "realtime":
        ok = ok and (tap["p99"] or 0) < 500 and (out["offered_ratio"] or 0) > 0.98
    if ph.mode == "commands":
        ok = ok and cmds > 0 and out["commands_lost"] == 0 and (cmd_lat["p99"] or 0) < 500
    out["kept_up"] = ok
    if prof is not None:
        out["profile"] = {"ok": prof.ok, "command": prof.message}
        if prof.ok:
            out["profile"].update(pyspy.fold(prof.out.read_text()))
    return out


# -- the run ---------------------------------------------------------------------


def run(
    cfg: Config,
    only: str | None = None,
    limit: bool = True,
    results_dir: Path = RESULTS,
    pin: bool = False,
) -> dict[str, Any]:
    affinity = os.sched_getaffinity(0)
    try:
        return _run(cfg, only, limit, results_dir, pin)
    finally:
        os.sched_setaffinity(0, affinity)


def _run(cfg: Config, only: str | None, limit: bool, results_dir: Path, pin: bool) -> dict[str, Any]:
    results_dir.mkdir(parents=True, exist_ok=True)
    tag = time.strftime("%Y%m%d-%H%M%S") + f"-{cfg.name}"
    result: dict[str, Any] = {
        "meta": {
            "config": cfg.name,
            "started": time.strftime("%Y-%m-%d %H:%M:%S"),
            **git_meta(),
            "python": platform.python_version(),
            "machine": platform.machine(),
            "cpus": os.cpu_count(),
            "load_before": machine_load(),
            "audio_maxlen": cfg.audio_maxlen,
        },
        "limit": [],
        "phases": [],
    }
    cores = pin_cores() if pin else None
    if cores is not None:
        result["meta"]["pinned"] = {"server": sorted(cores[1]), "harness": sorted(cores[0])}
    with RedisServer() as server:
        result["meta"]["redis_version"] = redis.Redis.from_url(server.url).info("server")["redis_version"]
        if limit:
            print(f"[bench] XADD limit: redis-benchmark and redis-py ({cfg.limit_seconds}s each)", flush=True)
            if cores is not None:  # the client on the other core: Redis keeps a core to itself
                os.sched_setaffinity(0, cores[1])
            try:
                result["limit"] = redis_limit.run_all(server.url, seconds=cfg.limit_seconds)
            finally:
                if cores is not None:
                    os.sched_setaffinity(0, cores[0])
        for ph in cfg.phases:
            if only and only not in ph.name:
                continue
            print(f"[bench] {ph.name} {ph.target} bots={ph.bots} frame={ph.frame_ms}ms {ph.mode}", flush=True)
            try:
                row = run_phase(server, cfg, ph, tag, results_dir, None if cores is None else cores[1])
            except Exception as exc:  # one failed phase is reported, the rest still run
                row = {"phase": ph.name, **dataclasses.asdict(ph), "errors": repr(exc)[:500], "failed": True}
            result["phases"].append(row)
            print("[bench]   " + summary_line(row), flush=True)
    result["meta"]["load_after"] = machine_load()
    result["meta"]["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
    path = results_dir / f"{tag}.json"
    path.write_text(json.dumps(result, indent=1))
    (results_dir / f"latest-{cfg.name}.json").write_text(json.dumps(result, indent=1))
    result["meta"]["path"] = str(path)
    return result


def summary_line(row: dict[str, Any]) -> str:
    if row.get("failed"):
        return f"FAILED: {row.get('errors')}"

    def f(v: Any, spec: str = ".0f") -> str:
        return "-" if v is None else format(v, spec)

    return (
        f"offered {f(row['offered_fps'])} f/s (intended {f(row['intended_fps'])}),"
        f" in redis {f(row['redis_fps'])} f/s, server {f(row['server_cores'], '.2f')} cores,"
        f" {f(row['server_cpu_us_per_frame'], '.1f')} us/frame,"
        f" redis {f(row['redis_cpu_us_per_frame'], '.1f')} us/frame, lost {row['frames_lost']},"
        f" cmd p99 {f(row['command_latency_ms']['p99'], '.1f')} ms, ingest p99"
        f" {f(row['ingest_latency_ms']['p99'], '.1f')} ms, loadgen {f(row['loadgen_cores'], '.2f')} cores,"
        f" kept_up={row['kept_up']} closed={row['closed_by_server']}"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Benchmark the gateway against the reference bridge")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--quick", action="store_true", help="small bot counts, about two minutes")
    group.add_argument("--tiny", action="store_true", help="a few seconds: does it run")
    group.add_argument("--bots", type=int, help="one ad-hoc phase with this many bots (see --target etc.)")
    parser.add_argument("--target", choices=["gateway", "reference", "both"], default="both")
    parser.add_argument("--frame-ms", type=int, default=100)
    parser.add_argument("--speakers", type=int, default=1)
    parser.add_argument(
        "--mode",
        choices=["realtime", "flood", "commands"],
        default="realtime",
        help="commands: no audio, only commands (--command-rate)",
    )
    parser.add_argument("--window-s", type=float, default=8.0)
    parser.add_argument("--command-rate", type=float, default=100.0, help="commands per second, all bots")
    parser.add_argument("--ping-s", type=float, help="server keepalive interval and timeout")
    parser.add_argument("--only", help="run only phases whose name contains this")
    parser.add_argument("--processes", type=int, default=2, help="load generator processes")
    parser.add_argument(
        "--group-ms",
        type=float,
        default=5.0,
        help="the generator writes frames in groups this far apart; 0: each bot on its own schedule",
    )
    parser.add_argument("--no-profile", action="store_true", help="skip py-spy")
    parser.add_argument("--no-limit", action="store_true", help="skip the redis-py XADD limit")
    parser.add_argument(
        "--gateway-args", default="", help='extra gateway flags, e.g. "--publish-interval-ms 5"'
    )
    parser.add_argument(
        "--no-pin", action="store_true", help="let the server share all cores with the generator and Redis"
    )
    parser.add_argument(
        "--cpu-quota",
        type=float,
        metavar="CORES",
        help="hold the server to this many cores (cgroup quota; Linux, root)",
    )
    args = parser.parse_args(argv)
    if args.bots:
        targets = ["gateway", "reference"] if args.target == "both" else [args.target]
        cfg = Config(
            "custom",
            [
                Phase(
                    f"{args.mode}-{args.frame_ms}ms",
                    t,
                    args.bots,
                    frame_ms=args.frame_ms,
                    speakers=args.speakers,
                    mode=args.mode,
                    window_s=args.window_s,
                    command_rate_per_s=args.command_rate,
                    ping_s=args.ping_s,
                    profile=not args.no_profile,
                    processes=args.processes,
                    group_ms=args.group_ms,
                )
                for t in targets
            ],
            limit_seconds=1.0,
        )
    else:
        name = "tiny" if args.tiny else "quick" if args.quick else "full"
        cfg = config(name, args.processes, not args.no_profile)
    cfg.gateway_args = shlex.split(args.gateway_args)
    cfg.cpu_quota = args.cpu_quota
    result = run(cfg, args.only, limit=not args.no_limit, pin=not args.no_pin)
    print(f"[bench] results: {result['meta']['path']}")
    from bench.report import render

    print(render(result))


if __name__ == "__main__":
    sys.exit(main())
