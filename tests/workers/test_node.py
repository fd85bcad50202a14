"""The Node.js worker (``workers/node``), written from docs/PROTOCOL.md alone, against the
real gateway, real Redis and a simulated bot: the proof that the contract is language-neutral."""

from __future__ import annotations

import asyncio
import json
import os

from gateway.testing.bot import SimulatedBot, Speaker
from tests.conftest import ws_url
from tests.workers.conftest import needs_node

pytestmark = needs_node


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
