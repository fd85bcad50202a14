"""The Node.js worker (``workers/node``), written from docs/PROTOCOL.md alone, against the
real gateway, real Redis and a simulated bot: the proof that the contract is language-neutral."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from gateway.testing.bot import SimulatedBot, Speaker
from tests.conftest import ws_url

NODE_DIR = Path(__file__).resolve().parents[2] / "workers" / "node"

pytestmark = pytest.mark.skipif(
    shutil.which("node") is None or shutil.which("npm") is None,
    reason="node and npm are not installed: the Node.js worker cannot run here",
)


@pytest.fixture(scope="module")
def node_worker_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of workers/node with its locked dependencies installed by ``npm ci``."""
    target = tmp_path_factory.mktemp("node-worker")
    for name in ("package.json", "package-lock.json", "worker.js"):
        shutil.copy(NODE_DIR / name, target / name)
    subprocess.run(
        ["npm", "ci", "--no-audit", "--no-fund", "--loglevel=error"],
        cwd=target,
        check=True,
        timeout=180,
        capture_output=True,
    )
    return target


async def _line(proc: asyncio.subprocess.Process, timeout_s: float) -> dict:
    assert proc.stdout is not None
    raw = await asyncio.wait_for(proc.stdout.readline(), timeout_s)
    assert raw, "the node worker exited"
    return json.loads(raw)


async def test_node_worker_greets_and_counts(gateway, redis_url, node_worker_dir):
    """1. start the Node worker; 2. a bot joins: it is greeted (JSON ``sendmsg``);
    3. the bot streams 1 s from two speakers: the worker posts its counts (MessagePack ``sendchat``);
    4. the bot leaves: the worker reports 20 frames and both speakers."""
    proc = await asyncio.create_subprocess_exec(
        "node",
        "worker.js",
        "--max-bots",
        "1",
        "--report-every-s",
        "0.3",
        cwd=node_worker_dir,
        stdout=asyncio.subprocess.PIPE,
        env={
            "PATH": os.environ["PATH"],
            "MEETSTREAM_REDIS_URL": redis_url,
            "MEETSTREAM_WORKER_GROUP": "node",
        },
    )
    try:
        assert (await _line(proc, 20))["ready"] is True
        bot = SimulatedBot(ws_url(gateway), "bot_node")
        await bot.connect()
        greeting = await bot.next_command(timeout=10)
        assert greeting["command"] == "sendmsg" and "Node.js" in greeting["message"]
        await bot.stream_speech([Speaker("s1", "Ada"), Speaker("s2", "Grace", 330)], 1.0, realtime=False)
        deadline = asyncio.get_running_loop().time() + 10
        while not any(
            "20 audio frames from 2 speaker" in c.get("text", "") for c in bot.commands("sendchat")
        ):
            assert asyncio.get_running_loop().time() < deadline, f"no count in chat: {bot.commands()}"
            await asyncio.sleep(0.1)
        await bot.close()
        report = await _line(proc, 15)
        assert report == {"bot_id": "bot_node", "frames": 20, "speakers": ["Ada", "Grace"]}
        assert await asyncio.wait_for(proc.wait(), 10) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
