"""Exceptions raised by the gateway.

Every exception the gateway defines derives from :class:`GatewayError`::

    GatewayError
    ├── ProtocolError             bytes or JSON from a bot that break the vendor protocol
    │   ├── FrameError            a malformed binary audio frame
    │   ├── MessageError          a text frame that is not the JSON we expect
    │   └── BadRoute              a request path or bot_id we cannot serve
    ├── CommandRejected           a worker's command that must not reach the bot
    ├── AuthError                 a bot token missing, malformed, expired or for another bot
    │                             (defined in gateway.auth, next to the token code)
    ├── ConfigError               settings that cannot work together
    ├── RedisUnavailable          Redis could not be reached within the retry budget
    └── InternalTaskFailed        a task the gateway cannot serve without ended by itself

The protocol, command and auth errors carry a short machine ``reason`` (a
closed set, used as a metric label) and a human ``detail``. Neither is ever put
in a WebSocket close reason verbatim when it may echo untrusted input.
"""

from __future__ import annotations


class GatewayError(Exception):
    """Base class of every error the gateway raises on purpose."""


class ProtocolError(GatewayError):
    """Input from a bot that does not follow the vendor's protocol."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(reason, detail)
        self.reason = reason
        self.detail = detail

    def __str__(self) -> str:
        return f"{self.reason}: {self.detail}" if self.detail else self.reason


class FrameError(ProtocolError):
    """A binary audio frame that cannot be decoded."""


class MessageError(ProtocolError):
    """A text frame that is not a JSON object of the expected shape."""


class BadRoute(ProtocolError):
    """A request path, or a bot_id, that the gateway cannot serve."""


class CommandRejected(GatewayError):
    """A worker's command that fails validation, or can no longer be delivered."""

    def __init__(self, reason: str, detail: str, command: str = "unknown", limit: str | None = None) -> None:
        super().__init__(reason, detail, command)
        self.reason = reason
        self.detail = detail
        self.command = command
        #: The bound it hit (``playback_bound_hits{bound}``), when a bound rejected it.
        self.limit = limit

    def __str__(self) -> str:
        return f"{self.command}: {self.reason}: {self.detail}"


class ConfigError(GatewayError):
    """Settings that are invalid or contradict each other."""


class RedisUnavailable(GatewayError):
    """Redis did not answer within the connection retry budget."""

    def __init__(self, url: str, attempts: int) -> None:
        super().__init__(url, attempts)
        self.url = url
        self.attempts = attempts

    def __str__(self) -> str:
        return f"Redis at {self.url} unreachable after {self.attempts} attempts"


class InternalTaskFailed(GatewayError):
    """A task the gateway cannot serve without (the publisher, keepalive...) ended by itself.

    The process stops and exits non-zero so that its supervisor (Kubernetes)
    replaces it: serving on without it would accept audio it can never write.
    """
