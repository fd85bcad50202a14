"""The real gateway, a real redis-server, and the simulated Meetstream bot."""

from __future__ import annotations

import asyncio
import json
import subprocess
import time

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from gateway.embedded_redis import find_redis_binary
from gateway.protocol import AudioFrame
from gateway.testing.bot import SimulatedBot, Speaker
from tests.conftest import running_gateway, ws_url
from tests.helpers import events_of, eventually


def sample(gw, name, **labels):
    value = gw.metrics.registry.get_sample_value(name, labels or None)
    return value or 0.0


async def test_two_speakers_every_frame_arrives_in_order_byte_identical(gateway, redis_client):
    speakers = [Speaker("spk-1", "Ada", 220), Speaker("spk-2", "Grace", 330)]
    async with SimulatedBot(ws_url(gateway), "bot_two") as bot:
        sent = await bot.stream_speech(speakers, seconds=3, frame_ms=100, realtime=False)
        keys = gateway.keyspace.bot("bot_two")
        await eventually(lambda: redis_client.xlen(keys.audio), 10)
        await eventually(lambda: _xlen_is(redis_client, keys.audio, sent), 10)
        entries = await redis_client.xrange(keys.audio)
    assert sent == 60
    assert len(entries) == sent
    conns = {f[b"conn"] for _, f in entries}
    assert len(conns) == 1
    for i, ((_, fields), frame) in enumerate(zip(entries, bot.sent_frames, strict=True)):
        assert fields[b"seq"] == str(i).encode()
        assert fields[b"speaker_id"].decode() == frame.speaker_id
        assert fields[b"speaker_name"].decode() == frame.speaker_name
        assert fields[b"pcm"] == frame.pcm
        assert fields[b"sample_rate"] == b"48000"
        assert abs(int(fields[b"ts"]) - time.time() * 1000) < 60_000
    assert sample(gateway, "meetstream_gateway_audio_frames_received_total") == sent
    await eventually(
        lambda: sample(gateway, "meetstream_gateway_stream_entries_published_total", kind="audio") == sent
    )


async def _xlen_is(client, key, n):
    return await client.xlen(key) == n


async def test_redis_cli_command_reaches_bot_as_vendor_json(gateway):
    async with SimulatedBot(ws_url(gateway), "bot_cli") as bot:
        await eventually(
            lambda: (
                gateway.bots.registry.get("bot_cli") and gateway.bots.registry.get("bot_cli").control.ready
            )
        )
        keys = gateway.keyspace.bot("bot_cli")
        cli = find_redis_binary("redis-cli")
        port = gateway.redis_url.rsplit(":", 1)[1].split("/")[0]
        subprocess.run(
            [
                cli,
                "-p",
                port,
                "XADD",
                keys.commands,
                "MAXLEN",
                "~",
                "1000",
                "*",
                "json",
                '{"command":"sendmsg","message":"Hello from the bot!"}',
            ],
            check=True,
            capture_output=True,
            timeout=10,
        )
        command = await bot.next_command(timeout=10, after=0)
    assert command == {
        "command": "sendmsg",
        "bot_id": "bot_cli",
        "message": "Hello from the bot!",
        "msg": "Hello from the bot!",
    }


async def test_bad_command_is_rejected_and_next_good_one_delivered(gateway, redis_client):
    async with SimulatedBot(ws_url(gateway), "bot_bad") as bot:
        keys = gateway.keyspace.bot("bot_bad")
        bad_id = await redis_client.xadd(
            keys.commands, {"json": '{"command":"sendaudio","audiochunk":"AAAA"}'}
        )
        good = {"command": "sendchat", "role": "assistant", "text": "ok", "is_final": True}
        await redis_client.xadd(keys.commands, {"json": json.dumps(good)})
        received = await bot.next_command(timeout=10, after=0)
        assert received == {**good, "bot_id": "bot_bad"}
        events = await eventually(lambda: _rejections(redis_client, keys.events), 10)
    assert events[0]["reason"] == "missing_field"
    assert events[0]["detail"] == "sample_rate is required"
    assert events[0]["entry_id"] == bad_id.decode()
    assert events[0]["command"] == "sendaudio"
    assert len(bot.received) == 1
    assert (
        sample(
            gateway, "meetstream_gateway_commands_rejected_total", command="sendaudio", reason="missing_field"
        )
        == 1
    )
    assert sample(gateway, "meetstream_gateway_commands_delivered_total", command="sendchat") == 1
    # Both entries are acknowledged: nothing stays pending for redelivery.
    await eventually(lambda: _pending(redis_client, keys.commands, 0))


async def _rejections(client, key):
    return [e for e in await events_of(client, key) if e["type"] == "command_rejected"]


async def _pending(client, stream, n):
    info = await client.xpending(stream, "gateway")
    return info["pending"] == n


async def test_commands_keep_stream_order(gateway, redis_client):
    async with SimulatedBot(ws_url(gateway), "bot_order") as bot:
        keys = gateway.keyspace.bot("bot_order")
        for i in range(200):
            await redis_client.xadd(
                keys.commands, {"json": json.dumps({"command": "sendmsg", "message": str(i)})}
            )
        await bot.wait_commands(200, timeout=20)
    assert [c["message"] for c in bot.commands()] == [str(i) for i in range(200)]


async def test_a_command_for_an_idle_bot_is_written_in_the_readers_turn(gateway, redis_client, monkeypatch):
    """The reader writes a command to an idle bot itself instead of waking the bot's
    sender task for it: one turn of the event loop less, and under load a turn is a
    pass over every ready socket (command p99 at 500 bots x 20 ms: 4.4-4.7 ms
    against 4.8-5.2 ms). Order and acks are as before (the other tests here)."""
    from gateway.ws_fast_path import BotWebSocket

    by_reader: list[str] = []
    by_sender: list[object] = []
    send_now, send = BotWebSocket.send_now, BotWebSocket.send

    def spy_send_now(self, text):
        by_reader.append(text)
        send_now(self, text)

    async def spy_send(self, message, *args, **kwargs):
        by_sender.append(message)
        await send(self, message, *args, **kwargs)

    monkeypatch.setattr(BotWebSocket, "send_now", spy_send_now)
    monkeypatch.setattr(BotWebSocket, "send", spy_send)
    async with SimulatedBot(ws_url(gateway), "bot_fast") as bot:
        keys = gateway.keyspace.bot("bot_fast")
        for i in range(3):
            command = {"command": "sendmsg", "message": str(i)}
            await redis_client.xadd(keys.commands, {"json": json.dumps(command)})
            assert (await bot.next_command(timeout=10, after=i))["message"] == str(i)
        pending = await eventually(lambda: _pending_is(redis_client, keys.commands, 0))
    assert pending
    assert [json.loads(text)["message"] for text in by_reader] == ["0", "1", "2"]
    assert by_sender == []


async def test_a_command_written_in_the_readers_turn_is_acked_with_its_next_read(
    gateway, redis_client, monkeypatch
):
    """No round trip (and no wake-up for its reply) of the ack's own: it goes out in the
    same write as the shard's next XREADGROUP, not through the publisher."""
    via_publisher: list[tuple[str, tuple[str, ...]]] = []
    publisher_ack = gateway.publisher.ack

    def spy_ack(stream, entry_ids, owner=None):
        via_publisher.append((stream, tuple(entry_ids)))
        publisher_ack(stream, entry_ids, owner=owner)

    monkeypatch.setattr(gateway.publisher, "ack", spy_ack)
    async with SimulatedBot(ws_url(gateway), "bot_ack") as bot:
        keys = gateway.keyspace.bot("bot_ack")
        for i in range(3):
            await redis_client.xadd(
                keys.commands, {"json": json.dumps({"command": "sendmsg", "message": str(i)})}
            )
            assert (await bot.next_command(timeout=10, after=i))["message"] == str(i)
            assert await eventually(lambda: _pending_is(redis_client, keys.commands, 0))
    assert [stream for stream, _ in via_publisher if stream == keys.commands] == []


async def test_the_reader_never_writes_while_the_bots_sender_is_mid_write(gateway, redis_client, monkeypatch):
    """The other side of the reader's direct write: while the bot's sender task is
    inside a write (here held open; in life, woken from a full socket but not run
    yet), a command the reader takes is left to that task, so nothing overtakes
    what it is writing."""
    from gateway.ws_fast_path import BotWebSocket

    in_send, gate = asyncio.Event(), asyncio.Event()
    reader_may_write = False
    can_send_now, send = BotWebSocket.can_send_now, BotWebSocket.send

    def gated_can_send_now(self):
        return reader_may_write and can_send_now(self)

    async def held_send(self, message, *args, **kwargs):
        if not in_send.is_set():
            in_send.set()
            await gate.wait()
        await send(self, message, *args, **kwargs)

    monkeypatch.setattr(BotWebSocket, "can_send_now", gated_can_send_now)
    monkeypatch.setattr(BotWebSocket, "send", held_send)
    async with SimulatedBot(ws_url(gateway), "bot_mid") as bot:
        keys = gateway.keyspace.bot("bot_mid")
        await redis_client.xadd(keys.commands, {"json": json.dumps({"command": "sendmsg", "message": "0"})})
        await asyncio.wait_for(in_send.wait(), 10)  # the sender task holds "0", mid-write
        reader_may_write = True  # the socket could take a write now
        await redis_client.xadd(keys.commands, {"json": json.dumps({"command": "sendmsg", "message": "1"})})
        await eventually(lambda: _pending_is(redis_client, keys.commands, 2))  # the reader has "1"
        await asyncio.sleep(0.1)
        assert bot.commands() == [], "a command was written while the sender was mid-write"
        gate.set()
        await bot.wait_commands(2, timeout=10)
        assert await eventually(lambda: _pending_is(redis_client, keys.commands, 0))
    assert [c["message"] for c in bot.commands()] == ["0", "1"]


async def _pending_is(client, key: str, n: int) -> bool:
    from gateway.keys import COMMAND_GROUP

    return (await client.xpending(key, COMMAND_GROUP))["pending"] == n


async def test_commands_written_before_the_bot_are_delivered_on_ready_unless_expired(redis_url, redis_client):
    async with running_gateway(redis_url, command_max_age_s=2.0) as gw:
        keys = gw.keyspace.bot("bot_early")
        old_id = await redis_client.xadd(keys.commands, {"json": '{"command":"sendmsg","message":"stale"}'})
        await asyncio.sleep(2.3)
        await redis_client.xadd(keys.commands, {"json": '{"command":"sendmsg","message":"fresh"}'})
        async with SimulatedBot(ws_url(gw), "bot_early") as bot:
            first = await bot.next_command(timeout=10, after=0)
            rejections = await eventually(lambda: _rejections(redis_client, keys.events))
    assert first["message"] == "fresh"
    assert [c["message"] for c in bot.commands()] == ["fresh"]
    assert rejections[0]["reason"] == "expired" and rejections[0]["entry_id"] == old_id.decode()


async def test_channels_in_either_order_and_session_lives_until_both_are_gone(gateway, redis_client):
    keys = gateway.keyspace.bot("bot_lc")
    bot = SimulatedBot(ws_url(gateway), "bot_lc")
    await bot.connect_audio()  # audio first
    await bot.connect_control()
    await eventually(
        lambda: gateway.bots.registry.get("bot_lc") and gateway.bots.registry.get("bot_lc").control
    )
    await bot.audio.close(1000)
    await asyncio.sleep(0.2)
    assert gateway.bots.registry.get("bot_lc") is not None  # control still up
    await redis_client.xadd(keys.commands, {"json": '{"command":"sendmsg","message":"still here"}'})
    assert (await bot.next_command(timeout=10, after=0))["message"] == "still here"
    await bot.control.close(1000)
    await eventually(lambda: gateway.bots.registry.get("bot_lc") is None)
    await gateway.publisher.flush(5)
    types = [e["type"] for e in await events_of(redis_client, keys.events)]
    assert types == [
        "connected",
        "audio_handshake",
        "connected",
        "ready",
        "disconnected",
        "disconnected",
        "session_ended",
    ]
    lifecycle = await events_of(redis_client, gateway.keyspace.global_events)
    assert [e["type"] for e in lifecycle] == types  # no message/command_rejected here
    connected = lifecycle[0]
    assert connected["commands_key"] == keys.commands and connected["audio_key"] == keys.audio
    disconnected = [e for e in lifecycle if e["type"] == "disconnected"]
    assert {e["code"] for e in disconnected} == {"1000"}
    for key in (keys.events, keys.commands):
        ttl = await redis_client.ttl(key)
        assert 0 < ttl <= gateway.settings.key_ttl_s


async def test_reconnect_gets_a_new_conn_and_seq_restarts(gateway, redis_client):
    keys = gateway.keyspace.bot("bot_rc")
    frame = AudioFrame("s", "Ada", b"\x01\x00" * 480)
    for _ in range(2):
        bot = SimulatedBot(ws_url(gateway), "bot_rc")
        await bot.connect_audio()
        for _ in range(3):
            await bot.send_frame(frame)
        await bot.close()
    await eventually(lambda: _xlen_is(redis_client, keys.audio, 6))
    entries = [f for _, f in await redis_client.xrange(keys.audio)]
    assert [e[b"seq"] for e in entries] == [b"0", b"1", b"2"] * 2
    assert entries[0][b"conn"] != entries[3][b"conn"]


async def test_bare_paths_take_bot_id_from_handshake(gateway, redis_client):
    bot = SimulatedBot(ws_url(gateway), "bot_bare", bare_paths=True)
    await bot.connect()
    await bot.stream_speech([Speaker("s", "Ada")], seconds=0.3, realtime=False)
    keys = gateway.keyspace.bot("bot_bare")
    await redis_client.xadd(keys.commands, {"json": '{"command":"interrupt","action":"clear_audio_queue"}'})
    assert (await bot.next_command(timeout=10, after=0))["bot_id"] == "bot_bare"
    await eventually(lambda: _xlen_is(redis_client, keys.audio, 3))
    await bot.close()


async def test_path_and_handshake_disagree_is_refused_with_4400(gateway):
    async with connect(f"{ws_url(gateway)}/bot_a/control") as ws:
        await ws.send(json.dumps({"type": "ready", "bot_id": "bot_b", "message": "Ready"}))
        with pytest.raises(ConnectionClosed) as closed:
            await ws.recv()
    assert closed.value.rcvd.code == 4400
    assert closed.value.rcvd.reason == "bot_id mismatch between path and handshake"
    await eventually(
        lambda: (
            sample(
                gateway,
                "meetstream_gateway_connections_closed_total",
                channel="control",
                reason="bot_id_mismatch",
            )
            == 1
        )
    )
    await eventually(lambda: gateway.bots.registry.get("bot_a") is None)


async def test_unknown_path_gets_404_and_bad_bot_id_400s(gateway):
    with pytest.raises(InvalidStatus) as err:
        async with connect(f"{ws_url(gateway)}/bot_a/video"):
            pass
    assert err.value.response.status_code == 404
    with pytest.raises(InvalidStatus):
        async with connect(f"{ws_url(gateway)}/bad%7Bid%7D/audio"):
            pass


async def test_silent_bare_connection_is_closed_after_handshake_timeout(redis_url):
    async with (
        running_gateway(redis_url, handshake_timeout_s=0.3) as gw,
        connect(f"{ws_url(gw)}/control") as ws,
    ):
        with pytest.raises(ConnectionClosed) as closed:
            await asyncio.wait_for(ws.recv(), 5)
    assert closed.value.rcvd.code == 4408


async def test_malformed_input_is_counted_and_never_closes_a_healthy_connection(gateway, redis_client):
    async with SimulatedBot(ws_url(gateway), "bot_mal") as bot:
        good = AudioFrame("s", "Ada", b"\x02\x00" * 100)
        for junk in (
            b"",
            b"\x02abcdef",
            b"\x01\xff\x00ab",
            b"\x01\x02\x00\xff\xfe\x00\x00\x00\x00",
            b"\x01\x00\x00\x00\x00\x01",
            b"\x01\x00\x00\x00\x00",
        ):
            await bot.audio.send(junk)
        await bot.audio.send("{not json")
        await bot.control.send(b"\x00binary on control")
        await bot.control.send("[1, 2]")
        await bot.send_frame(good)
        await bot.send_control_json({"type": "participant_joined", "name": "Ada"})
        keys = gateway.keyspace.bot("bot_mal")
        await eventually(lambda: _xlen_is(redis_client, keys.audio, 1))
        keys_events = await eventually(lambda: _messages(redis_client, keys.events))
        assert json.loads(keys_events[0]["data"]) == {"type": "participant_joined", "name": "Ada"}
        # Still connected and still served.
        await redis_client.xadd(keys.commands, {"json": '{"command":"sendmsg","message":"alive"}'})
        assert (await bot.next_command(timeout=10, after=0))["message"] == "alive"
    for reason, n in (
        ("too_short", 1),
        ("bad_marker", 1),
        ("truncated", 1),
        ("bad_utf8", 1),
        ("odd_pcm", 1),
        ("empty_pcm", 1),
        ("bad_json", 1),
        ("binary_on_control", 1),
        ("not_object", 1),
    ):
        assert sample(gateway, "meetstream_gateway_frames_dropped_total", reason=reason) == n, reason


async def _messages(client, key):
    return [e for e in await events_of(client, key) if e["type"] == "message"]


async def test_legacy_json_audio_frames(gateway, redis_client):
    bot = SimulatedBot(ws_url(gateway), "bot_old", legacy_audio=True)
    await bot.connect_audio()
    await bot.stream_speech([Speaker("s", "Ada")], seconds=0.5, realtime=False)
    keys = gateway.keyspace.bot("bot_old")
    await eventually(lambda: _xlen_is(redis_client, keys.audio, 5))
    entries = [f for _, f in await redis_client.xrange(keys.audio)]
    assert [e[b"pcm"] for e in entries] == [f.pcm for f in bot.sent_frames]
    assert {e[b"speaker_name"] for e in entries} == {b"Ada"}
    await bot.close()


async def test_newer_connection_replaces_older_with_4409(gateway, redis_client):
    old = SimulatedBot(ws_url(gateway), "bot_dup")
    await old.connect_control()
    new = SimulatedBot(ws_url(gateway), "bot_dup")
    await new.connect_control()
    await eventually(lambda: old.control.close_code == 4409, 5)
    keys = gateway.keyspace.bot("bot_dup")
    await redis_client.xadd(keys.commands, {"json": '{"command":"sendmsg","message":"to the new one"}'})
    assert (await new.next_command(timeout=10, after=0))["message"] == "to the new one"
    assert old.commands() == []
    await new.close()


async def test_unacked_commands_are_redelivered_to_the_next_gateway(redis_url, redis_client):
    """At least once across a crash.

    1. A gateway reads two commands for a bot but dies before sending them
       (simulated by reading them as that gateway's consumer and never acking).
    2. The bot reconnects to a new gateway.
    3. Both commands arrive, in order, before a newer one.
    """
    async with running_gateway(redis_url) as gw:
        keys = gw.keyspace.bot("bot_crash")
        await redis_client.xgroup_create(keys.commands, "gateway", id="0", mkstream=True)
        for text in ("one", "two"):
            await redis_client.xadd(
                keys.commands, {"json": json.dumps({"command": "sendmsg", "message": text})}
            )
        await redis_client.xreadgroup("gateway", "dead-gateway", {keys.commands: ">"})
        await redis_client.xadd(keys.commands, {"json": '{"command":"sendmsg","message":"three"}'})
        async with SimulatedBot(ws_url(gw), "bot_crash") as bot:
            await bot.wait_commands(3, timeout=10)
        assert [c["message"] for c in bot.commands()] == ["one", "two", "three"]
        await eventually(lambda: _pending(redis_client, keys.commands, 0))


async def test_redis_connections_do_not_grow_with_bots(gateway, redis_client):
    async def clients():
        return len(await redis_client.client_list())

    baseline = await clients()
    bots = [SimulatedBot(ws_url(gateway), f"bot-many-{i}", record_sent=False) for i in range(60)]
    for bot in bots:
        await bot.connect()
    await eventually(
        lambda: all(
            gateway.bots.registry.get(b.bot_id)
            and gateway.bots.registry.get(b.bot_id).control
            and gateway.bots.registry.get(b.bot_id).control.ready
            for b in bots
        )
    )
    for bot in bots:
        keys = gateway.keyspace.bot(bot.bot_id)
        await redis_client.xadd(
            keys.commands, {"json": json.dumps({"command": "sendmsg", "message": bot.bot_id})}
        )
    for bot in bots:
        assert (await bot.next_command(timeout=10, after=0))["message"] == bot.bot_id
    with_bots = await clients()
    readers = gateway.bots.delivery.reader.connections
    for bot in bots:
        await bot.close()
    # One reader connection per command shard with bots (60 bots span all 16, fewer than
    # command_read_streams in each), one raw connection for the publisher, and the bounded pool.
    shards = {gateway.keyspace.bot(b.bot_id).shard for b in bots}
    assert readers == len(shards) <= gateway.settings.command_shards
    assert (
        with_bots - baseline <= gateway.settings.redis_max_connections + 1 + gateway.settings.command_shards
    )


async def test_probes_and_metrics_endpoint(gateway):
    import urllib.request

    base = f"http://127.0.0.1:{gateway.probes.port}"

    def get(path):
        try:
            with urllib.request.urlopen(base + path, timeout=5) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()

    assert (await asyncio.to_thread(get, "/healthz"))[0] == 200
    await eventually(lambda: gateway.is_ready())
    assert (await asyncio.to_thread(get, "/readyz"))[0] == 200
    status, body = await asyncio.to_thread(get, "/metrics")
    assert status == 200
    assert 'meetstream_gateway_connections{channel="audio"}' in body
    assert "bot_id=" not in body  # no per-bot label, ever
    gateway.bots.draining = True
    assert (await asyncio.to_thread(get, "/readyz"))[0] == 503


async def test_the_bot_port_answers_health_probes_too(gateway):
    """docs/DEPLOY.md: load balancers that only reach the bot port can check it."""
    import urllib.request

    base = f"http://127.0.0.1:{gateway.port}"

    def get(path):
        try:
            with urllib.request.urlopen(base + path, timeout=5) as r:
                return r.status
        except urllib.error.HTTPError as e:
            return e.code

    assert await asyncio.to_thread(get, "/healthz") == 200
    await eventually(lambda: gateway.is_ready())
    assert await asyncio.to_thread(get, "/readyz") == 200
    assert await asyncio.to_thread(get, "/metrics") != 200  # metrics stay on their own port
    gateway.bots.draining = True
    assert await asyncio.to_thread(get, "/readyz") == 503


async def test_drain_refuses_new_bots_then_closes_remaining_with_1012(redis_url, redis_client):
    async with running_gateway(redis_url) as gw:
        bot = SimulatedBot(ws_url(gw), "bot_stay")
        await bot.connect()
        await bot.stream_speech([Speaker("s", "Ada")], seconds=0.2, realtime=False)
        drain = asyncio.create_task(gw.drain(timeout_s=1.0))
        await asyncio.sleep(0.1)
        with pytest.raises(InvalidStatus) as err:
            async with connect(f"{ws_url(gw)}/bot_late/control"):
                pass
        assert err.value.response.status_code == 503
        assert not gw.is_ready()
        # The bot already here keeps working during the drain.
        keys = gw.keyspace.bot("bot_stay")
        await redis_client.xadd(keys.commands, {"json": '{"command":"sendmsg","message":"during drain"}'})
        assert (await bot.next_command(timeout=5, after=0))["message"] == "during drain"
        await drain
        await gw.stop()
        await eventually(lambda: bot.control.close_code == 1012, 5)
        await eventually(lambda: _xlen_is(redis_client, keys.audio, 2))


async def test_text_in_the_middle_of_audio_is_an_event_and_audio_goes_on(gateway, redis_client):
    """A JSON text frame between audio frames is published as a `message` event on the
    bot's stream, whole; the frames around it keep their order and their seq."""
    async with SimulatedBot(ws_url(gateway), "bot_mid") as bot:
        frame = AudioFrame("s", "Ada", b"\x03\x00" * 480)
        await bot.send_frame(frame)
        await bot.audio.send('{"type": "speaker_changed", "speakerName": "Grace"}')
        await bot.send_frame(frame)
        keys = gateway.keyspace.bot("bot_mid")
        await eventually(lambda: _xlen_is(redis_client, keys.audio, 2))
        messages = await eventually(lambda: _messages(redis_client, keys.events))
    assert messages[0]["channel"] == "audio"
    assert messages[0]["data"] == '{"type": "speaker_changed", "speakerName": "Grace"}'
    entries = [f for _, f in await redis_client.xrange(keys.audio)]
    assert [e[b"seq"] for e in entries] == [b"0", b"1"]


async def test_a_reconnect_storm_queues_for_setup_instead_of_failing(redis_url, redis_client):
    """150 bots become ready at once through a pool of 4 Redis connections: every one
    gets command delivery, none is closed (the benchmark once saw 1011s here)."""
    async with running_gateway(redis_url, redis_max_connections=4) as gw:
        bots = [SimulatedBot(ws_url(gw), f"storm-{i}", record_sent=False) for i in range(150)]
        await asyncio.gather(*(bot.connect_control() for bot in bots))
        for bot in bots:
            keys = gw.keyspace.bot(bot.bot_id)
            await redis_client.xadd(
                keys.commands, {"json": json.dumps({"command": "sendmsg", "message": bot.bot_id})}
            )
        for bot in bots:
            assert (await bot.next_command(timeout=20, after=0))["message"] == bot.bot_id
        assert all(bot.control.close_code is None for bot in bots)
        assert not gw.metrics.registry.get_sample_value(
            "meetstream_gateway_connections_closed_total", {"channel": "control", "reason": "error"}
        )
        await asyncio.gather(*(bot.close() for bot in bots))
