"""What one bot may hold and send, against a real gateway: slots, reconnects, pings,
handshakes, overload. Each bound belongs to the bot_id, not to one connection."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import time

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from gateway.auth import mint
from gateway.testing.bot import SimulatedBot
from tests.conftest import running_gateway, ws_url
from tests.helpers import eventually

SECRET = "hostile-secret-0123456789"


def sample(gw, name, **labels) -> float:
    return gw.metrics.registry.get_sample_value(f"meetstream_gateway_{name}", labels) or 0


async def status_of(url: str) -> int:
    with pytest.raises(InvalidStatus) as err:
        async with connect(url):
            pass
    return err.value.response.status_code


async def test_an_overloaded_replica_refuses_new_bots_and_keeps_its_own(redis_url):
    async with running_gateway(redis_url) as gw, SimulatedBot(ws_url(gw), "here") as bot:
        gw.bots.shedder.ratio = 0.5  # what the lag monitor sets when the loop falls behind
        assert await status_of(f"{ws_url(gw)}/newcomer/control") == 503
        assert sample(gw, "connections_refused_total", reason="overloaded") == 1
        await bot.send_control_json({"type": "still_here"})
        gw.bots.shedder.ratio = 0.0
        async with SimulatedBot(ws_url(gw), "newcomer"):
            pass


async def test_connection_slots_are_counted_per_bot_and_per_token(redis_url):
    async with running_gateway(redis_url, auth_secret=SECRET, max_connections_per_bot=2) as gw:
        base = ws_url(gw)
        bound = mint(SECRET, 60, "bot_x")
        held = [await connect(f"{base}/audio?token={bound}") for _ in range(2)]
        # A bare path with a token bound to bot_x counts against bot_x...
        assert await status_of(f"{base}/audio?token={bound}") == 429
        assert await status_of(f"{base}/bot_x/control?token={bound}") == 429
        assert sample(gw, "connections_refused_total", reason="bot_connections") == 2
        # ...and not against anyone else.
        async with SimulatedBot(base, "bot_y", query=f"token={mint(SECRET, 60, 'bot_y')}"):
            pass
        # An unbound token's connections count against the token until they name a bot.
        anyone = mint(SECRET, 60)
        more = [await connect(f"{base}/audio?token={anyone}") for _ in range(2)]
        assert await status_of(f"{base}/audio?token={anyone}") == 429
        for ws in held + more:
            await ws.close()
        # Slots come back when connections end.
        await eventually(lambda: gw.bots.admission.slots("bot_x") == 0)
        async with SimulatedBot(base, "bot_x", query=f"token={bound}"):
            pass


async def test_a_reconnect_storm_is_refused_and_keeps_others_in_the_lifecycle_stream(redis_url, redis_client):
    async with running_gateway(redis_url, bot_connects_per_min=6) as gw:
        base = ws_url(gw)
        async with SimulatedBot(base, "calm"):
            pass
        statuses = []
        for _ in range(40):
            try:
                async with connect(f"{base}/stormy/control") as ws:
                    await ws.send(json.dumps({"type": "ready", "bot_id": "stormy"}))
                statuses.append(101)
            except InvalidStatus as exc:
                statuses.append(exc.response.status_code)
        assert statuses.count(101) <= 21  # the burst (20), and what refilled meanwhile
        assert set(statuses) == {101, 429}
        assert sample(gw, "connections_refused_total", reason="reconnect_rate") == statuses.count(429)
        await gw.publisher.flush(5)
        lifecycle = await redis_client.xrange(gw.keyspace.global_events)
        assert any(f[b"bot_id"] == b"calm" and f[b"type"] == b"ready" for _, f in lifecycle)


async def test_the_handshake_deadline_is_absolute(redis_url):
    """A bare connection that sends a byte now and then still has to say who it is in time."""
    async with running_gateway(redis_url, handshake_timeout_s=1.0) as gw:
        started = time.monotonic()
        async with connect(f"{ws_url(gw)}/audio") as ws:
            with contextlib.suppress(ConnectionClosed):
                for _ in range(20):
                    await ws.send(b"\x00")  # binary before the handshake: dropped, no bot named
                    await asyncio.sleep(0.3)
            assert ws.close_code == 4408
        assert time.monotonic() - started < 3.0


async def test_a_ping_flood_is_limited_and_closed(redis_url):
    """Pings count against the bot's message rate; a flood past a whole burst is closed (1008)
    and nothing it sends afterwards is parsed."""
    async with (
        running_gateway(redis_url, max_frames_per_s=50, rate_burst_s=1.0) as gw,
        SimulatedBot(ws_url(gw), "pinger") as bot,
    ):
        assert bot.control is not None
        with contextlib.suppress(ConnectionClosed):
            for _ in range(1000):
                await bot.control.ping()
        await eventually(lambda: bot.control.close_code is not None)
        assert bot.control.close_code == 1008
        await eventually(
            lambda: sample(gw, "connections_closed_total", channel="control", reason="policy_violation") == 1
        )


def _raw_upgrade(port: int, path: str) -> socket.socket:
    """A WebSocket client that will never read again once upgraded (a tiny receive buffer)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.settimeout(5)
    sock.connect(("127.0.0.1", port))
    sock.sendall(
        f"GET {path} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n".encode()
    )
    reply = b""
    while b"\r\n\r\n" not in reply:
        reply += sock.recv(4096)
    assert reply.startswith(b"HTTP/1.1 101"), reply
    return sock


def _masked(opcode: int, payload: bytes) -> bytes:
    assert len(payload) < 126
    return bytes([0x80 | opcode, 0x80 | len(payload)]) + b"\x00\x00\x00\x00" + payload


def _ping_without_reading(sock: socket.socket, seconds: float) -> None:
    ping = _masked(0x9, b"p" * 125) * 100
    deadline = time.monotonic() + seconds
    with contextlib.suppress(OSError):  # the gateway drops us: that is the point
        while time.monotonic() < deadline:
            sock.sendall(ping)


async def test_a_client_that_never_reads_its_pongs_is_dropped(redis_url):
    """Pongs for a peer that does not read pile up in our write buffer: past the bound the
    connection is dropped (counted), instead of growing the process."""
    async with running_gateway(
        redis_url, ws_write_buffer_max_bytes=256 << 10, max_frames_per_s=1_000_000
    ) as gw:
        loop = asyncio.get_running_loop()
        # The gateway runs in this event loop: the blocking client runs in a thread.
        sock = await loop.run_in_executor(None, _raw_upgrade, gw.port, "/reader/control")
        try:
            await loop.run_in_executor(None, _ping_without_reading, sock, 10.0)
            await eventually(
                lambda: sample(gw, "connections_closed_total", channel="control", reason="write_buffer_full")
            )
        finally:
            sock.close()


async def test_malformed_json_is_dropped_and_loose_json_is_published_strict(redis_url, redis_client):
    """JSON deeper than the parser's limit drops one message, not the connection; NaN and
    duplicate keys are published in a form every strict parser reads."""
    async with running_gateway(redis_url) as gw, SimulatedBot(ws_url(gw), "loose") as bot:
        assert bot.control is not None and bot.audio is not None
        await bot.control.send("[" * 30_000 + "]" * 30_000)  # under the size cap, past the depth limit
        await bot.audio.send('{"a":' * 20_000 + "1" + "}" * 20_000)
        await bot.control.send('{"type":"note","level":NaN,"n":1,"n":2}')
        keys = gw.keyspace.bot("loose")

        async def note():
            for _, fields in await redis_client.xrange(keys.events):
                if fields[b"type"] == b"message" and b"note" in fields.get(b"data", b""):
                    return fields[b"data"]
            return None

        data = await eventually(note)
        assert json.loads(data, parse_constant=lambda c: pytest.fail(f"{c} published")) == {
            "type": "note",
            "level": None,
            "n": 2,
        }
        assert sample(gw, "frames_dropped_total", reason="bad_json") == 2
        assert bot.control.close_code is None and bot.audio.close_code is None
