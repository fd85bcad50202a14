"""Structured logging: one JSON object (or one key=value line) per record.

Context goes in ``extra``: ``log.info("bot ready", extra={"bot_id": b})``; every
extra key becomes a field. :class:`RateLimiter` keeps a flood of bad frames
from turning into a flood of log lines.

A record is always one line of printable UTF-8, whatever a client put into it
(a request path, a bot's text): every character ``str.isprintable`` refuses is
written as a JSON escape of four hex digits (``\\u001b`` for ESC). That covers C0 and C1 controls and DEL
(terminal escapes), the line breaks some readers split on besides ``\\n``
(U+0085, U+2028, U+2029, which ``json.dumps(ensure_ascii=False)`` leaves raw),
lone surrogates (not encodable: a strict stream raised, a lenient one wrote
garbage) and bidi overrides that make a line read other than it is.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from typing import Any, Protocol

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


def _escape(char: str) -> str:
    code = ord(char)
    if code > 0xFFFF:  # as JSON writes it: a UTF-16 pair
        code -= 0x10000
        return f"\\u{0xD800 + (code >> 10):04x}\\u{0xDC00 + (code & 0x3FF):04x}"
    return f"\\u{code:04x}"


def _printable(text: str) -> str:
    """JSON text with every unprintable character escaped: still the same JSON (such
    characters can only be inside its strings), now one printable line."""
    if text.isprintable():  # nearly always: one pass in C
        return text
    return "".join(c if c.isprintable() else _escape(c) for c in text)


def _token(text: str) -> str:
    """A key or value of a key=value line: bare if it is one plain token, else a JSON string."""
    if text and text.isprintable() and " " not in text and '"' not in text and "=" not in text:
        return text
    return _printable(json.dumps(text, ensure_ascii=False))


def error_text(exc: BaseException | None) -> str:
    """An exception for a log line: its class and its message.

    redis-py 8's ``repr`` of its errors is only ``server:RedisError``: the text Redis
    sent (``CLUSTERDOWN``, ``LOADING``, ``MOVED``...) is what an operator needs.
    """
    if exc is None:
        return ""
    text = str(exc)
    return f"{type(exc).__name__}: {text}"[:300] if text else type(exc).__name__


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return _printable(json.dumps(_fields(record), default=str, ensure_ascii=False))


class KeyValueFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return " ".join(f"{_token(str(key))}={_token(str(value))}" for key, value in _fields(record).items())


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


class _Incrementable(Protocol):
    def inc(self, amount: float = 1) -> None: ...


class RateLimiter:
    """Allow ``burst`` events, then one per ``interval_s``, per key; count the rest.

    ``counter`` (``meetstream_gateway_log_lines_suppressed_total``) is told of every
    line held back, so that an operator sees that the log is not the whole story.
    """

    def __init__(
        self,
        burst: int = 5,
        interval_s: float = 10.0,
        max_keys: int = 10_000,
        counter: _Incrementable | None = None,
    ) -> None:
        self.burst = burst
        self.interval_s = interval_s
        self.max_keys = max_keys
        self._state: dict[str, tuple[float, float]] = {}
        self.suppressed = 0
        self.counter = counter

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
        if self.counter is not None:
            self.counter.inc()
        return False
