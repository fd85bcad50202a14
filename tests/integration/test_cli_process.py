"""The console script as a user runs it: no Redis URL, so an embedded redis-server.

1. Start ``meetstream-gateway --port 0`` with no Redis configured.
2. It logs that it started an embedded redis-server, then where it listens.
3. A simulated bot connects, streams, and receives a command.
4. SIGTERM: the process drains (no bots left), exits 0, and its redis-server is gone.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from gateway.embedded_redis import free_port
from gateway.testing.bot import SimulatedBot, Speaker
from tests.helpers import eventually


def _read_logs_until(proc, predicate, timeout_s=20.0):
    lines = []
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line:
            if proc.poll() is not None:
                break
            continue
        lines.append(line)
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if predicate(record):
            return record, lines
    raise AssertionError("log line not seen; got:\n" + "".join(lines))


async def test_console_script_runs_on_embedded_redis_and_stops_on_sigterm():
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEETSTREAM_")}
    metrics_port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "gateway.cli",
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--metrics-port",
            str(metrics_port),
            "--drain-timeout-s",
            "5",
        ],
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
        env=env,
    )
    try:
        embedded, _ = await asyncio.to_thread(
            _read_logs_until, proc, lambda r: "embedded redis-server" in r["msg"]
        )
        redis_port = int(embedded["redis_url"].rsplit(":", 1)[1].split("/")[0])
        listening, _ = await asyncio.to_thread(
            _read_logs_until, proc, lambda r: r["msg"] == "gateway listening"
        )
        port = listening["port"]
        bot = SimulatedBot(f"ws://127.0.0.1:{port}", "cli_bot")
        await bot.connect()
        await bot.stream_speech([Speaker("s", "Ada")], 0.3, realtime=False)
        import redis.asyncio as aioredis

        client = aioredis.Redis(port=redis_port)
        await client.xadd(
            f"meetstream:{{c{_shard('cli_bot'):02d}}}:cli_bot:commands",
            {"json": '{"command":"sendmsg","message":"hi"}'},
        )
        assert (await bot.next_command(timeout=10, after=0))["message"] == "hi"

        # Audio is written asynchronously (batched): it lands within a round trip or two.
        async def stored() -> bool:
            return await client.xlen("meetstream:{cli_bot}:audio") == 3

        await eventually(stored, 5, 0.05)
        await client.aclose()
        await bot.close()
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(proc.wait, 30) == 0
        # The embedded redis-server went with it.
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", redis_port), timeout=1).close()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _shard(bot_id: str) -> int:
    from gateway.keys import command_shard

    return command_shard(bot_id, 16)


@pytest.mark.parametrize(
    ("argv", "env_secret"),
    [(["run", "--auth-secret", " , "], None), (["--port", "0"], ","), (["run"], " ,\t, ")],
    ids=["flag", "env", "env_tab"],
)
def test_cli_refuses_to_start_with_a_secret_of_only_commas(argv, env_secret):
    """``$NEW,$OLD`` with both unset: one clear line, exit 2, before anything starts (no Redis)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEETSTREAM_")}
    if env_secret is not None:
        env["MEETSTREAM_AUTH_SECRET"] = env_secret
    done = subprocess.run(
        [sys.executable, "-m", "gateway.cli", *argv],
        capture_output=True,
        text=True,
        env=env,
        timeout=30,
    )
    assert done.returncode == 2, done.stderr
    assert done.stderr.splitlines() == [
        "meetstream-gateway: auth_secret has no secret in it (only commas or spaces): "
        "set one, or leave it empty to disable auth"
    ]
