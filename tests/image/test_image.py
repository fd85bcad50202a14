"""The built image, run as the Helm chart runs it: unprivileged, probed, streaming, drained."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator

import pytest
import redis.asyncio as aioredis
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from gateway.embedded_redis import RedisServer
from gateway.keys import KeySpace
from gateway.protocol import AudioFrame
from gateway.testing.bot import SimulatedBot, Speaker, tone
from tests.helpers import eventually
from tests.image.conftest import report
from tests.image.containers import GatewayContainer
from tests.image.engine import DockerEngine

pytestmark = [pytest.mark.image, pytest.mark.timeout(600)]


@pytest.fixture(scope="module")
def gateway(engine: DockerEngine, image: str, redis_server: RedisServer) -> Iterator[GatewayContainer]:
    container = GatewayContainer(engine, image, redis_server.url)
    try:
        yield container.start()
    finally:
        container.remove()


def test_runs_unprivileged_on_a_read_only_root(engine: DockerEngine, image: str, gateway: GatewayContainer):
    """The gateway process has uid/gid 10001, no capability at all, no_new_privs, and
    cannot write outside /tmp; the image's own user is numeric, for runAsNonRoot."""
    assert json.loads(engine.docker("image", "inspect", "--format", "{{json .Config.User}}", image)) == (
        "10001:10001"
    )
    status = dict(
        line.split(":", 1) for line in gateway.exec("cat", "/proc/1/status").splitlines() if ":" in line
    )
    assert status["Uid"].split() == ["10001"] * 4 and status["Gid"].split() == ["10001"] * 4
    for caps in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
        assert int(status[caps], 16) == 0, (caps, status[caps])
    assert status["NoNewPrivs"].strip() == "1"
    assert "meetstream-gateway" in gateway.exec("cat", "/proc/1/cmdline").replace("\0", " ")
    probe = "import sys\ntry: open(sys.argv[1], 'w')\nexcept OSError as e: print(e.errno)\nelse: print(0)"
    assert gateway.exec("python", "-c", probe, "/opt/venv/written").strip() == "30"  # EROFS
    assert gateway.exec("python", "-c", probe, "/tmp/written").strip() == "0"
    host = gateway.inspect()["HostConfig"]
    assert host["ReadonlyRootfs"] and host["CapDrop"] == ["ALL"] and host["NetworkMode"] == "host"


def test_probes_answer_on_the_metrics_port(gateway: GatewayContainer):
    assert gateway.http_get("/healthz")[0] == 200
    assert gateway.http_get("/readyz")[0] == 200
    status, metrics = gateway.http_get("/metrics")
    assert status == 200 and "meetstream_gateway_bots_connected" in metrics


async def test_bot_streams_through_the_container_into_redis_and_gets_a_workers_command(
    gateway: GatewayContainer, redis_server: RedisServer
):
    """1. A simulated bot joins the gateway in the container and talks for a second.
    2. Every frame it sent is in its audio stream in Redis (a redis-server on the host).
    3. A worker writes a command into the bot's command stream: the bot receives it.
    """
    keys = KeySpace().bot("img_bot")
    client = aioredis.Redis.from_url(redis_server.url)
    try:
        async with SimulatedBot(gateway.url, "img_bot") as bot:
            sent = await bot.stream_speech([Speaker("spk-1", "Ada")], seconds=1)
            await eventually(lambda: _xlen(client, keys.audio, sent), 10)
            entries = await client.xrange(keys.audio)
            assert [e[b"pcm"] for _, e in entries] == [f.pcm for f in bot.sent_frames]
            command = {"command": "sendmsg", "message": "hello from a worker"}
            await client.xadd(keys.commands, {"json": json.dumps(command)})
            received = await bot.next_command(timeout=10)
            assert received["command"] == "sendmsg" and received["message"] == "hello from a worker"
    finally:
        await client.aclose()


async def _xlen(client: aioredis.Redis, key: str, expected: int) -> bool:
    return await client.xlen(key) >= expected


async def test_docker_stop_drains_then_closes_with_1012_and_exits_0(
    engine: DockerEngine, image: str, redis_server: RedisServer
):
    """1. A bot streams audio into a gateway container (drain time 3 s, grace period 30 s).
    2. `docker stop`: /readyz turns 503 and new bots get HTTP 503 at once.
    3. The bot already there keeps streaming through the drain, then is closed with 1012.
    4. The container exits 0 well within its grace period; every frame it took is in Redis.
    """
    grace_s, drain_s = 30, 3
    container = GatewayContainer(engine, image, redis_server.url, MEETSTREAM_DRAIN_TIMEOUT_S=str(drain_s))
    container.start()
    try:
        bot = SimulatedBot(container.url, "img_drain", record_sent=False)
        await bot.connect()
        sent = 0

        async def stream() -> None:
            nonlocal sent
            start = time.monotonic()
            while bot.audio is not None and bot.audio.close_code is None and time.monotonic() - start < 20:
                try:
                    await bot.send_frame(AudioFrame("s", "Ada", tone(300, 960, sent * 960)))
                except Exception:
                    break
                sent += 1
                await asyncio.sleep(0.01)

        streaming = asyncio.create_task(stream())
        await asyncio.sleep(0.5)
        stopping = asyncio.create_task(asyncio.to_thread(container.stop, grace_s))
        await eventually(lambda: container.http_get("/readyz")[0] == 503, 5)
        with pytest.raises(InvalidStatus) as err:
            async with connect(f"{container.url}/img_new/control"):
                pass
        assert err.value.response.status_code == 503
        sent_at_sigterm = sent
        await asyncio.wait_for(streaming, 25)
        assert sent - sent_at_sigterm > 100  # it kept working during the drain
        assert bot.audio is not None and bot.audio.close_code == 1012
        await eventually(lambda: bot.control is not None and bot.control.close_code == 1012, 5)
        took_s = await asyncio.wait_for(stopping, grace_s + 30)
        state = container.inspect()["State"]
        report("docker stop", exit_code=state["ExitCode"], took_s=f"{took_s:.1f}", sent=sent)
        assert state["ExitCode"] == 0 and not state["OOMKilled"]
        assert drain_s <= took_s < grace_s
        await bot.close()
    finally:
        container.remove()
    client = aioredis.Redis.from_url(redis_server.url)
    entries = await client.xrange(KeySpace().bot("img_drain").audio)
    await client.aclose()
    stored = {int(f[b"seq"]) for _, f in entries}
    # A frame in flight when the socket closed may not have reached the gateway;
    # every frame it took is in Redis.
    assert stored == set(range(len(stored)))
    assert sent - 2 <= len(stored) <= sent
