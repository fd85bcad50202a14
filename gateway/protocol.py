"""The bot side of the Meetstream protocol, as pure functions (no I/O).

Binary audio frame, as the vendor's decoders read it::

    0x01 | u16 LE len | speaker_id (UTF-8) | u16 LE len | speaker_name (UTF-8) | PCM16 LE

PCM is 48 kHz mono; the frame duration varies, so nothing here assumes a size.
Older bots send ``{"type": "PCMChunk", "speakerName": ..., "audioData": <base64>}``
as a text frame instead; :func:`parse_legacy_chunk` reads those.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
from dataclasses import dataclass
from typing import Any, Literal

from gateway.exceptions import BadRoute, FrameError, MessageError

AUDIO_MARKER = 0x01
#: Sample rate of the audio bots send (the vendor's "Audio Specs").
BOT_SAMPLE_RATE = 48_000
_HEADER_MIN = 5  # marker + two empty length-prefixed strings

Channel = Literal["audio", "control"]
CHANNELS: tuple[Channel, ...] = ("audio", "control")

#: Reasons a binary frame is refused; a closed set, used as a metric label.
FRAME_ERRORS = ("too_short", "bad_marker", "truncated", "bad_utf8", "odd_pcm", "empty_pcm")

# bot_id goes into Redis key names and log lines: keep it to a safe alphabet, and
# never allow the braces that would change a key's Cluster hash tag.
BOT_ID_MAX_LEN = 128
_BOT_ID_RE = re.compile(rf"[A-Za-z0-9_.:@-]{{1,{BOT_ID_MAX_LEN}}}")


@dataclass(frozen=True, slots=True)
class AudioFrame:
    """One frame of one speaker's audio."""

    speaker_id: str
    speaker_name: str
    pcm: bytes

    def serialize(self) -> bytes:
        """Encode as the vendor's binary frame (what a bot sends)."""
        sid = self.speaker_id.encode()
        name = self.speaker_name.encode()
        if len(sid) > 0xFFFF or len(name) > 0xFFFF:
            raise ValueError("speaker id or name longer than 65535 bytes")
        return b"".join(
            (
                bytes((AUDIO_MARKER,)),
                len(sid).to_bytes(2, "little"),
                sid,
                len(name).to_bytes(2, "little"),
                name,
                self.pcm,
            )
        )

    @property
    def duration_s(self) -> float:
        return len(self.pcm) / 2 / BOT_SAMPLE_RATE


def parse_audio_frame(data: bytes) -> AudioFrame:
    """Decode a binary audio frame; raise :class:`FrameError` with a reason."""
    size = len(data)
    if size < _HEADER_MIN:
        raise FrameError("too_short", f"{size} bytes, header needs at least {_HEADER_MIN}")
    if data[0] != AUDIO_MARKER:
        raise FrameError("bad_marker", f"first byte 0x{data[0]:02x}, expected 0x01")
    sid_len = data[1] | (data[2] << 8)
    off = 3 + sid_len
    if off + 2 > size:
        raise FrameError("truncated", f"speaker_id length {sid_len} runs past the end")
    name_len = data[off] | (data[off + 1] << 8)
    pcm_at = off + 2 + name_len
    if pcm_at > size:
        raise FrameError("truncated", f"speaker_name length {name_len} runs past the end")
    try:
        speaker_id = data[3:off].decode()
        speaker_name = data[off + 2 : pcm_at].decode()
    except UnicodeDecodeError as exc:
        raise FrameError("bad_utf8", "speaker id or name is not UTF-8") from exc
    pcm_len = size - pcm_at
    if pcm_len == 0:
        raise FrameError("empty_pcm", "frame carries no audio")
    if pcm_len % 2:
        raise FrameError("odd_pcm", f"{pcm_len} PCM bytes is not whole 16-bit samples")
    return AudioFrame(speaker_id, speaker_name, data[pcm_at:])


def audio_pcm_offset(data: bytes) -> int:
    """Where a binary audio frame's PCM would begin, from its two length prefixes
    alone (nothing else is checked); -1 if they run past the end.

    Lets a caller recognise a header it has parsed before without parsing it again.
    """
    size = len(data)
    if size < _HEADER_MIN:
        return -1
    off = 3 + (data[1] | (data[2] << 8))
    if off + 2 > size:
        return -1
    pcm_at = off + 2 + (data[off] | (data[off + 1] << 8))
    return pcm_at if pcm_at <= size else -1


class _NotStrict(ValueError):
    """JSON that strict parsers refuse: NaN or Infinity, or a key twice in one object."""


def _strict_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        raise _NotStrict("a key twice")
    return obj


def _strict_constant(name: str) -> Any:
    raise _NotStrict(name)


def _finite_or_null(text: str) -> float | None:
    value = float(text)  # 1e999 is valid JSON, but a double cannot hold it
    return value if math.isfinite(value) else None


# Built once (json.loads with hooks builds a decoder per call); the lenient one reads only
# what the strict one refused. Cost: docs/BENCHMARKS.md, "Figures behind the code".
_STRICT_JSON = json.JSONDecoder(object_pairs_hook=_strict_pairs, parse_constant=_strict_constant)
_LENIENT_JSON = json.JSONDecoder(parse_constant=lambda _name: None, parse_float=_finite_or_null)


def _decode_json(text: str | bytes) -> tuple[Any, bool]:
    """The value, and whether ``text`` was strict JSON. Raises MessageError ``bad_json``."""
    try:
        if not isinstance(text, str):
            text = text.decode(json.detect_encoding(text), "surrogatepass")  # as json.loads reads bytes
        return _STRICT_JSON.decode(text), True
    except _NotStrict:
        pass
    except (ValueError, RecursionError) as exc:  # RecursionError: nested deeper than the parser goes
        raise MessageError("bad_json", "text frame is not valid JSON") from exc
    try:
        return _LENIENT_JSON.decode(text), False  # type: ignore[arg-type]  # str by now
    except (ValueError, RecursionError) as exc:
        raise MessageError("bad_json", "text frame is not valid JSON") from exc


def parse_json_object(text: str | bytes) -> dict[str, Any]:
    """Parse a text frame that must hold a JSON object (:class:`MessageError` otherwise).

    NaN and Infinity read as None and a repeated key's last value wins, as in
    :func:`parse_json_message`, which also gives the text to publish.
    """
    value = _decode_json(text)[0]
    if not isinstance(value, dict):
        raise MessageError("not_object", f"JSON {type(value).__name__}, expected an object")
    return value


def parse_json_message(text: str) -> tuple[dict[str, Any], str]:
    """Parse a bot's text frame into ``(obj, text_to_publish)``.

    The text is published as the bot sent it (``text`` itself, no copy) when it is
    strict JSON. Python's parser also reads NaN, Infinity and an object with a key
    twice, which strict parsers in other languages refuse; such text is published
    re-serialised instead: NaN and +-Infinity (and numbers past a double) as null,
    the last of a repeated key's values, compact separators. Raises
    :class:`MessageError` (``bad_json``, ``not_object``) as :func:`parse_json_object`.
    """
    obj, strict = _decode_json(text)
    if not isinstance(obj, dict):
        raise MessageError("not_object", f"JSON {type(obj).__name__}, expected an object")
    if strict:
        return obj, text
    try:
        normalized = json.dumps(obj, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
        if not normalized.isascii():
            try:
                normalized.encode()
            except UnicodeEncodeError:  # a lone surrogate the bot wrote as \ud83d: keep it escaped
                normalized = json.dumps(obj, allow_nan=False, separators=(",", ":"))
    except (ValueError, RecursionError) as exc:
        raise MessageError("bad_json", "text frame cannot be written as strict JSON") from exc
    return obj, normalized


def is_legacy_chunk(message: dict[str, Any]) -> bool:
    return message.get("type") == "PCMChunk"


def parse_legacy_chunk(message: dict[str, Any]) -> AudioFrame:
    """Decode an older bot's ``PCMChunk`` JSON audio message.

    Legacy chunks name the speaker but carry no id, so ``speaker_id`` is empty
    unless the bot sent a ``speakerId``.
    """
    name = message.get("speakerName")
    audio = message.get("audioData")
    speaker_id = message.get("speakerId", "")
    if not isinstance(name, str) or not isinstance(speaker_id, str):
        raise FrameError("bad_legacy", "PCMChunk needs a string speakerName")
    if not isinstance(audio, str):
        raise FrameError("bad_legacy", "PCMChunk needs a base64 string audioData")
    try:
        pcm = base64.b64decode(audio, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise FrameError("bad_legacy", "PCMChunk audioData is not base64") from exc
    if not pcm:
        raise FrameError("empty_pcm", "PCMChunk carries no audio")
    if len(pcm) % 2:
        raise FrameError("odd_pcm", f"{len(pcm)} PCM bytes is not whole 16-bit samples")
    return AudioFrame(speaker_id, name, pcm)


def validate_bot_id(bot_id: object) -> str:
    """Return ``bot_id`` if it is safe to put in a key name; raise :class:`BadRoute`."""
    if not isinstance(bot_id, str) or not _BOT_ID_RE.fullmatch(bot_id):
        raise BadRoute(
            "bad_bot_id",
            f"bot_id must be 1-{BOT_ID_MAX_LEN} characters of A-Z a-z 0-9 _ . : @ -",
        )
    return bot_id


@dataclass(frozen=True, slots=True)
class Route:
    """Where a bot connected: its channel, and the bot_id if the path names one."""

    channel: Channel
    bot_id: str | None


def parse_path(path: str) -> Route:
    """Map a request path to a :class:`Route`.

    Accepted: ``/{bot_id}/audio``, ``/{bot_id}/control``, ``/audio``, ``/control``,
    with any query string (it carries the auth token, see ``gateway.auth``).
    """
    path = path.split("?", 1)[0].rstrip("/")
    parts = path.split("/")[1:] if path.startswith("/") else []
    if len(parts) == 1 and parts[0] in CHANNELS:
        return Route(parts[0], None)
    if len(parts) == 2 and parts[1] in CHANNELS:
        return Route(parts[1], validate_bot_id(parts[0]))
    raise BadRoute("bad_path", "path must be /audio, /control, /{bot_id}/audio or /{bot_id}/control")


def handshake_bot_id(message: dict[str, Any], route: Route) -> str:
    """Settle a connection's bot_id from its handshake and its path.

    The path wins when only it has one; a handshake that names another bot
    than the path is refused (``bot_id_mismatch``).
    """
    claimed = message.get("bot_id")
    if claimed is None:
        if route.bot_id is None:
            raise BadRoute("no_bot_id", "handshake has no bot_id and the path names none")
        return route.bot_id
    claimed = validate_bot_id(claimed)
    if route.bot_id is not None and claimed != route.bot_id:
        raise BadRoute("bot_id_mismatch", "handshake bot_id differs from the path's")
    return claimed
