"""Building command stream entries (pure; no I/O).

Each function returns the fields of one XADD to a bot's command stream, as
``docs/PROTOCOL.md`` defines them: ``json`` for text commands (readable in
``redis-cli``), ``msgpack`` for those carrying bytes, which then travel raw
instead of base64 (a third smaller, and no encoding work for us).
"""

from __future__ import annotations

import json
from typing import Any

import msgpack

Fields = dict[str, bytes | str]


def as_json(command: dict[str, Any]) -> Fields:
    return {"json": json.dumps(command, separators=(",", ":"), ensure_ascii=False)}


def as_msgpack(command: dict[str, Any]) -> Fields:
    return {"msgpack": msgpack.packb(command, use_bin_type=True)}


def sendaudio(pcm16: bytes, sample_rate: int, utterance_id: str | None = None) -> Fields:
    """``utterance_id`` needs a gateway that knows it (issue #3); older ones reject it."""
    if len(pcm16) % 2 or not pcm16:
        raise ValueError(f"{len(pcm16)} bytes is not whole PCM16 samples")
    if sample_rate <= 0:
        raise ValueError("sample_rate must be positive")
    command: dict[str, Any] = {
        "command": "sendaudio",
        "audiochunk": pcm16,
        "sample_rate": int(sample_rate),
        "encoding": "pcm16",
        "channels": 1,
        "endianness": "little",
    }
    if utterance_id is not None:
        command["utterance_id"] = utterance_id
    return as_msgpack(command)


def sendmsg(text: str) -> Fields:
    return as_json({"command": "sendmsg", "message": text, "msg": text})


def sendchat(text: str, *, is_final: bool, role: str = "assistant") -> Fields:
    if role not in ("assistant", "user"):
        raise ValueError("role must be 'assistant' or 'user'")
    return as_json({"command": "sendchat", "role": role, "text": text, "is_final": is_final})


def interrupt() -> Fields:
    return as_json({"command": "interrupt", "action": "clear_audio_queue"})


def sendimg(image: bytes) -> Fields:
    if not image:
        raise ValueError("image is empty")
    return as_msgpack({"command": "sendimg", "img": image})


def sendimg_url(url: str) -> Fields:
    if not url:
        raise ValueError("url is empty")
    return as_json({"command": "sendimg_url", "img_url": url})
