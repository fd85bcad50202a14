"""RESP2 command encoding (pure; no I/O), for the publisher's pipelined writes.

redis-py spends most of a pipelined XADD's CPU building per-command objects;
the publisher sends thousands of commands a second, so it encodes them itself
into one buffer per round trip, and hiredis parses the replies in C.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from gateway.exceptions import FrameError
from gateway.limits import StreamTrim
from gateway.protocol import audio_pcm_offset, parse_audio_frame

_CRLF = b"\r\n"


def encode_arg(value: Any) -> bytes:
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        # A lone surrogate has no UTF-8 form; written escaped rather than failing the
        # caller (validation rejects them first: this is the last line of defence).
        return value.encode("utf-8", "backslashreplace")
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

    def __init__(
        self,
        maxlen: int,
        sample_rate: int,
        max_heads: int = 100_000,
        *,
        speaker_max_bytes: int = 1 << 62,
    ) -> None:
        self._maxlen = b"%d" % maxlen
        self._speaker_max_bytes = speaker_max_bytes
        self._tail_sr = b"$11\r\nsample_rate\r\n$%d\r\n%d\r\n" % (len(str(sample_rate)), sample_rate)
        self._heads: dict[str, bytes] = {}
        self._max_heads = max_heads

    def head(self, key: str, maxlen: int | None = None) -> bytes:
        """``XADD key MAXLEN ~ n *``: the stream's usual n, or ``maxlen`` (not cached)."""
        if maxlen is not None:
            k, n = key.encode(), b"%d" % maxlen
            return b"*20\r\n$4\r\nXADD\r\n$%d\r\n%b\r\n" % (len(k), k) + (
                b"$6\r\nMAXLEN\r\n$1\r\n~\r\n$%d\r\n%b\r\n$1\r\n*\r\n" % (len(n), n)
            )
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
        self,
        key: str,
        speaker_id: str,
        speaker_name: str,
        pcm: bytes,
        seq: int,
        conn: bytes,
        ts_ms: int,
        trim: StreamTrim | None = None,
    ) -> list[bytes]:
        """Pieces of ``XADD key MAXLEN ~ n * speaker_id .. speaker_name .. pcm .. sample_rate ..
        seq .. conn .. ts ..`` (the PCM is not copied until the batch is joined)."""
        seq_b = b"%d" % seq
        ts_b = b"%d" % ts_ms
        head = self.speaker_head(key, speaker_id.encode(), speaker_name.encode(), len(pcm))
        if trim is not None and (maxlen := trim.note(len(head) + len(pcm))) is not None:
            head = self.head(key, maxlen) + head[len(self.head(key)) :]
        return [
            head,
            pcm,
            self.tail_template(conn) % (len(seq_b), seq_b, len(ts_b), ts_b),
        ]

    def speaker_head(self, key: str, sid: bytes, name: bytes, pcm_size: int) -> bytes:
        """The command up to the PCM bytes; raises FrameError for an outsized speaker."""
        if len(sid) > self._speaker_max_bytes or len(name) > self._speaker_max_bytes:
            raise FrameError("header_too_large", f"speaker id/name of {max(len(sid), len(name))} bytes")
        return self.head(key) + (
            b"$10\r\nspeaker_id\r\n$%d\r\n%b\r\n$12\r\nspeaker_name\r\n$%d\r\n%b\r\n$3\r\npcm\r\n$%d\r\n"
            % (len(sid), sid, len(name), name, pcm_size)
        )

    def tail_template(self, conn: bytes) -> bytes:
        """The command after the PCM bytes, as a ``%`` template of seq and ts (bytes each)."""
        const = (b"$4\r\nconn\r\n$%d\r\n%b\r\n" % (len(conn), conn)).replace(b"%", b"%%")
        return (
            (b"\r\n" + self._tail_sr + b"$3\r\nseq\r\n").replace(b"%", b"%%")
            + b"$%d\r\n%b\r\n"
            + const
            + b"$2\r\nts\r\n$%d\r\n%b\r\n"
        )


#: Frame headers remembered per audio connection: one per speaker taking turns.
MAX_KNOWN_HEADERS = 8


class FrameEncoder:
    """Encodes one audio connection's binary frames into XADDs, straight from the bot's bytes.

    A bot repeats each speaker's frame header (speaker id and name) and its frame
    size frame after frame, so the part of the command they make is kept: a frame
    that starts with the same header bytes and has the same length decodes the
    same, and is not decoded again (docs/ARCHITECTURE.md: a large share of the
    per-frame Python, by ``bench.hotpath``). The last header is checked first; the others
    seen lately (several people talking take turns, frame by frame) are looked
    up. Anything new is parsed by :func:`~gateway.protocol.parse_audio_frame`,
    so bad frames fail as they always do, with a
    :class:`~gateway.exceptions.FrameError`, and are never remembered.
    """

    __slots__ = ("_encoder", "_head", "_known", "_pcm_at", "_prefix", "_size", "_tail", "key", "trim")

    def __init__(self, encoder: AudioEncoder, key: str, conn: bytes, trim: StreamTrim | None = None) -> None:
        self._encoder = encoder
        self.key = key  # the stream
        self.trim = trim  # keeps the stream within its bytes (large frames trim it shorter)
        self._prefix = b""
        self._size = -1  # matches no frame: the first one is always looked up
        self._pcm_at = 0
        self._head = b""
        self._tail = encoder.tail_template(conn)
        # (header bytes, frame size) -> (header bytes, frame size, PCM offset, command head)
        self._known: dict[tuple[bytes, int], tuple[bytes, int, int, bytes]] = {}

    def encode(self, data: bytes, seq: int, ts_ms: int) -> list[bytes]:
        """Pieces of the frame's XADD, as :meth:`AudioEncoder.encode` makes them; the PCM
        is ``pieces[1]``."""
        if len(data) != self._size or not data.startswith(self._prefix):
            self._prefix, self._size, self._pcm_at, self._head = self._header_of(data)
        seq_b = b"%d" % seq
        ts_b = b"%d" % ts_ms
        head = self._head
        trim = self.trim
        if trim is not None:
            trim.n += 1  # StreamTrim.note, inlined: nearly every frame stops here
            if (len(data) > trim.share or trim.big) and (maxlen := trim.check(len(data))) is not None:
                encoder = self._encoder
                head = encoder.head(self.key, maxlen) + head[len(encoder.head(self.key)) :]
        return [head, data[self._pcm_at :], self._tail % (len(seq_b), seq_b, len(ts_b), ts_b)]

    def _header_of(self, data: bytes) -> tuple[bytes, int, int, bytes]:
        pcm_at = audio_pcm_offset(data)
        known = self._known.get((data[:pcm_at], len(data))) if pcm_at > 0 else None
        if known is not None:
            return known
        frame = parse_audio_frame(data)  # raises FrameError: nothing is kept from a bad frame
        pcm_at = len(data) - len(frame.pcm)
        head = self._encoder.speaker_head(
            self.key, frame.speaker_id.encode(), frame.speaker_name.encode(), len(frame.pcm)
        )
        if len(self._known) >= MAX_KNOWN_HEADERS:
            self._known.clear()
        known = self._known[(data[:pcm_at], len(data))] = (data[:pcm_at], len(data), pcm_at, head)
        return known
