"""The gateway image run the way the Helm chart runs it, on the host network, on loopback."""

from __future__ import annotations

import contextlib
import json
import time
import urllib.error
import urllib.request
import uuid
from typing import Any

from gateway.embedded_redis import free_port
from tests.image.engine import DockerEngine

# The chart's securityContext, as docker flags: runAsUser/runAsGroup 10001,
# readOnlyRootFilesystem with an emptyDir on /tmp, no privilege escalation,
# every capability dropped (Docker's default seccomp profile is RuntimeDefault).
CHART_FLAGS = (
    "--read-only",
    "--tmpfs", "/tmp",
    "--cap-drop", "ALL",
    "--security-opt", "no-new-privileges",
    "--user", "10001:10001",
)  # fmt: skip


def http_get(url: str, timeout_s: float = 2.0) -> tuple[int, str]:
    """(status, body); (0, error) when nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()
    except OSError as err:
        return 0, str(err)


class GatewayContainer:
    """``docker run`` of the image's default command (the gateway) with ``CHART_FLAGS``."""

    def __init__(self, engine: DockerEngine, image: str, redis_url: str, **env: str) -> None:
        self.engine = engine
        self.image = image
        self.name = f"meetstream-test-{uuid.uuid4().hex[:8]}"
        self.port = free_port()
        self.metrics_port = free_port()
        self.env = {
            # Host network: bind loopback only, on ports of this test's own.
            "MEETSTREAM_HOST": "127.0.0.1",
            "MEETSTREAM_PORT": str(self.port),
            "MEETSTREAM_METRICS_HOST": "127.0.0.1",
            "MEETSTREAM_METRICS_PORT": str(self.metrics_port),
            "MEETSTREAM_REDIS_URL": redis_url,
            "MEETSTREAM_LOG_FORMAT": "text",
            "MEETSTREAM_COMMAND_BLOCK_MS": "1000",
            **env,
        }
        self.started = False

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    def http_get(self, path: str) -> tuple[int, str]:
        return http_get(f"http://127.0.0.1:{self.metrics_port}{path}")

    def start(self, timeout_s: float = 30.0) -> GatewayContainer:
        """Run it and wait until /readyz answers 200 (Redis reached)."""
        env_args = [a for k, v in self.env.items() for a in ("--env", f"{k}={v}")]
        self.engine.docker(
            "run", "--detach", "--name", self.name, "--network", "host", *CHART_FLAGS, *env_args, self.image
        )
        self.started = True
        deadline = time.monotonic() + timeout_s
        while self.http_get("/readyz")[0] != 200:
            if not self.inspect()["State"]["Running"]:
                raise RuntimeError(f"gateway container exited:\n{self.logs()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"gateway container not ready after {timeout_s}s:\n{self.logs()}")
            time.sleep(0.1)
        return self

    def inspect(self) -> dict[str, Any]:
        return json.loads(self.engine.docker("inspect", self.name))[0]

    def logs(self) -> str:
        with contextlib.suppress(Exception):
            return self.engine.docker("logs", "--tail", "60", self.name, timeout_s=10)
        return "(no logs)"

    def exec(self, *args: str) -> str:
        return self.engine.docker("exec", self.name, *args, timeout_s=30)

    def stop(self, grace_s: int) -> float:
        """``docker stop`` (SIGTERM, SIGKILL after ``grace_s``); seconds it took."""
        start = time.monotonic()
        self.engine.docker("stop", "--time", str(grace_s), self.name, timeout_s=grace_s + 30)
        return time.monotonic() - start

    def remove(self) -> None:
        if self.started:
            self.engine.docker("rm", "--force", self.name, timeout_s=60)
            self.started = False
