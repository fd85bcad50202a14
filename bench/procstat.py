"""What a process spent: CPU time from the kernel (not wall time), RSS; Redis's INFO deltas.

Also the reference bridge as a child process, started and stopped like ``GatewayProcess``.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Any

import psutil
import redis

from gateway.embedded_redis import free_port, terminate


@dataclass(frozen=True)
class ProcSample:
    at: float  # time.time()
    cpu_s: float  # user + system, this process only
    rss_bytes: int
    system_s: float = 0.0  # the kernel's part of cpu_s (syscalls, and loopback TCP work done for us)
    # Times the main thread (the event loop's) went to sleep for want of work: each is a
    # wake-up, paid for whatever it then finds to do. 0 where the kernel does not say.
    wakeups: int = 0


def loop_wakeups(pid: int) -> int:
    """Voluntary context switches of the process's main thread (Linux), else 0."""
    try:
        with open(f"/proc/{pid}/task/{pid}/status") as f:
            for line in f:
                if line.startswith("voluntary_ctxt_switches:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def sample(pid: int) -> ProcSample:
    p = psutil.Process(pid)
    t = p.cpu_times()
    return ProcSample(time.time(), t.user + t.system, p.memory_info().rss, t.system, loop_wakeups(pid))


def machine_load() -> dict[str, Any]:
    load1, load5, load15 = os.getloadavg()
    return {
        "loadavg_1m": load1,
        "loadavg_5m": load5,
        "loadavg_15m": load15,
        "cpus": psutil.cpu_count(),
        "cpu_percent_1s": psutil.cpu_percent(interval=1.0),
    }


def cpu_busy_total() -> float:
    """CPU seconds the whole machine spent busy (all processes, all cores), for 'who else ran'."""
    t = psutil.cpu_times()
    return t.user + t.system + getattr(t, "nice", 0.0) + getattr(t, "irq", 0.0) + getattr(t, "softirq", 0.0)


@dataclass(frozen=True)
class RedisSample:
    at: float
    cpu_s: float  # used_cpu_user + used_cpu_sys
    xadd_calls: int
    xadd_usec: int
    xack_calls: int
    xread_calls: int
    used_memory: int
    clients: int


def redis_sample(r: redis.Redis) -> RedisSample:
    cpu = r.info("cpu")
    stats = r.info("commandstats")
    mem = r.info("memory")
    clients = r.info("clients")

    def calls(cmd: str, field: str = "calls") -> int:
        return int(stats.get(f"cmdstat_{cmd}", {}).get(field, 0))

    return RedisSample(
        time.time(),
        float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"]),
        calls("xadd"),
        calls("xadd", "usec"),
        calls("xack"),
        calls("xread") + calls("xreadgroup"),
        int(mem["used_memory"]),
        int(clients["connected_clients"]),
    )


def wait_port(port: int, timeout_s: float, proc: subprocess.Popen[Any] | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening on {port}")
        try:
            with socket.create_connection(("127.0.0.1", port), 0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listening on 127.0.0.1:{port} after {timeout_s}s")


class BridgeProcess:
    """``python -m bench.reference_bridge`` on a free loopback port."""

    def __init__(self, redis_url: str, *args: str) -> None:
        self.port = free_port()
        self.redis_url = redis_url
        self.args = list(args)
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 20.0) -> BridgeProcess:
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "bench.reference_bridge",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--redis-url",
                self.redis_url,
                *self.args,
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
        )
        wait_port(self.port, timeout_s, self.proc)
        return self

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None:
            terminate(proc, 15)
