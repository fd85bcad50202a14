"""Structured logging: one JSON object (or one key=value line) per record.

Context goes in ``extra``: ``log.info("bot ready", extra={"bot_id": b})``; every
extra key becomes a field. :class:`RateLimiter` keeps a flood of bad frames
from turning into a flood of log lines.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from typing import Any

_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    out: dict[str, Any] = {
        "ts": round(record.created, 3),
        "level": record.levelname.lower(),
        "logger": record.name,
        "msg": record.getMessage(),
    }
    for key, value in vars(record).items():
        if key not in _STANDARD and not key.startswith("_"):
            out[key] = value
    if record.exc_info and record.exc_info[0] is not None:
        out["exc"] = logging.Formatter().formatException(record.exc_info)
    return out


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return json.dumps(_fields(record), default=str, ensure_ascii=False)


class KeyValueFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        parts = []
        for key, value in _fields(record).items():
            text = str(value)
            if not text or any(c in text for c in ' "=\n'):
                text = json.dumps(text, ensure_ascii=False)
            parts.append(f"{key}={text}")
        return " ".join(parts)


_TOKEN_RE = re.compile(r"((?:[?&]|\b)token=)[^&\s\"']+|(Bearer\s+)[A-Za-z0-9._~+/=-]+", re.IGNORECASE)


def scrub(text: str) -> str:
    """Cut credentials out of a log line: ``token=`` query values and bearer tokens."""
    return _TOKEN_RE.sub(lambda m: (m.group(1) or m.group(2)) + "[redacted]", text)


class ScrubFilter(logging.Filter):
    """Defence in depth: whatever a library logs (a request line, a URL), no token survives."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        cleaned = scrub(message)
        if cleaned != message:
            record.msg, record.args = cleaned, None
        for key, value in vars(record).items():
            if key not in _STANDARD and isinstance(value, str) and "token" in value.lower():
                setattr(record, key, scrub(value))
        return True


def configure_logging(level: str = "info", fmt: str = "json") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else KeyValueFormatter())
    handler.addFilter(ScrubFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # websockets logs every failed handshake with the request line, which may
    # carry a query-string token: keep its chatter out unless debugging.
    logging.getLogger("websockets").setLevel(logging.WARNING if level != "debug" else logging.INFO)


class RateLimiter:
    """Allow ``burst`` events, then one per ``interval_s``, per key; count the rest."""

    def __init__(self, burst: int = 5, interval_s: float = 10.0, max_keys: int = 10_000) -> None:
        self.burst = burst
        self.interval_s = interval_s
        self.max_keys = max_keys
        self._state: dict[str, tuple[float, float]] = {}
        self.suppressed = 0

    def allow(self, key: str, now: float | None = None) -> bool:
        now = time.monotonic() if now is None else now
        tokens, last = self._state.get(key, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - last) / self.interval_s)
        if len(self._state) >= self.max_keys and key not in self._state:
            self._state.clear()  # bounded: forget old keys rather than grow
        if tokens >= 1.0:
            self._state[key] = (tokens - 1.0, now)
            return True
        self._state[key] = (tokens, now)
        self.suppressed += 1
        return False

    def forget(self, key: str) -> None:
        self._state.pop(key, None)
