"""Validation of worker commands against the vendor's command tables (pure; no I/O).

A worker XADDs one command per entry to a bot's command stream, as field
``json`` (the vendor's JSON command, exactly as its page shows it) or field
``msgpack`` (the same map, MessagePack-encoded; there ``audiochunk`` and ``img``
may be raw bytes). ``bot_id`` may be left out: the gateway fills it in.

Beyond the vendor's table, ``sendaudio`` takes any rate of
:data:`~gateway.audio.SAMPLE_RATES`, ``encoding: "float32"`` (little-endian,
-1..1) besides ``pcm16``, and an ``utterance_id`` of the worker's choosing;
the gateway converts, chunks and paces the audio (:mod:`gateway.playback`).

:func:`parse_command` turns an entry into a :class:`Command` ready to send, or
raises :class:`~gateway.exceptions.CommandRejected` with a reason from
:data:`REJECT_REASONS` and a precise detail. Nothing else escapes it, whatever the
entry holds: workers in any language, bugs included, write these streams. The
detail is valid UTF-8 and at most :data:`DETAIL_MAX_CHARS` (it is published);
an accepted command's strings are valid Unicode (JSON's ``"\ud83d"`` escape makes
strings that are not), so sending it and publishing what it echoes cannot fail.
"""

from __future__ import annotations

import base64
import binascii
import json
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import msgpack
import numpy as np

from gateway.audio import ENCODINGS, SAMPLE_RATES, decode_samples
from gateway.exceptions import CommandRejected

COMMANDS = ("sendaudio", "sendmsg", "sendchat", "interrupt", "sendimg", "sendimg_url")

#: Why a command was rejected; a closed set, used as a metric label.
REJECT_REASONS = (
    "bad_encoding",
    "unknown_command",
    "missing_field",
    "bad_field",
    "unknown_field",
    "bot_id_mismatch",
    "too_large",
    "expired",
    "queue_full",
    # The gateway could not process the entry (a bug of ours, logged with a traceback):
    # rejected rather than retried, so that one entry can never block a bot's stream.
    "unprocessable",
)

#: Longest rejection detail: it is echoed in a ``command_rejected`` event and logged.
DETAIL_MAX_CHARS = 300
_SHOWN_MAX_CHARS = 60  # of one name or value echoed in a detail

#: Longest ``utterance_id`` a worker may choose (it is echoed in playback events).
UTTERANCE_ID_MAX_LEN = 128
#: Default cap on a decoded ``sendimg`` image (``--image-max-bytes``).
IMAGE_MAX_BYTES = 2 << 20
_IMAGE_MAGIC = {b"\xff\xd8\xff": "JPEG", b"\x89PNG\r\n\x1a\n": "PNG"}


@dataclass(frozen=True, slots=True)
class FieldSpec:
    kind: type
    required: bool = True
    check: Callable[[Any], str | None] | None = None  # returns a complaint, or None


def _one_of(*allowed: Any) -> Callable[[Any], str | None]:
    def check(value: Any) -> str | None:
        return None if value in allowed else f"must be one of {', '.join(map(repr, allowed))}"

    return check


def _show(value: object) -> str:
    """Untrusted text as a detail may echo it: a repr (controls and lone surrogates
    escaped, so always UTF-8), cut short; other values by their type only (a repr of
    nested lists could be huge, or too deep to make)."""
    if not isinstance(value, str | bytes):
        return type(value).__name__
    shown = repr(value[:_SHOWN_MAX_CHARS])
    return shown + "..." if len(value) > _SHOWN_MAX_CHARS else shown


def _wire_type(value: object) -> str:
    """A value's type as the worker wrote it (JSON or MessagePack), not Python's name for it:
    a worker in Go or TypeScript never wrote a ``NoneType``."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, bytes):
        return "binary data"
    if isinstance(value, list | tuple):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return "a string" if isinstance(value, str) else "an unknown type"


def _int_text(value: int) -> str:
    """An int for a detail: str() of a 4,000-digit int is long, and past 4,300 digits it raises."""
    return str(value) if -(10**18) < value < 10**18 else f"a {value.bit_length()}-bit integer"


def _bounded(detail: str) -> str:
    """A detail fit to publish: valid UTF-8 and at most DETAIL_MAX_CHARS."""
    if not detail.isascii():
        detail = detail.encode("utf-8", "backslashreplace").decode("utf-8")
    if len(detail) > DETAIL_MAX_CHARS:
        detail = detail[: DETAIL_MAX_CHARS - 3] + "..."
    return detail


def _lone_surrogate(value: str) -> str | None:
    """A complaint if ``value`` cannot be UTF-8: JSON's ``\\ud83d`` escape yields such
    strings (JavaScript's JSON.stringify of a string cut inside an emoji), and sending
    or publishing one would fail later, far from the worker's mistake."""
    try:
        value.encode()
    except UnicodeEncodeError as exc:
        return (
            f"has a lone UTF-16 surrogate (U+{ord(value[exc.start]):04X} at character {exc.start}): "
            "not Unicode text (a string cut inside a character?)"
        )
    return None


def _sample_rate(value: int) -> str | None:
    if value in SAMPLE_RATES:
        return None
    return f"{_int_text(value)} Hz is not supported; use one of {', '.join(map(str, SAMPLE_RATES))}"


def _mono(value: int) -> str | None:
    if value == 1:
        return None
    return f"{_int_text(value)}: bots play mono only, send channels 1 (or leave it out)"


def _utterance_id(value: str) -> str | None:
    if 1 <= len(value) <= UTTERANCE_ID_MAX_LEN:
        return None
    return f"must be 1 to {UTTERANCE_ID_MAX_LEN} characters"


def _http_url(value: str) -> str | None:
    if not value:
        return "must not be empty"
    try:
        url = urllib.parse.urlsplit(value)
    except ValueError:
        return "is not a URL"
    if url.scheme.lower() not in ("http", "https") or not url.hostname:
        return "must be an http:// or https:// URL with a host"
    if any(c.isspace() for c in value):
        return "must not contain whitespace"
    return None


# The vendor's tables, field by field. ``bytes`` marks a base64 field that
# MessagePack may also carry raw.
SPECS: dict[str, dict[str, FieldSpec]] = {
    "sendaudio": {
        "audiochunk": FieldSpec(bytes),
        "sample_rate": FieldSpec(int, check=_sample_rate),
        # pcm16 as the vendor documents; float32 (little-endian, -1..1) is ours.
        "encoding": FieldSpec(str, required=False, check=_one_of(*ENCODINGS)),
        "channels": FieldSpec(int, required=False, check=_mono),
        "endianness": FieldSpec(str, required=False, check=_one_of("little")),
        # Ours, never sent to the bot: names the utterance in playback events.
        "utterance_id": FieldSpec(str, required=False, check=_utterance_id),
    },
    "sendmsg": {
        # Both are required on the wire; a worker may give either, we send both.
        "message": FieldSpec(str, required=False),
        "msg": FieldSpec(str, required=False),
    },
    "sendchat": {
        "role": FieldSpec(str, check=_one_of("assistant", "user")),
        "text": FieldSpec(str),
        "is_final": FieldSpec(bool),
    },
    "interrupt": {
        "action": FieldSpec(str, check=_one_of("clear_audio_queue")),
    },
    "sendimg": {
        "img": FieldSpec(bytes),
    },
    "sendimg_url": {
        "img_url": FieldSpec(str, check=_http_url),
    },
}

_TYPE_NAMES = {str: "a string", int: "an integer", bool: "a boolean", bytes: "base64 data"}


@dataclass(slots=True)
class Command:
    """A validated command for one bot.

    ``payload`` is the vendor's JSON map with ``bot_id`` filled in and base64
    fields as strings; ``data`` holds the decoded bytes of a base64 field
    (the PCM of ``sendaudio``, the image of ``sendimg``). A ``sendaudio`` also
    carries its ``samples`` (int16, at ``payload["sample_rate"]``) and the
    worker's ``utterance_id``, which is not part of the vendor's payload.
    """

    name: str
    payload: dict[str, Any]
    entry_id: str = ""
    data: bytes | None = field(default=None, repr=False)
    samples: np.ndarray | None = field(default=None, repr=False)
    utterance_id: str = ""

    def to_json(self) -> str:
        return json.dumps(self.payload, separators=(",", ":"), ensure_ascii=False)


#: The entry fields a command may come in, as Redis hands them over (bytes, or str
#: with ``decode_responses``).
_ENTRY_FIELDS: dict[bytes | str, str] = {
    b"json": "json",
    "json": "json",
    b"msgpack": "msgpack",
    "msgpack": "msgpack",
}


class _NotStrict(ValueError):
    """A map that is not one unambiguous value: NaN or Infinity, or a key given twice."""


def _one_value_per_key(pairs: list[tuple[Any, Any]]) -> dict[Any, Any]:
    """object_pairs_hook: a key given twice is refused, not silently last-wins (which one did
    the worker mean?). Cheap: one dict() and a length test per map."""
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[Any] = set()
        for key, _ in pairs:
            if key in seen:
                raise _NotStrict(f"field {_show(key)} appears twice")
            seen.add(key)
    return obj


def _no_constant(name: str) -> Any:
    """parse_constant: NaN and Infinity are not JSON; the bot's strict parser would choke."""
    raise _NotStrict(f"{name} is not JSON (use a number, or null)")


_STRICT_JSON = json.JSONDecoder(object_pairs_hook=_one_value_per_key, parse_constant=_no_constant)


def _field_name(key: object) -> object:
    """A stream field name as a detail shows it: text if it is UTF-8, else its bytes."""
    if isinstance(key, bytes):
        try:
            return key.decode()
        except UnicodeDecodeError:
            return key
    return key


def decode_entry(fields: Mapping[Any, Any], max_bytes: int) -> dict[str, Any]:
    """Read the command map out of a stream entry's ``json`` or ``msgpack`` field.

    Other fields are ignored. The map's keys are str; JSON is strict (no NaN,
    Infinity or repeated keys) and so is MessagePack (no repeated keys).
    """
    found = [(kind, raw) for key, raw in fields.items() if (kind := _ENTRY_FIELDS.get(key)) is not None]
    if len(found) != 1:
        names = sorted(_show(_field_name(key)) for key in fields)
        shown = ", ".join(names[:8]) + (f" and {len(names) - 8} more" if len(names) > 8 else "")
        raise CommandRejected(
            "bad_encoding", f"entry must have exactly one of the fields json, msgpack; it has [{shown}]"
        )
    kind, raw = found[0]
    if isinstance(raw, str):
        try:
            raw = raw.encode()
        except UnicodeEncodeError as exc:
            raise CommandRejected(
                "bad_encoding", f"field {kind} is not UTF-8 (a lone surrogate at character {exc.start})"
            ) from exc
    elif not isinstance(raw, bytes):
        raise CommandRejected("bad_encoding", f"field {kind} is {type(raw).__name__}, not bytes")
    if len(raw) > max_bytes:
        raise CommandRejected("too_large", f"{len(raw)} bytes, the limit is {max_bytes}")
    value = _decode_json(raw) if kind == "json" else _decode_msgpack(raw)
    if not isinstance(value, dict):
        raise CommandRejected("bad_encoding", f"the {kind} value must be a map")
    return value


def _decode_json(raw: bytes) -> Any:
    # json.loads reads UTF-16 and UTF-32 too: so do we, but strictly (it lets encoded
    # surrogates through), and with a decoder built once (json.loads with hooks builds one per call).
    encoding = json.detect_encoding(raw)
    try:
        return _STRICT_JSON.decode(raw.decode(encoding))
    except _NotStrict as exc:
        raise CommandRejected("bad_encoding", f"field json: {exc}") from exc
    except json.JSONDecodeError as exc:
        raise CommandRejected(
            "bad_encoding", f"field json does not decode: {exc.msg} at character {exc.pos}"
        ) from exc
    except UnicodeDecodeError as exc:
        raise CommandRejected(
            "bad_encoding", f"field json is not {encoding.upper()} (byte {exc.start})"
        ) from exc
    except RecursionError as exc:
        raise CommandRejected("bad_encoding", "field json is nested too deeply") from exc
    except ValueError as exc:  # an integer of more than 4,300 digits
        raise CommandRejected("bad_encoding", "field json does not decode") from exc


def _decode_msgpack(raw: bytes) -> Any:
    try:
        # strict_map_key: keys are str or bytes, never tuples or ints (nor hash-collision games).
        value = msgpack.unpackb(raw, raw=False, strict_map_key=True, object_pairs_hook=_one_value_per_key)
    except _NotStrict as exc:
        raise CommandRejected("bad_encoding", f"field msgpack: {exc}") from exc
    except (ValueError, msgpack.UnpackException) as exc:  # UnicodeDecodeError and StackError included
        raise CommandRejected("bad_encoding", f"field msgpack does not decode: {exc}") from exc
    if isinstance(value, dict):
        for key in value:
            if not isinstance(key, str):  # a bin key: what did the worker mean?
                raise CommandRejected(
                    "bad_encoding", f"field names must be strings; {_show(key)} is {type(key).__name__}"
                )
    return value


def _type_ok(value: Any, kind: type) -> bool:
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if kind is bytes:
        return isinstance(value, str | bytes)
    return isinstance(value, kind)


def _decode_base64(name: str, value: str | bytes, command: str) -> bytes:
    if isinstance(value, bytes):
        return value
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise CommandRejected("bad_field", f"{name} is not valid base64", command) from exc


def validate_command(raw: dict[str, Any], bot_id: str, *, max_image_bytes: int = IMAGE_MAX_BYTES) -> Command:
    """Check a decoded command map against the vendor's table for its command."""
    name = raw.get("command")
    if not isinstance(name, str) or name not in SPECS:
        one_of = ", ".join(COMMANDS)
        if "command" not in raw:
            detail = f"the command field is missing: it must be one of {one_of}"
        elif not isinstance(name, str):
            detail = f"command must be a string, one of {one_of}; got {_wire_type(name)}"
        else:
            detail = f"command {_show(name)} is not one of {one_of}"
        raise CommandRejected("unknown_command", detail)
    spec = SPECS[name]
    claimed = raw.get("bot_id", bot_id)
    if claimed != bot_id:
        raise CommandRejected("bot_id_mismatch", f"bot_id {_show(claimed)} in the stream of {bot_id!r}", name)
    unknown = set(raw) - set(spec) - {"command", "bot_id"}
    if unknown:
        shown = sorted(map(_show, unknown))
        more = f" and {len(shown) - 5} more" if len(shown) > 5 else ""
        raise CommandRejected("unknown_field", f"unknown field(s) {', '.join(shown[:5])}{more}", name)

    payload: dict[str, Any] = {"command": name, "bot_id": bot_id}
    data: bytes | None = None
    for fname, fspec in spec.items():
        if fname not in raw:
            if fspec.required:
                raise CommandRejected("missing_field", f"{fname} is required", name)
            continue
        value = raw[fname]
        if not _type_ok(value, fspec.kind):
            raise CommandRejected(
                "bad_field", f"{fname} must be {_TYPE_NAMES[fspec.kind]}, got {type(value).__name__}", name
            )
        if fspec.kind is str and not value.isascii() and (complaint := _lone_surrogate(value)):
            raise CommandRejected("bad_field", f"{fname} {complaint}", name)
        if fspec.kind is bytes:
            data = _decode_base64(fname, value, name)
            if not data:
                raise CommandRejected("bad_field", f"{fname} is empty", name)
            if isinstance(value, bytes) and name != "sendaudio":
                # sendimg is sent as it is; sendaudio is re-chunked by the playback
                # scheduler, so re-encoding a minute of raw audio would be wasted work.
                value = base64.b64encode(value).decode()
        elif fspec.check is not None and (complaint := fspec.check(value)):
            raise CommandRejected("bad_field", f"{fname} {complaint}", name)
        payload[fname] = value

    if name == "sendaudio" and data is not None:
        return _audio_command(payload, data)
    if name == "sendimg" and data is not None:
        _check_image(data, max_image_bytes)
    if name == "sendmsg":
        _settle_chat_text(payload)
    return Command(name, payload, data=data)


def _audio_command(payload: dict[str, Any], data: bytes) -> Command:
    encoding = payload.get("encoding", "pcm16")
    if encoding == "pcm16" and len(data) % 2:
        raise CommandRejected(
            "bad_field", f"audiochunk has {len(data)} bytes, not whole PCM16 samples", "sendaudio"
        )
    try:
        samples = decode_samples(data, encoding)
    except ValueError as exc:
        raise CommandRejected("bad_field", str(exc), "sendaudio") from exc
    utterance_id = payload.pop("utterance_id", "")
    return Command("sendaudio", payload, data=data, samples=samples, utterance_id=utterance_id)


def _check_image(data: bytes, max_bytes: int) -> None:
    """The bot shows JPEG or PNG only: check the bytes, not a name or a claim."""
    if len(data) > max_bytes:
        raise CommandRejected("too_large", f"img is {len(data)} bytes, the limit is {max_bytes}", "sendimg")
    if not any(data.startswith(magic) for magic in _IMAGE_MAGIC):
        raise CommandRejected(
            "bad_field", f"img is not a JPEG or PNG (starts with {data[:8].hex()})", "sendimg"
        )


def _settle_chat_text(payload: dict[str, Any]) -> None:
    """The vendor wants the text in both ``message`` and ``msg`` (platforms differ)."""
    message, msg = payload.get("message"), payload.get("msg")
    if message is None and msg is None:
        raise CommandRejected("missing_field", "message (or msg) is required", "sendmsg")
    if message is not None and msg is not None and message != msg:
        raise CommandRejected("bad_field", "message and msg differ; they must carry the same text", "sendmsg")
    text = message if message is not None else msg
    payload["message"] = payload["msg"] = text


def parse_command(
    fields: Mapping[Any, Any],
    bot_id: str,
    *,
    entry_id: str = "",
    max_bytes: int = 16 << 20,
    max_image_bytes: int = IMAGE_MAX_BYTES,
) -> Command:
    """Decode and validate one command stream entry.

    Raises :class:`CommandRejected` and nothing else, whatever ``fields`` holds; its
    detail is valid UTF-8 of at most :data:`DETAIL_MAX_CHARS`, fit to publish.
    """
    try:
        command = validate_command(decode_entry(fields, max_bytes), bot_id, max_image_bytes=max_image_bytes)
    except CommandRejected as exc:
        # One place bounds every detail, however it was built (checks echo values).
        exc.detail = _bounded(exc.detail)
        exc.args = (exc.reason, exc.detail, exc.command)
        raise
    command.entry_id = entry_id
    return command


def command_label(raw_name: object) -> str:
    """A metric-safe command label (unknown names collapse to ``unknown``)."""
    return raw_name if isinstance(raw_name, str) and raw_name in SPECS else "unknown"


def entry_time_ms(entry_id: str) -> int:
    """The Redis server time (Unix ms) at which an auto-ID'd stream entry was added."""
    return int(entry_id.split("-", 1)[0])
