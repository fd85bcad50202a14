"""The audio channel's own frame splitting (BotWebSocket) against a real gateway.

The bytes of a bot's stream are cut at random places, so the gateway sees
frames split across reads, several frames in one read, and headers cut in
two, with pings, text messages and fragmented binary messages mixed in.
Every audio frame must reach Redis once, in order, byte for byte; every ping
must be answered; limits must hold as they do in websockets' own parser.
"""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import Callable

import pytest
import redis.asyncio as aioredis
from websockets.client import ClientProtocol
from websockets.frames import Frame, Opcode
from websockets.protocol import OPEN
from websockets.uri import parse_uri

import gateway.ws_fast_path
from gateway.protocol import AudioFrame
from tests.conftest import running_gateway
from tests.helpers import eventually


class RawBot:
    """A bot's audio channel driven byte by byte: websockets' sans-I/O client writes
    the frames, and this writes its bytes in whatever pieces the test wants."""

    def __init__(self, port: int, bot_id: str) -> None:
        self.port, self.bot_id = port, bot_id
        self.proto = ClientProtocol(parse_uri(f"ws://127.0.0.1:{port}/{bot_id}/audio"), max_size=None)
        self.frames_in: list[Frame] = []

    async def open(self) -> None:
        self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)
        self.proto.send_request(self.proto.connect())
        self._flush()
        while self.proto.state is not OPEN:
            self.proto.receive_data(await asyncio.wait_for(self.reader.read(65536), 5))
        self.proto.events_received()
        self.proto.send_text(json.dumps({"type": "ready", "bot_id": self.bot_id}).encode())
        self._flush()

    def _flush(self) -> None:
        self.writer.write(b"".join(self.proto.data_to_send()))

    def take_bytes(self) -> bytes:
        return b"".join(self.proto.data_to_send())

    async def write_in_pieces(self, data: bytes, rng: random.Random) -> None:
        """Tiny pieces (headers cut in two), mid-sized ones, and runs of several frames."""
        pos = 0
        while pos < len(data):
            n = rng.choice([rng.randint(1, 16), rng.randint(17, 3000), rng.randint(3001, 40_000)])
            self.writer.write(data[pos : pos + n])
            await self.writer.drain()
            pos += n
            await asyncio.sleep(0.001 if rng.random() < 0.2 else 0)  # the gateway reads what is there

    async def read_for(self, seconds: float) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + seconds
        while (left := deadline - loop.time()) > 0:
            try:
                data = await asyncio.wait_for(self.reader.read(65536), left)
            except TimeoutError:
                return
            if not data:
                self.proto.receive_eof()
                return
            self.proto.receive_data(data)
            self.frames_in += [e for e in self.proto.events_received() if isinstance(e, Frame)]

    def close(self) -> None:
        self.writer.close()


def _frame(seq: int, size: int) -> AudioFrame:
    pcm = (seq.to_bytes(4, "big") * (size // 4 + 1))[:size]
    return AudioFrame(f"s{seq % 3}", "Ada", pcm)


async def _stored_pcm(client: aioredis.Redis, bot_id: str) -> list[bytes]:
    return [fields[b"pcm"] for _, fields in await client.xrange(f"meetstream:{{{bot_id}}}:audio")]


@pytest.fixture
def count_fast_path(monkeypatch: pytest.MonkeyPatch) -> Callable[[], int]:
    calls = [0]
    real = gateway.ws_fast_path.apply_mask

    def counting(data: bytes, mask: bytes) -> bytes:
        calls[0] += 1
        return real(data, mask)

    monkeypatch.setattr(gateway.ws_fast_path, "apply_mask", counting)
    return lambda: calls[0]


@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_a_stream_cut_anywhere_arrives_whole_and_in_order(
    redis_url: str, redis_client: aioredis.Redis, count_fast_path: Callable[[], int], seed: int
) -> None:
    rng = random.Random(seed)
    async with running_gateway(redis_url) as gw:
        bot = RawBot(gw.port, "bot_cut")
        await bot.open()
        await eventually(lambda: (s := gw.bots.registry.get("bot_cut")) and s.audio and s.audio.ready, 5)
        await asyncio.sleep(0.05)  # the channel is bound once the handshake is handled
        expected: list[bytes] = []
        pings = 0
        for seq in range(300):
            frame = _frame(seq, 70_000 if seq % 50 == 7 else rng.choice([2, 1920, 1920, 9600]))
            expected.append(frame.pcm)
            wire = frame.serialize()
            if seq % 29 == 5:  # a fragmented message: websockets assembles it
                cut = len(wire) // 2
                bot.proto.send_binary(wire[:cut], fin=False)
                bot.proto.send_continuation(wire[cut:], fin=True)
            else:
                bot.proto.send_binary(wire)
            if seq % 13 == 0:
                bot.proto.send_ping(b"p%d" % seq)
                pings += 1
            if seq % 31 == 0:
                bot.proto.send_text(b'{"type":"note","n":%d}' % seq)  # a bot message: an event
        await bot.write_in_pieces(bot.take_bytes(), rng)
        await bot.read_for(0.5)

        async def all_stored() -> bool:
            return len(await _stored_pcm(redis_client, "bot_cut")) >= len(expected)

        await eventually(all_stored, 10, 0.05)
        assert await _stored_pcm(redis_client, "bot_cut") == expected
        pongs = [f for f in bot.frames_in if f.opcode is Opcode.PONG]
        assert len(pongs) == pings
        events = await redis_client.xrange("meetstream:{bot_cut}:events")
        notes = [f for _, f in events if f[b"type"] == b"message" and b"note" in f.get(b"data", b"")]
        assert len(notes) == len(range(0, 300, 31))
        # Most frames took the fast path (the rest: fragmented ones, frames behind a
        # queued text message, and whatever arrived while websockets held a frame).
        assert count_fast_path() > 150
        bot.close()


async def test_the_size_limit_holds_on_the_fast_path(
    redis_url: str, count_fast_path: Callable[[], int]
) -> None:
    async with running_gateway(redis_url, ws_max_message_bytes=4096) as gw:
        bot = RawBot(gw.port, "bot_big")
        await bot.open()
        await eventually(lambda: (s := gw.bots.registry.get("bot_big")) and s.audio and s.audio.ready, 5)
        await asyncio.sleep(0.05)
        for seq in range(5):
            bot.proto.send_binary(_frame(seq, 1920).serialize())
        bot.proto.send_binary(_frame(5, 8000).serialize())  # over the limit
        bot.writer.write(bot.take_bytes())
        await bot.read_for(2)
        closes = [f for f in bot.frames_in if f.opcode is Opcode.CLOSE]
        assert closes and int.from_bytes(closes[0].data[:2], "big") == 1009
        assert count_fast_path() == 5
        bot.close()
