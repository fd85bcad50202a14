"""Found by the day, fixed in 2c9307b: a handler that is running when its instance loses a
bot's lease must not go on acting for the bot after another instance has taken it over.

In the day (CI size, after the SDK's discovery fix), a Redis primary was SIGKILLed while
instance w2 was answering a chat question: its XADD waited for the dead node. Its lease
renewal, one pipeline for all its bots, failed as a whole (so every one of its six
bots' leases lapsed, though five lived on healthy nodes); w3 took the bots 3.5 s after the
kill and answered the same question; 0.35 s later w2's handler, still running, wrote its
answer and an utterance too. Two instances acted for one bot at once; the bot heard two
answers. ``BotRunner._process`` (workers/runner.py) checks the lease before it *starts*
each entry, but nothing stops a handler already running, and ``Bot.send`` writes whatever
the lease says.

1. One worker (2 s lease) owns a bot; the bot asks something; the handler blocks (as on a
   write to a dead node).
2. The lease is lost: another instance's name is in it (as after an expiry and a take).
3. The handler resumes and sends a chat message: it must not reach the bot (the handler
   cancelled, or the command refused). Before the fix it did.
"""

from __future__ import annotations

import asyncio

import pytest
import redis.asyncio as aioredis

from gateway.app import Gateway
from gateway.testing.bot import SimulatedBot
from tests.conftest import ws_url
from tests.workers.conftest import eventually, fast_settings, running
from workers import Bot, Event, Worker

pytestmark = pytest.mark.system


async def test_a_handler_cannot_act_for_a_bot_after_its_lease_is_lost(
    gateway: Gateway, redis_url: str, redis_client: aioredis.Redis
) -> None:
    worker = Worker(fast_settings(redis_url), handle_signals=False)
    gate = asyncio.Event()
    blocked = asyncio.Event()

    @worker.on_message
    async def slow_answer(bot: Bot, event: Event) -> None:
        blocked.set()
        await gate.wait()  # a write waiting for a dead node
        await bot.chat("late")

    async with running(worker), SimulatedBot(ws_url(gateway), "bot_fence") as bot:
        await eventually(lambda: "bot_fence" in worker.bots, what="the bot owned")
        await bot.send_control_json({"type": "chat", "text": "question"})
        await asyncio.wait_for(blocked.wait(), 10)
        await redis_client.set("meetstream:{bot_fence}:lease:test", "another-instance", px=10_000)
        await asyncio.sleep(2.0)  # well past a renewal (0.4 s) and the local validity (1.6 s)
        gate.set()
        await asyncio.sleep(2.0)
        assert "late" not in [c.get("message") for c in bot.commands("sendmsg")]
