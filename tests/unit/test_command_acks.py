"""Acks that ride with the command reader's next read: what happens to each reply.

A command written to an idle bot in the reader's own turn is acked in the same
write as the shard's next XREADGROUP. These tests script that connection's
replies, so that every fate of such an ack is seen: it lands, it is refused
(another connection owns the bot), it is redirected (a Cluster slot moved) or the
connection fails with the ack unconfirmed. None may be lost silently.
"""

from __future__ import annotations

import asyncio
import types
from typing import Any

import hiredis
from prometheus_client import CollectorRegistry
from redis.exceptions import ConnectionError as RedisConnectionError

from gateway.command_reader import Ack, CommandReader
from gateway.keys import KeySpace
from gateway.metrics import Metrics
from gateway.settings import Settings

OWNER = ("meetstream:{c00}:bot:owner", "gw/conn")


class _ScriptedConn:
    """Answers each read with the next scripted reply list (or raises it); then blocks."""

    def __init__(self, script: list[Any]) -> None:
        self.script = script
        self.sent: list[tuple[bytes, int]] = []
        self.connected = True
        self.stopped = False  # then every call (the reader's last DEL) is answered at once

    async def execute(self, payload: bytes, replies: int) -> list[Any]:
        if self.stopped:
            return [0] * replies
        self.sent.append((payload, replies))
        if not self.script:
            await asyncio.Event().wait()  # a blocked read, until the reader is cancelled
        step = self.script.pop(0)
        if isinstance(step, BaseException):
            raise step
        return step

    def close(self) -> None:
        self.connected = False


def _entry(entry_id: bytes) -> list[Any]:
    return [entry_id, [b"json", b'{"command":"sendmsg","message":"hi"}']]


async def _run(
    script: list[Any], settings: Settings | None = None, stop_on_deliver: bool = False
) -> tuple[CommandReader, list[Ack], Any]:
    """A reader with one bot whose entries are 'written' and acked with the next read."""
    keyspace = KeySpace()
    keys = keyspace.bot("bot")
    metrics = Metrics(CollectorRegistry())
    returned: list[Ack] = []
    conns: list[_ScriptedConn] = []
    reader: CommandReader

    class Sink:
        """Writes every entry at once: its ack rides on the reader's next read."""

        def deliver(self, bot_id: str, entries: list[Any]) -> list[Ack]:
            if stop_on_deliver:
                reader._stopping = True
            return [(keys.commands, (entry_id,), OWNER) for entry_id, _ in entries]

        def evict(self, bot_id: str, conn_id: str, by: str) -> None:
            raise AssertionError("no signal is scripted")

        def ack_elsewhere(self, acks: list[Ack]) -> None:
            returned.extend(acks)

    reader = CommandReader(
        types.SimpleNamespace(is_cluster=False),  # type: ignore[arg-type]
        keyspace,
        settings or Settings(),
        metrics,
        Sink(),
    )
    stream = keys.commands.encode()
    script = [
        [[[stream, [_entry(entry_id)]]]] if isinstance(entry_id, bytes) else entry_id for entry_id in script
    ]

    async def open_scripted(group: Any, socket_timeout_s: float) -> _ScriptedConn:
        conn = _ScriptedConn(script)
        conns.append(conn)
        group.wake_ready = True
        return conn

    reader._open = open_scripted  # type: ignore[method-assign]
    reader._bots[keys.bot_id] = keys
    group = reader._group_for(keys)
    group.members[keys.commands] = keys.bot_id
    group.task = asyncio.create_task(reader._read_loop(group))
    for _ in range(200):
        if not script:
            break
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.05)
    reader._stopping = True
    for conn in conns:
        conn.stopped = True
    group.task.cancel()
    await asyncio.gather(group.task, return_exceptions=True)
    return reader, returned, (metrics, conns)


async def test_an_ack_goes_out_in_the_same_write_as_the_next_read() -> None:
    _, returned, (_, conns) = await _run([b"1-0", [1, [[b"x", []]]]])
    first, second = conns[0].sent[:2]
    assert first[1] == 1  # a plain read
    payload, replies = second
    assert replies == 2  # the ack's reply, then the read's
    assert payload.index(b"EVAL") < payload.index(b"XREADGROUP")
    assert b"1-0" in payload and OWNER[1].encode() in payload
    assert returned == []  # it landed: nothing to send another way


async def test_a_refused_ack_is_counted_not_retried() -> None:
    _, returned, (metrics, _) = await _run([b"1-0", [-1, [[b"x", []]]]])
    assert metrics.registry.get_sample_value("meetstream_gateway_command_acks_refused_total") == 1
    assert returned == []  # the new owner claims the entry: retrying would not help


async def test_a_redirected_ack_goes_another_way() -> None:
    moved = hiredis.ReplyError("MOVED 1234 127.0.0.1:7001")
    _, returned, _ = await _run([b"1-0", [moved, [[b"x", []]]]])
    assert returned == [(KeySpace().bot("bot").commands, ("1-0",), OWNER)]


async def test_an_ack_on_a_failed_connection_goes_another_way() -> None:
    _, returned, (metrics, _) = await _run(
        [b"1-0", RedisConnectionError("reset")], Settings(command_block_ms=100)
    )
    assert returned == [(KeySpace().bot("bot").commands, ("1-0",), OWNER)]
    assert (
        metrics.registry.get_sample_value("meetstream_gateway_redis_errors_total", {"op": "read_commands"})
        == 1
    )


async def test_an_ack_on_the_wire_when_the_reader_is_stopped_goes_another_way() -> None:
    # Its read blocks (nothing more is scripted) and the reader is cancelled: was it applied?
    _, returned, (_, conns) = await _run([b"1-0"])
    assert conns[0].sent[1][1] == 2  # the ack went out with the blocked read
    assert returned == [(KeySpace().bot("bot").commands, ("1-0",), OWNER)]


async def test_acks_queued_when_the_reader_stops_go_another_way() -> None:
    # The reader stops right after delivering: no next read carries the ack.
    _, returned, (_, conns) = await _run([b"1-0"], stop_on_deliver=True)
    assert [replies for payload, replies in conns[0].sent if b"XREADGROUP" in payload] == [1]
    assert returned == [(KeySpace().bot("bot").commands, ("1-0",), OWNER)]
