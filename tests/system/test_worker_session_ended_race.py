"""Reproduction, found by the day: a worker forgets a bot that is still in its meeting
when the old gateway's ``session_ended`` lands after the bot has already reconnected to
another gateway.

At the end of a drain, gateway A closes both of a bot's channels with 1012; the bot
reconnects them to gateway B within ~0.1 s, and B writes ``connected`` for each; A
writes ``disconnected`` and ``session_ended`` once its own handlers are done, which can
be later. The SDK takes ``session_ended`` for the end of the meeting whatever came
before it: the runner stops (``session_ended``) as soon as one non-blocking read finds
nothing new, and ``_forget`` (workers/worker.py) drops the bot from the group's registry
unless an event *newer* than ``session_ended`` exists; B's ``connected`` events are older,
and discovery has already read them. The bot is never claimed again: in one CI-size day
three bots streamed for 13 s more, 1,765 frames and 6 chat questions, with no worker.
``session_ended`` is per gateway (PROTOCOL.md: "the meeting is over for this gateway").

1. A worker owns a bot connected to gateway A.
2. The bot's events, in this order: A ``disconnected`` (control), B ``connected``
   (control and audio, also on the global stream), A ``disconnected`` (audio) and A
   ``session_ended``; no audio for a moment, then frames again, on B.
3. The bot must be handled again within 10 s (it is live on B). It never was, before
   events said which gateway ended the session.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
import redis.asyncio as aioredis

from gateway.keys import KeySpace
from tests.helpers import eventually
from tests.workers.conftest import fast_settings
from workers import AudioFrame, Bot, Worker

pytestmark = pytest.mark.system

KEYS = KeySpace()
BOT = "bot_race"


async def event(client: aioredis.Redis, type_: str, channel: str, **extra: Any) -> None:
    """An event as the gateway writes it (lifecycle ones on the global stream too)."""
    fields: dict[Any, Any] = {
        "type": type_,
        "bot_id": BOT,
        "channel": channel,
        "ts": int(time.time() * 1000),
        **extra,
    }
    await client.xadd(KEYS.bot(BOT).events, fields)
    await client.xadd(KEYS.global_events, fields)


async def frame(client: aioredis.Redis, conn: str, seq: int) -> None:
    await client.xadd(
        KEYS.bot(BOT).audio,
        {
            "speaker_id": "s1",
            "speaker_name": "Ada",
            "pcm": b"\x00\x00" * 960,
            "sample_rate": 48000,
            "seq": seq,
            "conn": conn,
            "ts": int(time.time() * 1000),
        },
    )


async def test_a_bot_back_on_another_gateway_before_the_old_one_ends_its_session_stays_handled(
    redis_url: str, redis_client: aioredis.Redis
) -> None:
    worker = Worker(fast_settings(redis_url), handle_signals=False)
    handled: list[tuple[str, int]] = []

    @worker.on_audio
    async def heard(bot: Bot, f: AudioFrame) -> None:
        handled.append((f.conn, f.seq))

    keys = KEYS.bot(BOT).as_fields()
    await worker.start()
    try:
        for channel, conn in (("control", "a1"), ("audio", "a2")):
            await event(redis_client, "connected", channel, conn=conn, gateway="A", **keys)
        for seq in range(5):
            await frame(redis_client, "a2", seq)
        await eventually(lambda: ("a2", 4) in handled, 10)
        # The drain's end on A, the bot already back on B, A's session_ended last.
        await event(redis_client, "disconnected", "control", conn="a1", code=1012, reason="", gateway="A")
        await event(redis_client, "connected", "control", conn="b1", gateway="B", **keys)
        await event(redis_client, "connected", "audio", conn="b2", gateway="B", **keys)
        await event(redis_client, "disconnected", "audio", conn="a2", code=1012, reason="", gateway="A")
        await event(redis_client, "session_ended", "control", gateway="A")
        await asyncio.sleep(1.0)  # the bot's audio resumes after its reconnect
        for seq in range(50):
            await frame(redis_client, "b2", seq)
            await asyncio.sleep(0.02)
        await eventually(lambda: ("b2", 49) in handled, 10)
    finally:
        await asyncio.wait_for(worker.stop(), 30)
