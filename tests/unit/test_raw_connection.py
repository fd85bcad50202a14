"""The raw Redis connection hands a reply to the task waiting for it in one turn of
the event loop: under load every turn is a pass over all ready sockets, so each
extra turn between Redis's reply and the reader is command latency."""

from __future__ import annotations

import asyncio

import pytest
from redis.exceptions import ConnectionError as RedisConnectionError

from gateway.redis_conn import RawConnection, _Link


class _Transport:
    def __init__(self) -> None:
        self.written: list[bytes] = []
        self.closed = False

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True


def _connected() -> tuple[RawConnection, _Link, _Transport]:
    conn = RawConnection("127.0.0.1", 6379, {}, timeout_s=5)
    link, transport = _Link(), _Transport()
    link.connection_made(transport)  # type: ignore[arg-type]
    conn._link = link
    return conn, link, transport


async def _turns_until_done(task: asyncio.Task[object], limit: int = 10) -> int:
    for turns in range(limit):
        if task.done():
            return turns
        await asyncio.sleep(0)
    return limit


async def test_a_reply_reaches_the_waiting_task_in_one_turn() -> None:
    conn, link, transport = _connected()
    task = asyncio.ensure_future(conn.execute(b"*1\r\n$4\r\nPING\r\n", 1))
    await asyncio.sleep(0)  # the task writes its request and waits
    assert transport.written == [b"*1\r\n$4\r\nPING\r\n"]
    link.data_received(b"+PONG\r\n")
    assert await _turns_until_done(task) == 1  # a shield here made it 2
    assert task.result() == [b"PONG"]


async def test_a_timed_out_request_closes_the_connection_and_fails_the_rest() -> None:
    conn, link, transport = _connected()
    conn.timeout_s = 0.01
    other = link.submit(b"*1\r\n$4\r\nPING\r\n", 1)  # another request on the same wire
    with pytest.raises(TimeoutError):
        await conn.execute(b"*1\r\n$4\r\nPING\r\n", 1)
    assert transport.closed
    assert not conn.connected
    with pytest.raises(RedisConnectionError):
        await other
    link.data_received(b"+PONG\r\n+PONG\r\n")  # a late reply after the close does not raise


async def test_a_cancelled_reader_closes_its_connection() -> None:
    conn, _, transport = _connected()
    task = asyncio.ensure_future(conn.execute(b"*1\r\n$4\r\nPING\r\n", 1))
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert transport.closed and not conn.connected
