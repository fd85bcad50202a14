"""The publisher against a real redis-server: pipelined batches keep every bot's
order, stay within the configured depth, survive a connection killed mid-flight,
and a publisher that dies takes the gateway down loudly instead of serving on."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis
from prometheus_client import CollectorRegistry

from gateway.app import Gateway
from gateway.embedded_redis import RedisServer
from gateway.exceptions import InternalTaskFailed
from gateway.keys import KeySpace
from gateway.metrics import Metrics
from gateway.protocol import AudioFrame
from gateway.publisher import Publisher
from gateway.redis_conn import RawConnection, RedisBackend, connect
from tests.conftest import gateway_settings, running_gateway
from tests.helpers import eventually

BOTS = ("pub_a", "pub_b", "pub_c")


@pytest.fixture
async def backend(redis_url: str) -> AsyncIterator[RedisBackend]:
    b = await connect(gateway_settings(redis_url), redis_url)
    yield b
    await b.close()


def _publisher(backend: RedisBackend, redis_url: str, **overrides: object) -> tuple[Publisher, KeySpace]:
    settings = gateway_settings(redis_url, audio_maxlen=100_000, audio_stream_max_bytes=1 << 30, **overrides)
    keyspace = KeySpace(settings.key_prefix, settings.command_shards)
    return Publisher(backend, keyspace, settings, Metrics(CollectorRegistry())), keyspace


async def _seqs(client: aioredis.Redis, key: str) -> list[int]:
    return [int(fields[b"seq"]) for _, fields in await client.xrange(key)]


async def test_pipelined_batches_keep_each_bots_order_within_the_depth(
    backend: RedisBackend, redis_url: str, redis_client: aioredis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    publisher, keyspace = _publisher(
        backend, redis_url, publish_batch_max=40, publish_pipeline_depth=3, publish_interval_ms=0.1
    )
    on_wire: list[int] = []
    submit = RawConnection.submit

    def spy(self: RawConnection, payload: bytes, replies: int) -> asyncio.Future:
        future = submit(self, payload, replies)
        on_wire.append(len(self._link.pending))  # type: ignore[union-attr]
        return future

    monkeypatch.setattr(RawConnection, "submit", spy)
    publisher.start()
    per_bot = 1500
    for seq in range(per_bot):
        for bot in BOTS:
            frame = AudioFrame("s1", "Ada", seq.to_bytes(4, "big") * 240)
            publisher.audio(keyspace.bot(bot), frame, seq, b"c")
        if seq % 100 == 0:
            await asyncio.sleep(0)  # let the writer run while frames keep coming
    assert await publisher.flush(30)
    await publisher.close(5)
    for bot in BOTS:
        assert await _seqs(redis_client, keyspace.bot(bot).audio) == list(range(per_bot))
    assert max(on_wire) > 1, "batches were never pipelined"
    assert max(on_wire) <= 3, f"more batches on the wire than the depth allows: {max(on_wire)}"


async def test_a_connection_killed_mid_pipeline_loses_nothing_and_keeps_order(
    backend: RedisBackend, redis_url: str, redis_client: aioredis.Redis
) -> None:
    publisher, keyspace = _publisher(
        backend, redis_url, publish_batch_max=25, publish_pipeline_depth=4, publish_interval_ms=0.1
    )
    publisher.start()
    keys = keyspace.bot("pub_killed")
    total, kills = 3000, 0
    for seq in range(total):
        publisher.audio(keys, AudioFrame("s1", "Ada", bytes(960)), seq, b"c")
        if seq % 50 == 0:
            await asyncio.sleep(0)
        if seq in (800, 1900):
            # Kill the publisher's socket while batches are on the wire.
            kills += await redis_client.execute_command("CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes")
    assert await publisher.flush(30)
    await publisher.close(5)
    assert kills >= 2
    seqs = await _seqs(redis_client, keys.audio)
    assert set(seqs) == set(range(total)), "accepted frames were lost"
    # At least once: a batch that landed before the kill may land again, but a
    # retry never lets a later frame overtake an earlier one that had not landed.
    firsts = sorted(set(seqs), key=seqs.index)
    assert firsts == list(range(total))
    assert publisher.healthy


async def test_a_publisher_that_dies_stops_the_gateway_loudly(
    redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    gw = Gateway(gateway_settings(redis_url), CollectorRegistry())
    run = asyncio.create_task(gw.run())
    await eventually(lambda: gw.publisher is not None and gw.bots is not None, 10, 0.05)
    assert gw.publisher is not None and gw.bots is not None

    def broken() -> list:
        raise RuntimeError("bug in the writer")

    gw.publisher._take_batch = broken  # type: ignore[method-assign]
    gw.publisher.event(gw.keyspace.bot("pub_dead"), "message", "control", data="{}")
    with (
        caplog.at_level(logging.CRITICAL, logger="gateway.app"),
        pytest.raises(InternalTaskFailed, match="publisher"),
    ):
        await asyncio.wait_for(run, 30)
    assert any("internal task ended" in r.getMessage() for r in caplog.records)
    assert gw.ws_server is not None and not gw.ws_server.is_serving()


async def test_a_redis_that_stops_answering_is_given_up_on_and_nothing_is_lost() -> None:
    """Redis frozen (SIGSTOP) mid-stream: the health loop's check gives up on the
    unanswered batch after the write timeout, and once Redis answers again every
    frame is there, in order."""
    with RedisServer() as server:
        backend = await connect(gateway_settings(server.url), server.url)
        publisher, keyspace = _publisher(backend, server.url)
        publisher._raw_timeout_s = 0.5
        publisher.start()
        keys = keyspace.bot("pub_frozen")
        client = aioredis.Redis.from_url(server.url)
        assert server.process is not None
        stalls = 0
        try:
            for seq in range(200):
                publisher.audio(keys, AudioFrame("s1", "Ada", bytes(960)), seq, b"c")
                if seq == 50:
                    server.process.send_signal(signal.SIGSTOP)
                if seq == 150:
                    server.process.send_signal(signal.SIGCONT)
                await asyncio.sleep(0.01)
                stalls += publisher.check_stalled()  # as the health loop does
            assert await publisher.flush(20)
            assert stalls >= 1
            # The batch given up on may still land (Redis reads it from its socket once
            # thawed) and is sent again: at least once, and in order of first arrival.
            seqs = await _seqs(client, keys.audio)
            assert sorted(set(seqs), key=seqs.index) == list(range(200))
        finally:
            server.process.send_signal(signal.SIGCONT)
            await publisher.close(5)
            await client.aclose()
            await backend.close()


async def test_the_gateway_freezes_its_startup_objects_and_times_every_collection(redis_url: str) -> None:
    """Start-up objects are moved out of the collector's sight, and a collection
    shows in meetstream_gateway_gc_pause_seconds (the loop stops for each)."""
    import gc

    gc.unfreeze()  # earlier gateways in this process froze theirs
    assert gc.get_freeze_count() == 0
    async with running_gateway(redis_url) as gw:
        assert gc.get_freeze_count() > 10_000  # modules, settings, clients: all long-lived
        sample = "meetstream_gateway_gc_pause_seconds_count"
        before = gw.metrics.registry.get_sample_value(sample, {"generation": "2"}) or 0
        gc.collect()
        after = gw.metrics.registry.get_sample_value(sample, {"generation": "2"})
        assert after == before + 1


def test_the_writer_waits_once_per_batch_on_uvloops_millisecond_clock(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """uvloop's clock ticks in whole milliseconds: a writer that waits "until the
    interval is over" spins through zero-delay timers for up to a millisecond
    before every batch (it did: ~20 wake-ups per batch, a quarter of the CPU at
    light load). Counted, not timed: timer waits against batches written."""
    uvloop = pytest.importorskip("uvloop")

    async def main() -> tuple[int, int, list[int]]:
        backend = await connect(gateway_settings(redis_url), redis_url)
        publisher, keyspace = _publisher(backend, redis_url, publish_interval_ms=2)
        waits = batches = 0
        real_sleep, take = asyncio.sleep, publisher._take_batch

        async def counted_sleep(delay: float) -> None:
            nonlocal waits
            if asyncio.current_task() is publisher.task:
                waits += 1
            await real_sleep(delay)

        def counted_take() -> list:
            nonlocal batches
            batches += 1
            return take()

        monkeypatch.setattr(publisher, "_take_batch", counted_take)
        monkeypatch.setattr(asyncio, "sleep", counted_sleep)
        try:
            publisher.start()
            keys = keyspace.bot("pub_tick")
            for seq in range(200):  # a frame a millisecond, as 100 bots at 100 ms send
                publisher.audio(keys, AudioFrame("s1", "Ada", b"\0" * 320), seq, b"c")
                await real_sleep(0.001)
            assert await publisher.flush(10)
        finally:
            monkeypatch.undo()
            await publisher.close(5)
        client = aioredis.from_url(redis_url)
        seqs = await _seqs(client, keys.audio)
        await client.aclose()
        await backend.close()
        return waits, batches, seqs

    waits, batches, seqs = uvloop.run(main())
    assert seqs == list(range(200))
    assert batches >= 20, "frames were not spread over several batches"
    assert waits <= batches + 1, f"{waits} timer waits for {batches} batches: the writer spins"
