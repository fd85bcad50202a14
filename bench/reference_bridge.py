"""The plain bridge: the vendor page's FastAPI example, extended to Redis the way a careful user would.

What the vendor's example does (``shared/reference/meetstream-control-channel.txt``, "Python Server
(FastAPI)"), kept: ``/{bot_id}/audio`` and ``/{bot_id}/control``, ``decode_audio_frame`` as printed
there, ``websocket.receive()`` for the audio channel, ``receive_text()`` for control.

What a careful user adds, and nothing more:

- one awaited ``XADD`` per audio frame, with the gateway's key names and fields (so both write the
  same data), trimmed with ``MAXLEN ~``;
- one blocking ``XREAD`` per bot on the bot's command stream, each command's ``json`` field sent to
  the bot as it is (BLOCK 2 s: redis-py 8's default 5 s socket timeout must not fire first, a trap
  the first version of this bridge fell into, losing most commands after the first idle 5 s);
- a Redis pool large enough for one waiting connection per bot;
- the disconnect message of ``receive()`` ends the loop (the page's example would call
  ``receive()`` again and raise), and the command reader is cancelled with its socket.

It is the baseline, not a product: no validation, no batching, no backpressure, no metrics.
Runs under uvicorn with its defaults (``pip install fastapi uvicorn websockets``, as the page says),
except the flags below.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import time
import uuid
from contextlib import asynccontextmanager

import uvicorn
from fastapi import FastAPI, WebSocket, WebSocketDisconnect
from redis.asyncio import Redis
from redis.exceptions import RedisError

from gateway.keys import KeySpace

log = logging.getLogger("reference_bridge")


def decode_audio_frame(data: bytes):  # type: ignore[no-untyped-def]
    # Verbatim from the vendor's page.
    if len(data) < 5 or data[0] != 0x01:
        return None
    sid_len = int.from_bytes(data[1:3], "little")
    speaker_id = data[3 : 3 + sid_len].decode("utf-8")
    off = 3 + sid_len
    sname_len = int.from_bytes(data[off : off + 2], "little")
    off += 2
    speaker_name = data[off : off + sname_len].decode("utf-8")
    off += sname_len
    return speaker_id, speaker_name, data[off:]


def create_app(
    redis_url: str,
    audio_maxlen: int = 600,
    key_prefix: str = "meetstream",
    max_redis_connections: int = 20_000,
) -> FastAPI:
    keyspace = KeySpace(key_prefix)
    state: dict[str, Redis] = {}

    @asynccontextmanager
    async def lifespan(app: FastAPI):  # type: ignore[no-untyped-def]
        # Every bot's blocking XREAD holds a connection while it waits: redis-py's default pool
        # (100) runs out at 100 bots, and the first thing a careful user does is raise it.
        state["redis"] = Redis.from_url(redis_url, max_connections=max_redis_connections)
        try:
            yield
        finally:
            await state["redis"].aclose()

    app = FastAPI(lifespan=lifespan)
    control_sockets: dict[str, WebSocket] = {}

    @app.websocket("/{bot_id}/audio")
    async def audio_endpoint(websocket: WebSocket, bot_id: str) -> None:
        await websocket.accept()
        redis = state["redis"]
        key = keyspace.bot(bot_id).audio
        conn_id = uuid.uuid4().hex[:9]
        seq = 0
        while True:
            raw = await websocket.receive()
            if raw["type"] == "websocket.disconnect":
                break
            if raw.get("text"):
                log.debug("[%s] audio handshake: %s", bot_id, json.loads(raw["text"]))
                continue
            if raw.get("bytes"):
                result = decode_audio_frame(raw["bytes"])
                if result is None:
                    continue
                speaker_id, speaker_name, pcm_bytes = result
                await redis.xadd(
                    key,
                    {
                        "speaker_id": speaker_id,
                        "speaker_name": speaker_name,
                        "pcm": pcm_bytes,
                        "sample_rate": 48000,
                        "seq": seq,
                        "conn": conn_id,
                        "ts": int(time.time() * 1000),
                    },
                    maxlen=audio_maxlen,
                    approximate=True,
                )
                seq += 1

    async def forward_commands(websocket: WebSocket, bot_id: str) -> None:
        redis = state["redis"]
        key = keyspace.bot(bot_id).commands
        last_id = "$"
        while True:
            # BLOCK stays below redis-py's 5 s default socket timeout, which would otherwise
            # fire first and raise; a failed read is logged and retried, not fatal.
            try:
                reply = await redis.xread({key: last_id}, block=2000, count=100)
            except RedisError:
                log.exception("[%s] XREAD failed", bot_id)
                await asyncio.sleep(0.1)
                continue
            for _stream, entries in reply or []:
                for entry_id, fields in entries:
                    last_id = entry_id
                    text = fields.get(b"json")
                    if text is not None:
                        await websocket.send_text(text.decode())

    @app.websocket("/{bot_id}/control")
    async def control_endpoint(websocket: WebSocket, bot_id: str) -> None:
        await websocket.accept()
        control_sockets[bot_id] = websocket
        forwarder = asyncio.create_task(forward_commands(websocket, bot_id))
        try:
            while True:
                text = await websocket.receive_text()
                data = json.loads(text)
                if data.get("type") == "ready":
                    log.debug("[%s] control ready", bot_id)
        except WebSocketDisconnect:
            log.debug("[%s] control disconnected", bot_id)
        finally:
            forwarder.cancel()
            with contextlib.suppress(BaseException):
                await forwarder
            control_sockets.pop(bot_id, None)

    return app


def main() -> None:
    parser = argparse.ArgumentParser(description="The plain reference bridge (FastAPI + uvicorn + redis-py)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--audio-maxlen", type=int, default=600)
    parser.add_argument("--ws-ping-interval-s", type=float, default=20.0, help="uvicorn's default")
    parser.add_argument("--ws-ping-timeout-s", type=float, default=20.0, help="uvicorn's default")
    args = parser.parse_args()
    app = create_app(args.redis_url, args.audio_maxlen)
    uvicorn.run(
        app,
        host=args.host,
        port=args.port,
        log_level="warning",
        lifespan="on",
        # What `pip install fastapi uvicorn websockets` gives: the asyncio loop, h11, websockets.
        # (uvicorn would pick uvloop/httptools up if something else had installed them.)
        loop="asyncio",
        http="h11",
        ws="websockets-sansio",
        ws_ping_interval=args.ws_ping_interval_s,
        ws_ping_timeout=args.ws_ping_timeout_s,
    )


if __name__ == "__main__":
    main()
