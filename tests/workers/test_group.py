"""A worker group in one process: discovery of bots that came first, balance by hand-back,
the journal, the member set, settings from the environment and the metrics endpoint."""

from __future__ import annotations

import asyncio
from collections import Counter

import pytest

from gateway.embedded_redis import free_port
from gateway.testing.bot import SimulatedBot, Speaker
from tests.conftest import ws_url
from tests.workers.conftest import eventually, running, scrape_metrics
from workers import AudioFrame, Bot, Event, LeaseLost, Worker, WorkerSettings


async def test_bots_connected_before_the_group_started_are_found(gateway, worker_settings):
    """1. two bots connect and stream 1 s; 2. only then the group's first instance starts;
    3. it owns both and handles every frame from seq 0 (discovery read back the global
    stream, never from ``$``)."""
    bots = [await SimulatedBot(ws_url(gateway), f"early_{i}").connect() for i in range(2)]
    try:
        for b in bots:
            await b.stream_speech([Speaker("s1", "Ada")], 1.0, realtime=False)
        worker = Worker(worker_settings(), handle_signals=False)
        seen: dict[str, list[int]] = {}
        worker.on_audio(lambda bot, frame: seen.setdefault(bot.bot_id, []).append(frame.seq))
        async with running(worker):
            await eventually(lambda: sorted(worker.bots) == ["early_0", "early_1"], what="both owned")
            await eventually(lambda: all(len(seen.get(b.bot_id, [])) == 10 for b in bots), what="frames")
        assert seen == {"early_0": list(range(10)), "early_1": list(range(10))}
    finally:
        for b in bots:
            await b.close()


async def test_a_new_instance_gets_its_share_by_hand_back_with_nothing_skipped_or_repeated(
    gateway, worker_settings, redis_client
):
    """1. instance a owns four streaming bots alone; 2. b joins: a hands two back, one per
    balance step, and b takes them at once; 3. every frame was handled exactly once (a clean
    hand-back acknowledges what it handled); 4. the journal shows each hand-back as a ``stop``
    (released) before the other's ``start``."""
    handled: Counter[tuple[str, str, int]] = Counter()

    def build() -> Worker:
        w = Worker(worker_settings(balance_step_s=0.3), handle_signals=False)

        @w.on_audio
        async def note(bot: Bot, frame: AudioFrame) -> None:
            handled[(bot.bot_id, frame.conn, frame.seq)] += 1

        return w

    a, b = build(), build()
    ids = [f"bal_{i}" for i in range(4)]
    bots = [await SimulatedBot(ws_url(gateway), i, record_sent=False).connect() for i in ids]
    streaming = [asyncio.create_task(x.stream_speech([Speaker("s1", "Ada")], 5.0)) for x in bots]
    try:
        async with running(a):
            await eventually(lambda: sorted(a.bots) == ids, what="a owns all four")
            async with running(b):
                await eventually(lambda: len(a.bots) == len(b.bots) == 2, timeout_s=8, what="2 and 2")
                assert a.stats.bots_handed_over == 2 and b.stats.bots_handed_over == 0
                await asyncio.gather(*streaming)
                await eventually(lambda: len(handled) == 4 * 50, timeout_s=10, what="every frame")
    finally:
        for x in bots:
            await x.close()
    assert set(handled.values()) == {1}, "a frame was handled twice across a clean hand-back"
    journal = [
        {k.decode(): v.decode() for k, v in f.items()}
        for _, f in await redis_client.xrange("meetstream:workers:test:journal")
    ]
    moved = {r["bot_id"] for r in journal if r["type"] == "start" and r["instance"] == b.instance_id}
    assert len(moved) == 2
    for bot_id in moved:
        rows = [r for r in journal if r.get("bot_id") == bot_id]
        kinds = [(r["type"], r["instance"], r.get("reason")) for r in rows]
        handoff = kinds.index(("stop", a.instance_id, "released"))
        assert kinds[handoff + 1] == ("start", b.instance_id, None)
    assert next(r["type"] for r in journal if r["instance"] == a.instance_id) == "hello"


async def test_members_join_on_start_and_leave_on_stop(gateway, worker_settings, redis_client):
    a = Worker(worker_settings(), handle_signals=False)
    key = "meetstream:workers:test:instances"
    async with running(a):
        assert await redis_client.zrange(key, 0, -1) == [a.instance_id.encode()]
    assert await redis_client.zrange(key, 0, -1) == []


def test_settings_from_the_environment():
    s = WorkerSettings.from_env(
        {
            "MEETSTREAM_WORKER_GROUP": "g1",
            "MEETSTREAM_WORKER_INSTANCE": "w-7",
            "MEETSTREAM_LEASE_TTL_S": "2",
            "MEETSTREAM_CLAIM_INTERVAL_S": "0.25",
            "MEETSTREAM_WORKER_METRICS_PORT": "9109",
            "MEETSTREAM_CONFORMANCE": "1",
            "MEETSTREAM_REDIS_CLUSTER": "yes",
        }
    )
    assert s.redis_cluster == "yes"  # the gateway's variable: one deployment setting for both
    assert (s.group, s.instance_id, s.lease_ttl_s, s.lease_renew_s) == ("g1", "w-7", 2.0, 0.4)
    assert (s.claim_interval_s, s.metrics_port, s.conformance) == (0.25, 9109, True)
    # A flag (override) wins; a long lease keeps the default renewal.
    assert WorkerSettings.from_env({}, lease_ttl_s=30.0).lease_renew_s == 1.0
    assert WorkerSettings.from_env({"MEETSTREAM_CONFORMANCE": "0"}).conformance is False


async def test_metrics_are_served_and_lag_is_seen_before_it_costs_frames(gateway, worker_settings):
    """1. a worker with a metrics port and a handler slower than the audio; 2. a bot writes 200
    frames at once; 3. /metrics shows the bot owned, entries handled, handler time, and how many
    audio entries the worker is behind the head (by seq) while it catches up; 4. no gap."""
    port = free_port()
    worker = Worker(
        worker_settings(metrics_port=port, metrics_host="127.0.0.1", lag_sample_s=0.1, read_count=16),
        handle_signals=False,
    )
    done: list[int] = []

    @worker.on_audio
    async def slow(bot: Bot, frame: AudioFrame) -> None:
        await asyncio.sleep(0.01)
        done.append(frame.seq)

    g = (("group", "test"),)
    lags: list[float] = []
    async with running(worker), SimulatedBot(ws_url(gateway), "bot_lag", record_sent=False) as bot:
        await bot.stream_speech([Speaker("s1", "Ada")], 20.0, realtime=False)  # 200 frames at once
        while len(done) < 200:
            lags.append(
                (await asyncio.to_thread(scrape_metrics, port)).get(
                    ("meetstream_worker_stream_lag_entries", (*g, ("stream", "audio"))), 0.0
                )
            )
            await asyncio.sleep(0.1)
        await asyncio.sleep(0.3)
        m = await asyncio.to_thread(scrape_metrics, port)
    assert m[("meetstream_worker_bots_owned", g)] == 1
    assert m[("meetstream_worker_bots_started_total", g)] == 1
    assert m[("meetstream_worker_entries_handled_total", (*g, ("stream", "audio")))] == 200
    assert m[("meetstream_worker_handler_seconds_count", (*g, ("stream", "audio")))] == 200
    assert m[("meetstream_worker_audio_seq_gaps_total", g)] == 0
    assert m[("meetstream_worker_group_members", g)] == 1
    assert max(lags) >= 50, f"lag never seen: {lags}"
    assert m[("meetstream_worker_stream_lag_entries", (*g, ("stream", "audio")))] == 0
    assert ("meetstream_worker_bots_stopped_total", (*g, ("reason", "lease_lost"))) in m


async def test_a_handler_cannot_act_for_a_bot_after_its_lease_is_lost(gateway, worker_settings, redis_client):
    """The day's overlap (tests/system/test_worker_lease_fencing.py): 1. a handler blocks (as
    on a write to a dead node); 2. another instance's name gets into the lease; 3. the handler
    is cancelled when the renewal finds the lease lost, and had it gone on, its command would
    have been refused: the late chat never reaches the bot, and the bot is let go (lease_lost)."""
    worker = Worker(worker_settings(), handle_signals=False)
    gate, blocked = asyncio.Event(), asyncio.Event()
    outcome: list[str] = []
    stops: list[str] = []

    @worker.on_message
    async def slow_answer(bot: Bot, event: Event) -> None:
        blocked.set()
        try:
            await gate.wait()
        except asyncio.CancelledError:
            outcome.append("cancelled")
            raise
        await bot.chat("late")
        outcome.append("sent")

    worker.on_bot_stop(lambda bot, reason: stops.append(reason))
    async with running(worker), SimulatedBot(ws_url(gateway), "bot_fence") as bot:
        await eventually(lambda: "bot_fence" in worker.bots, what="the bot owned")
        await bot.send_control_json({"type": "chat", "text": "question"})
        await asyncio.wait_for(blocked.wait(), 10)
        await redis_client.set("meetstream:{bot_fence}:lease:test", "another-instance", px=10_000)
        await eventually(lambda: stops == ["lease_lost"], timeout_s=3, what="the bot let go")
        gate.set()
        await asyncio.sleep(0.5)
    assert outcome == ["cancelled"]
    assert "late" not in [c.get("message") for c in bot.commands("sendmsg")]


async def test_commands_are_refused_once_the_lease_may_have_lapsed():
    """The fence itself, for a handler that runs on while renewals cannot reach Redis (the
    renewal loop is stuck too, so nothing cancels it): nothing is written, LeaseLost is raised."""
    written: list[object] = []

    class Client:
        async def xadd(self, *args: object, **kwargs: object) -> bytes:
            written.append(args)
            return b"1-0"

    owned = [True]
    bot = Bot("b", "meetstream:{c01}:b:commands", Client(), _owned=lambda: owned[0])
    await bot.chat("while owned")
    owned[0] = False
    with pytest.raises(LeaseLost):
        await bot.chat("after")
    with pytest.raises(LeaseLost):
        await bot.say(b"\x00\x00" * 480, 48_000)
    assert len(written) == 1


async def test_a_bot_that_left_while_being_claimed_is_released_not_handled(
    gateway, worker_settings, redis_client
):
    """The race a mixed group once lost in CI: 1. a owns a bot, which leaves; a reads it dry,
    forgets it and releases its lease; 2. b's claim round had read the registry before a forgot
    the bot (here: b is fed that stale registry every round), so b finds the lease free and wins
    it; 3. b must release it at once: its session_ended is handled already, and an owner that
    started now would wait on its streams for good and never stop with session_ended."""
    a = Worker(worker_settings(), handle_signals=False)
    bot = await SimulatedBot(ws_url(gateway), "leaver").connect()
    registry_key = "meetstream:workers:test:bots"
    try:
        async with running(a):
            await eventually(lambda: list(a.bots) == ["leaver"], what="a owns the bot")
            stale = await redis_client.hgetall(registry_key)
            await bot.close()
            await eventually(lambda: not a.bots, what="a lets the bot go")
    finally:
        await bot.close()
    assert b"leaver" in stale and not await redis_client.hexists(registry_key, "leaver")

    b = Worker(worker_settings(), handle_signals=False)
    async with running(b):
        await eventually(lambda: b._conns is not None, what="b connected")
        assert b._conns is not None
        client = b._conns.client

        async def stale_registry(key: str) -> dict[bytes, bytes]:
            return dict(stale) if key == registry_key else await client.__class__.hgetall(client, key)

        client.hgetall = stale_registry  # type: ignore[method-assign]
        await asyncio.sleep(10 * b.settings.claim_interval_s)
        assert not b.bots
    journal = [
        {k.decode(): v.decode() for k, v in f.items()}
        for _, f in await redis_client.xrange("meetstream:workers:test:journal")
    ]
    starts = [r["instance"] for r in journal if r["type"] == "start" and r["bot_id"] == "leaver"]
    assert starts == [a.instance_id], "b started a bot whose meeting was over"
    assert not await redis_client.exists("meetstream:{leaver}:lease:test")


async def test_a_new_owner_sees_the_bot_as_it_is_ready_and_taken_over(gateway, worker_settings):
    """1. a bot is ready before the group starts: a's on_bot_start already sees it ready;
    2. a stops (hands it back); 3. b's on_bot_start sees it ready and taken over, though
    the ready was a's to handle (a Pipecat runner starts its pipeline right there)."""
    bot = await SimulatedBot(ws_url(gateway), "handed").connect()
    seen: list[tuple[str, bool, bool]] = []

    def build() -> Worker:
        w = Worker(worker_settings(), handle_signals=False)

        @w.on_bot_start
        async def started(b: Bot) -> None:
            seen.append((w.instance_id, b.ready, b.taken_over))

        return w

    a, b = build(), build()
    try:
        async with running(a):
            await eventually(lambda: "handed" in a.bots and a.bots["handed"].ready, what="a saw ready")
        async with running(b):
            await eventually(lambda: "handed" in b.bots, what="b owns it")
    finally:
        await bot.close()
    assert seen == [(a.instance_id, True, False), (b.instance_id, True, True)]


async def test_a_bot_whose_meeting_ended_before_it_was_taken_is_let_go_once(
    gateway, worker_settings, redis_client
):
    """An owner died after handling a bot's session_ended and before forgetting it: the bot
    is still in the group's registry (here: put back by hand). The next owner reads the
    state back, sees the meeting over, lets the bot go with session_ended and forgets it:
    taken once, not waited on for good (the old behaviour) nor taken again and again."""
    registry_key = "meetstream:workers:test:bots"
    a = Worker(worker_settings(), handle_signals=False)
    bot = await SimulatedBot(ws_url(gateway), "gone").connect()
    try:
        async with running(a):
            await eventually(lambda: "gone" in a.bots, what="a owns it")
            await bot.close()
            await eventually(lambda: not a.bots, what="a lets it go")
    finally:
        await bot.close()
    await redis_client.hset(registry_key, "gone", gateway.keyspace.bot("gone").commands)

    b = Worker(worker_settings(), handle_signals=False)
    async with running(b):
        await eventually(lambda: b.stats.bots_stopped["session_ended"] >= 1, what="b lets it go")
        await asyncio.sleep(10 * b.settings.claim_interval_s)
        assert b.stats.bots_started == 1 and not b.bots
    assert not await redis_client.hexists(registry_key, "gone")
