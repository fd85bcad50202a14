"""Every series the dashboard and the alerts use moves under a short real load.

``test_crosscheck`` proves each series *exists*; a gauge nobody sets exists too,
and reads 0 forever (``publish_buffer_bytes`` did: the "Publish buffer" panel
showed nothing while audio waited on a paused Redis). Here a real gateway on a
redis-server of the test's own, an SDK worker group in-process and simulated bots
run for a few seconds, with the faults some series only show under provoked:

1. bots join, speak (one speaker has the bot's own name), send chat text; the
   worker greets each, plays it a short utterance, and fails on chat messages;
2. a command that fails validation, and requests for paths that do not exist;
3. the event loop is blocked a few times (as too much work would): overload;
4. Redis is frozen (SIGSTOP of the test's own redis-server, at most 1.5 s) while
   bots stream and chat: buffers fill, audio sockets pause, the control buffer
   (held small) drops and its log lines are suppressed;
5. every client connection is killed (CLIENT KILL): Redis errors;
6. bots leave, one worker stops (hands its bots back), the other takes them.

A counter or histogram moves if it grew; a gauge if it was ever non-zero, read
every 20 ms throughout.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import redis.asyncio as aioredis
from prometheus_client import CollectorRegistry

from gateway.embedded_redis import RedisServer
from gateway.testing.bot import SimulatedBot, Speaker
from tests.conftest import running_gateway, ws_url
from tests.deploy.conftest import RenderedChart
from tests.deploy.promql import metric_names
from tests.deploy.test_crosscheck import _dashboard_expressions
from workers import Worker, WorkerSettings
from workers.bot import Bot, Event

BOT_NAME = "Series Bot"
SLOW = asyncio.Event()  # set while the worker's audio handler is slow
#: Series this test does not move, and why. Open: no test moves this one yet.
COVERED_ELSEWHERE = {
    # A repeated seq needs a batch that landed and was sent again (a write timeout
    # after Redis took it): 10 s of frozen Redis per provocation, too long here.
    "meetstream_worker_audio_seq_repeats_total": "none yet",
}


#: On no panel, but an operator's only sign that the log holds back lines.
ALSO_MOVE = {"meetstream_gateway_log_lines_suppressed_total"}


def _used_series(render: RenderedChart) -> set[str]:
    exprs = _dashboard_expressions()
    for group in ("meetstream-gateway", "meetstream-workers"):
        exprs += [rule["expr"] for rule in render.rule_group(group)["rules"]]
    return set().union(*(metric_names(e) for e in exprs))


def _family(sample_name: str) -> str:
    for suffix in ("_bucket", "_count", "_sum"):
        if sample_name.endswith(suffix):
            return sample_name[: -len(suffix)]
    return sample_name


class Watch:
    """Reads every sample of the registries every 20 ms: the growth and the peaks."""

    def __init__(self, registries: list[CollectorRegistry]) -> None:
        self.registries = registries
        self.first: dict[str, float] = {}
        self.last: dict[str, float] = {}
        self.peak: dict[str, float] = {}
        self.kinds: dict[str, str] = {}

    def _samples(self) -> Iterator[tuple[str, str, float]]:
        for registry in self.registries:
            for family in registry.collect():
                for sample in family.samples:
                    yield family.type, sample.name, sample.value

    def read(self) -> None:
        totals: dict[str, float] = {}
        for kind, name, value in self._samples():
            self.kinds[name] = kind
            if kind == "gauge":
                self.peak[name] = max(self.peak.get(name, 0.0), abs(value))
            totals[name] = totals.get(name, 0.0) + value
        for name, value in totals.items():
            self.first.setdefault(name, value)
            self.last[name] = value

    async def run(self, stop: asyncio.Event) -> None:
        for _ in range(3000):  # 60 s at most
            self.read()
            if stop.is_set():
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.02)

    def moved(self, name: str) -> bool:
        if self.kinds.get(name) == "gauge":
            return self.peak.get(name, 0.0) > 0
        return self.last.get(name, 0.0) > self.first.get(name, 0.0)


def _worker(redis_url: str, instance: str) -> Worker:
    worker = Worker(
        WorkerSettings(
            redis_url=redis_url,
            group="series",
            instance_id=instance,
            bot_name=BOT_NAME,
            lease_ttl_s=2.0,
            lease_renew_s=0.5,
            claim_interval_s=0.25,
            lag_sample_s=0.2,
        ),
        handle_signals=False,
    )
    tone = (np.sin(np.arange(32_000) / 10) * 8000).astype(np.int16)  # 2 s: more than the lead

    @worker.on_ready
    async def greet(bot: Bot, event: Event) -> None:
        await bot.chat("hello")
        await bot.say(tone, 16_000)

    @worker.on_message
    async def fail(bot: Bot, event: Event) -> None:
        raise RuntimeError("a handler that fails, on purpose")

    @worker.on_audio
    async def listen(bot: Bot, frame: Any) -> None:
        if SLOW.is_set():  # a slow consumer: the group falls behind the audio
            await asyncio.sleep(0.005)

    return worker


async def _until(watch: Watch, name: str, also: Any = None, timeout_s: float = 10.0) -> None:
    """Wait (bounded) until ``name`` moved, or ``also()`` holds when given."""
    for _ in range(int(timeout_s / 0.05)):
        watch.read()
        if also() if also is not None else watch.moved(name):
            return
        await asyncio.sleep(0.05)


def _owned(worker: Worker) -> float:
    return sum(
        s.value for f in worker.metrics.registry.collect() for s in f.samples if s.name.endswith("bots_owned")
    )


def _get(port: int, path: str) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return exc.code


async def _chat(bot: SimulatedBot, n: int) -> None:
    for i in range(n):
        await bot.send_control_json({"type": "message", "bot_id": bot.bot_id, "message": f"chat {i} " * 20})


async def test_every_dashboard_and_alert_series_moves_under_load(all_on_render: RenderedChart) -> None:
    used = _used_series(all_on_render)
    assert any(n.startswith("meetstream_gateway_") for n in used)
    assert any(n.startswith("meetstream_worker_") for n in used)
    speakers = [Speaker("spk-1", "Ada", 220), Speaker("spk-self", BOT_NAME, 330)]
    with RedisServer() as server:
        assert server.process is not None
        overrides = dict(
            overload_lag_s=0.1,
            max_frames_per_s=100_000,
            publish_backpressure_bytes=64 << 10,
            publish_control_buffer_bytes=4 << 10,
        )
        async with running_gateway(server.url, **overrides) as gw:
            workers = [_worker(server.url, "w-1"), _worker(server.url, "w-2")]
            watch = Watch([gw.metrics.registry, *(w.metrics.registry for w in workers)])
            stop = asyncio.Event()
            watcher = asyncio.create_task(watch.run(stop))
            client = aioredis.Redis.from_url(server.url)
            bots = [SimulatedBot(ws_url(gw), f"series-{i}", record_sent=False) for i in range(3)]
            stopped: set[int] = set()
            try:
                # 1. bots join; one worker takes them all, a second joins and is handed some
                await workers[0].start()
                for bot in bots:
                    await bot.connect()
                await _until(
                    watch,
                    "meetstream_worker_bots_owned",
                    lambda: _owned(workers[0]) == 3,
                )
                await workers[1].start()
                await _until(watch, "meetstream_worker_bots_handed_over_total")
                # they speak (one speaker has the bot's own name), chat, and a burst outruns the worker
                await asyncio.gather(*(b.stream_speech(speakers, 1.0) for b in bots))
                await asyncio.gather(*(_chat(b, 3) for b in bots))
                SLOW.set()
                await asyncio.gather(*(b.stream_speech(speakers, 10.0, realtime=False) for b in bots))
                await _until(watch, "meetstream_worker_stream_lag_entries")
                SLOW.clear()
                for _ in range(100):  # the greeting and the utterance reach every bot (10 s at most)
                    if all(b.commands("sendmsg") for b in bots):
                        break
                    await asyncio.sleep(0.1)
                # 2. a command the gateway refuses; paths it does not serve
                await client.xadd(
                    gw.keyspace.bot("series-0").commands, {"json": json.dumps({"command": "nope"})}
                )
                for _ in range(8):
                    assert await asyncio.to_thread(_get, gw.port, "/not-a-bot-path") in (400, 404)
                # 3. the loop blocked, as too much work would block it
                speaking = asyncio.gather(*(b.stream_speech(speakers, 1.0) for b in bots))
                for _ in range(6):
                    time.sleep(0.15)  # noqa: ASYNC251 - blocking the loop is the point
                    await asyncio.sleep(0.03)
                await speaking
                # 4. Redis frozen while bots stream and chat
                server.process.send_signal(signal.SIGSTOP)
                stopped.add(server.process.pid)
                try:
                    frozen = asyncio.gather(*(b.stream_speech(speakers, 1.0) for b in bots))
                    await asyncio.gather(*(_chat(b, 40) for b in bots))
                    await asyncio.wait_for(frozen, 5)
                    await asyncio.sleep(0.3)
                finally:
                    server.process.send_signal(signal.SIGCONT)
                    stopped.clear()
                # 5. every client connection cut
                admin = aioredis.Redis.from_url(server.url, single_connection_client=True)
                try:
                    await admin.client_kill_filter(_type="normal", skipme=True)
                finally:
                    await admin.aclose()
                await asyncio.gather(*(b.stream_speech(speakers, 0.5) for b in bots))
                assert await gw.publisher.flush(15)
                # 6. bots leave; one worker hands its bots back, the other takes them
                await workers[0].stop()
                await _until(watch, "meetstream_worker_takeovers_total")
                for bot in bots:
                    await bot.close()
                await _until(watch, "meetstream_worker_bots_stopped_total")
            finally:
                if stopped:  # a failure while frozen: never leave Redis stopped
                    server.process.send_signal(signal.SIGCONT)
                for bot in bots:
                    await bot.close()
                for worker in workers:
                    await worker.stop()
                stop.set()
                await watcher
                await client.aclose()
            watch.read()
    series = {_family(name) for name in watch.kinds}
    missing = {n for n in used if _family(n) not in series}
    assert not missing, f"used by a dashboard or alert, not exported: {sorted(missing)}"
    still = sorted(n for n in used | ALSO_MOVE if n not in COVERED_ELSEWHERE and not watch.moved(n))
    assert not still, f"never moved under load: {still}"


@pytest.mark.parametrize("name", sorted(COVERED_ELSEWHERE))
def test_series_left_to_other_tests_are_still_used(all_on_render: RenderedChart, name: str) -> None:
    """The exemption list holds only series that a dashboard or alert still uses."""
    assert name in _used_series(all_on_render)
