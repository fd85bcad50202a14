"""RESP2 command encoding (pure; no I/O), for the publisher's pipelined writes.

redis-py spends most of a pipelined XADD's CPU building per-command objects;
the publisher sends thousands of commands a second, so it encodes them itself
into one buffer per round trip, and hiredis parses the replies in C.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

_CRLF = b"\r\n"


def encode_arg(value: Any) -> bytes:
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode()
    if isinstance(value, int):
        return b"%d" % value
    if isinstance(value, memoryview | bytearray):
        return bytes(value)
    if isinstance(value, float):
        return repr(value).encode()
    raise TypeError(f"cannot encode {type(value).__name__} for Redis")


def encode_command(args: Iterable[Any], out: list[bytes]) -> None:
    """Append the RESP encoding of one command to ``out`` (joined once per batch)."""
    parts = [encode_arg(a) for a in args]
    out.append(b"*%d\r\n" % len(parts))
    for part in parts:
        out.append(b"$%d\r\n" % len(part))
        out.append(part)
        out.append(_CRLF)


def encode_commands(commands: Iterable[Iterable[Any]]) -> bytes:
    out: list[bytes] = []
    for args in commands:
        encode_command(args, out)
    return b"".join(out)


class AudioEncoder:
    """Encodes audio XADDs fast: the constant head of each stream's command is built once."""

    def __init__(self, maxlen: int, sample_rate: int, max_heads: int = 100_000) -> None:
        self._maxlen = b"%d" % maxlen
        self._tail_sr = b"$11\r\nsample_rate\r\n$%d\r\n%d\r\n" % (len(str(sample_rate)), sample_rate)
        self._heads: dict[str, bytes] = {}
        self._max_heads = max_heads

    def head(self, key: str) -> bytes:
        head = self._heads.get(key)
        if head is None:
            if len(self._heads) >= self._max_heads:
                self._heads.clear()  # bounded: bots come and go
            k = key.encode()
            head = b"*20\r\n$4\r\nXADD\r\n$%d\r\n%b\r\n" % (
                len(k),
                k,
            ) + b"$6\r\nMAXLEN\r\n$1\r\n~\r\n$%d\r\n%b\r\n$1\r\n*\r\n" % (len(self._maxlen), self._maxlen)
            self._heads[key] = head
        return head

    def encode(
        self, key: str, speaker_id: str, speaker_name: str, pcm: bytes, seq: int, conn: bytes, ts_ms: int
    ) -> list[bytes]:
        """Pieces of ``XADD key MAXLEN ~ n * speaker_id .. speaker_name .. pcm .. sample_rate ..
        seq .. conn .. ts ..`` (the PCM is not copied until the batch is joined)."""
        sid = speaker_id.encode()
        name = speaker_name.encode()
        seq_b = b"%d" % seq
        ts_b = b"%d" % ts_ms
        return [
            self.head(key)
            + b"$10\r\nspeaker_id\r\n$%d\r\n%b\r\n$12\r\nspeaker_name\r\n$%d\r\n%b\r\n$3\r\npcm\r\n$%d\r\n"
            % (len(sid), sid, len(name), name, len(pcm)),
            pcm,
            b"\r\n"
            + self._tail_sr
            + b"$3\r\nseq\r\n$%d\r\n%b\r\n$4\r\nconn\r\n$%d\r\n%b\r\n$2\r\nts\r\n$%d\r\n%b\r\n"
            % (len(seq_b), seq_b, len(conn), conn, len(ts_b), ts_b),
        ]
