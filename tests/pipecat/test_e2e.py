"""The parrot agent through the real gateway, real Redis and simulated bots.

The bot speaks a synthetic voice that Silero takes for speech; the parrot (Silero
VAD in a Pipecat pipeline run by ``PipecatWorker``) says each utterance back. No
timing is asserted beyond generous bounds; the figures are in bench/pipecat_latency.py.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("pipecat")

import redis.asyncio as aioredis

from gateway.testing.bot import SimulatedBot
from tests.conftest import ws_url
from tests.helpers import eventually
from workers import WorkerSettings
from workers.pipecat import MeetstreamTransport
from workers.pipecat.examples import parrot
from workers.pipecat.examples.voice import speak

ROOT = Path(__file__).resolve().parents[2]
LEAD_S = 0.3  # the gateway's default playback lead


def settings(redis_url: str, group: str = "parrot") -> WorkerSettings:
    return WorkerSettings(
        redis_url=redis_url,
        group=group,
        bot_name="Parrot",
        lease_ttl_s=2.0,
        lease_renew_s=0.4,
        claim_interval_s=0.2,
        read_block_ms=200,
        graceful_timeout_s=5.0,
    )


async def test_parrot_hears_speaks_paced_is_barged_in_and_ends_with_the_meeting(gateway, redis_url) -> None:
    """1. a bot joins: its pipeline starts (``on_client_connected``);
    2. Ada speaks 1 s and pauses: the bot receives about that much audio back, paced by the
       gateway (never more than the lead queued at the bot when a chunk arrives);
    3. Ada speaks 2.5 s, and talks over the reply 0.4 s into it: ``interrupt`` reaches the
       bot while the reply still has seconds to go, and nothing of it is sent after;
    4. the bot leaves: the pipeline gets its EndFrame and is gone."""
    agent = parrot.build(settings(redis_url), handle_signals=False)
    events: list[str] = []
    transports: list[MeetstreamTransport] = []
    factory = agent.factory

    def tracking(transport: MeetstreamTransport):  # type: ignore[no-untyped-def]
        transports.append(transport)

        @transport.event_handler("on_client_connected")
        async def _c(_t, _bot) -> None:  # type: ignore[no-untyped-def]
            events.append("connected")

        @transport.event_handler("on_client_disconnected")
        async def _d(_t, _bot) -> None:  # type: ignore[no-untyped-def]
            events.append("disconnected")

        return factory(transport)

    agent.factory = tracking
    bot = SimulatedBot(ws_url(gateway), "bot_parrot")
    await agent.start()
    try:
        await bot.connect()
        await eventually(lambda: events == ["connected"], timeout_s=15)

        # 2. an utterance and its reply
        await speak(bot, "spk-1", "Ada", speech_s=1.0, pause_s=0.2)
        await eventually(lambda: bot.commands("sendaudio"), timeout_s=5)
        await asyncio.sleep(1.6)
        chunks = list(bot.playback.chunks)
        heard_s = sum(c.n for c in chunks) / 48_000
        assert 0.9 <= heard_s <= 1.6, f"the reply should be the utterance (+ pre-roll): {heard_s:.2f} s"
        assert max(bot.playback.queued_s(c.arrived) for c in chunks) <= LEAD_S + 0.12
        assert chunks[-1].arrived - chunks[0].arrived >= heard_s - LEAD_S - 0.2, "sent at once, not paced"

        # 3. barge-in
        before = len(bot.received)
        await speak(bot, "spk-1", "Ada", speech_s=2.5, pause_s=0.0)
        await eventually(lambda: len(bot.commands("sendaudio")) > len(chunks), timeout_s=5, interval_s=0.01)
        reply_start = time.monotonic()
        await asyncio.sleep(0.4)
        await speak(bot, "spk-1", "Ada", speech_s=0.6, pause_s=0.0)
        await eventually(lambda: bot.commands("interrupt"), timeout_s=5, interval_s=0.01)
        [interrupt] = [r for r in bot.received[before:] if r.command["command"] == "interrupt"]
        assert interrupt.at - reply_start < 2.0, "the interrupt came while the 2.5 s reply played"
        cut = [r for r in bot.received if r.command["command"] == "sendaudio" and r.at > interrupt.at]
        assert not [r for r in cut if r.at < interrupt.at + 0.3], "audio after the interrupt"
        assert bot.playback.heard_after_s(interrupt.at + 0.3) == 0 or cut, "Meet bot stops at once"
        assert transports[0].stats.interrupts_sent >= 1

        # 4. the meeting ends
        await bot.close()
        await eventually(lambda: not agent.sessions, timeout_s=10)
        assert events[-1] == "disconnected"
        registry = agent.worker.metrics.registry
        ended = registry.get_sample_value(
            "meetstream_pipecat_pipelines_stopped_total", {"group": "parrot", "how": "ended"}
        )
        assert ended == 1
        assert registry.get_sample_value("meetstream_pipecat_pipelines_running", {"group": "parrot"}) == 0
    finally:
        await bot.close()
        await asyncio.wait_for(agent.stop(), 30)


def start_parrot(redis_url: str, log: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "workers.pipecat.examples.parrot",
            "--redis-url",
            redis_url,
            "--group",
            "parrots",
            "--bot-name",
            "Parrot",
            "--lease-ttl-s",
            "2",
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=open(log, "wb"),
    )


async def test_kill_9_moves_the_pipeline_to_another_instance(gateway, redis_url, tmp_path) -> None:
    """1. two parrot processes of one group; a bot joins and one of them owns it and answers;
    2. ``kill -9`` of that one: the other takes the lease and, though the bot's ``ready``
       was the dead instance's to handle, starts the pipeline at once;
    3. the bot speaks again and hears the new owner's reply."""
    procs = [start_parrot(redis_url, tmp_path / f"parrot{i}.log") for i in range(2)]
    client = aioredis.Redis.from_url(redis_url)
    bot = SimulatedBot(ws_url(gateway), "bot_moved")
    try:
        ids = [p.stdout.readline().decode().split()[1] for p in procs]  # type: ignore[union-attr]
        await bot.connect()
        lease = "meetstream:{bot_moved}:lease:parrots"

        async def owner() -> str | None:
            value = await client.get(lease)
            return value.decode() if value else None

        first = await eventually(owner, timeout_s=20)
        assert first in ids
        await asyncio.sleep(1.5)  # the owner's pipeline starts (pipecat and Silero load)
        await speak(bot, "spk-1", "Ada", speech_s=0.8, pause_s=1.5)
        await eventually(lambda: bot.commands("sendaudio"), timeout_s=10)
        answered = len(bot.commands("sendaudio"))

        procs[ids.index(first)].send_signal(signal.SIGKILL)
        survivor = ids[1 - ids.index(first)]

        async def moved() -> bool:
            return await owner() == survivor

        await eventually(moved, timeout_s=15)
        await asyncio.sleep(1.0)
        await speak(bot, "spk-1", "Ada", speech_s=0.8, pause_s=1.5)
        await eventually(lambda: len(bot.commands("sendaudio")) > answered, timeout_s=10)
        journal = await client.xrange("meetstream:workers:parrots:journal")
        starts = [f[b"instance"].decode() for _, f in journal if f[b"type"] == b"start"]
        assert starts == [first, survivor]
    finally:
        await bot.close()
        await client.aclose()
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
