"""deploy/compose.yaml brought up for real by Compose (Debian's docker-compose 1.29)."""

from __future__ import annotations

import copy
import json
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import yaml

from gateway.embedded_redis import free_port
from tests.image.conftest import WHEELS, report
from tests.image.engine import ROOT, DockerEngine, run, which

pytestmark = [pytest.mark.image, pytest.mark.timeout(600)]

COMPOSE = ROOT / "deploy" / "compose.yaml"
GREETING = "Hello! I'm here and listening."  # workers/examples/greeter.py


def on_host_network(spec: dict[str, Any], redis_port: int, port: int, metrics_port: int) -> dict[str, Any]:
    """The stack moved onto the host network, on loopback and ports of the test's own (no
    traffic may leave loopback here): each service in network_mode host, nothing published,
    service names replaced by 127.0.0.1, and the build offline. The rest is the file's own."""
    spec = copy.deepcopy(spec)
    services = spec["services"]
    for service in services.values():
        service["network_mode"] = "host"
        service.pop("ports", None)
    redis_url = f"redis://127.0.0.1:{redis_port}/0"
    gateway_url = f"ws://127.0.0.1:{port}"

    def replaced(value: Any, old: str, new: str) -> Any:
        text = json.dumps(value)
        assert old in text, f"{old} not in {value}: compose.yaml changed shape, update this test"
        return json.loads(text.replace(old, new))

    services["redis"]["command"] += ["--bind", "127.0.0.1", "--port", str(redis_port)]
    services["redis"]["healthcheck"]["test"] = replaced(
        services["redis"]["healthcheck"]["test"], '"redis-cli"', f'"redis-cli", "-p", "{redis_port}"'
    )
    gateway = services["gateway"]
    gateway["build"].update(context=str(ROOT), network="none")
    gateway["environment"] = replaced(gateway["environment"], "redis://redis:6379/0", redis_url)
    gateway["environment"].update(
        MEETSTREAM_HOST="127.0.0.1",
        MEETSTREAM_PORT=str(port),
        MEETSTREAM_METRICS_HOST="127.0.0.1",
        MEETSTREAM_METRICS_PORT=str(metrics_port),
    )
    gateway["healthcheck"]["test"] = replaced(gateway["healthcheck"]["test"], ":9108/", f":{metrics_port}/")
    services["greeter"]["environment"] = replaced(
        services["greeter"]["environment"], "redis://redis:6379/0", redis_url
    )
    services["bot"]["command"] = replaced(services["bot"]["command"], "ws://gateway:8765", gateway_url)
    return spec


class Stack:
    """One compose project, brought down (containers and networks removed) by :meth:`down`."""

    def __init__(self, engine: DockerEngine, file: Path, env: dict[str, str], redis_port: int) -> None:
        self.engine = engine
        self.redis_port = redis_port
        self.project = f"mstest{uuid.uuid4().hex[:8]}"
        self.args = [which("docker-compose") or "docker-compose", "-f", str(file), "-p", self.project]
        self.env = {**engine.env, **env}

    def compose(self, *args: str, timeout_s: float = 120) -> str:
        return run([*self.args, *args], timeout_s, env=self.env).stdout

    def container(self, service: str) -> dict[str, Any]:
        cid = self.compose("ps", "-q", service).strip()
        return json.loads(self.engine.docker("inspect", cid))[0]

    def logs(self, service: str) -> str:
        return self.compose("logs", "--no-color", service, timeout_s=30)

    def leftovers(self) -> list[str]:
        label = f"label=com.docker.compose.project={self.project}"
        return (
            self.engine.docker("ps", "-aq", "--filter", label).split()
            + self.engine.docker("network", "ls", "-q", "--filter", label).split()
        )


def wait_for(check: Callable[[], Any], timeout_s: float, what: str) -> Any:
    deadline = time.monotonic() + timeout_s
    while not (result := check()):
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout_s}s")
        time.sleep(0.25)
    return result


@pytest.fixture
def stack(
    engine: DockerEngine, standin_base: str, redis_image: str, wheelhouse: Path, tmp_path: Path
) -> Iterator[Stack]:
    redis_port, port, metrics_port = free_port(), free_port(), free_port()
    spec = on_host_network(yaml.safe_load(COMPOSE.read_text()), redis_port, port, metrics_port)
    file = tmp_path / "compose.yaml"
    file.write_text(yaml.safe_dump(spec, sort_keys=False))
    env = {
        "GATEWAY_IMAGE": "meetstream-gateway:compose-test",
        "PYTHON_IMAGE": standin_base,
        "WHEELS": str(WHEELS.relative_to(ROOT)),
        "REDIS_IMAGE": redis_image,
    }
    stack = Stack(engine, file, env, redis_port)
    try:
        yield stack
    finally:
        stack.compose("down", "--volumes", "--remove-orphans", "--timeout", "10", timeout_s=120)


def test_stack_comes_up_greets_the_bot_stores_its_audio_and_stops_cleanly(stack: Stack):
    """1. `up --build`: Compose builds the image (offline) and starts redis, then the gateway
       once redis is healthy, the greeter once the gateway is healthy, then the bot.
    2. The greeter's chat message reaches the bot; the bot's audio is in Redis.
    3. `stop`: every container exits 0, none killed at the end of its grace period (137);
       `down` then leaves no container and no network behind.
    """
    start = time.monotonic()
    stack.compose("up", "--detach", "--build", timeout_s=400)
    up_s = time.monotonic() - start
    wait_for(
        lambda: stack.container("gateway")["State"].get("Health", {}).get("Status") == "healthy",
        60,
        "gateway healthy",
    )
    wait_for(lambda: GREETING in stack.logs("bot"), 60, "the greeter's message at the bot")
    client = redis.Redis(host="127.0.0.1", port=stack.redis_port)
    try:
        frames = wait_for(lambda: client.xlen("meetstream:{demo}:audio"), 20, "the bot's audio in Redis")
    finally:
        client.close()
    start = time.monotonic()
    stack.compose("stop", timeout_s=120)
    stop_s = time.monotonic() - start
    exits = {s: stack.container(s)["State"]["ExitCode"] for s in ("bot", "greeter", "gateway", "redis")}
    report("compose", up_s=f"{up_s:.1f}", frames=frames, stop_s=f"{stop_s:.1f}", exits=exits)
    assert exits == {"bot": 0, "greeter": 0, "gateway": 0, "redis": 0}
    assert stop_s < 20  # the bot's grace period is 5 s, the gateway's 40 s: none was waited out
    stack.compose("down", "--volumes", timeout_s=60)
    assert stack.leftovers() == []
