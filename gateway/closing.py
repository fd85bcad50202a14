"""Closing bot connections from code that must not wait, and counting one bot's failures.

Shared by the inbound side (:mod:`gateway.bot_server`) and the outbound side
(:mod:`gateway.delivery`): either may decide that a connection must go, often
from a turn of the event loop that cannot await (a socket callback, the
command reader's).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any

from websockets.asyncio.server import ServerConnection

from gateway.close_codes import CloseReason
from gateway.metrics import Metrics
from gateway.sessions import BotConnection

log = logging.getLogger(__name__)


class Closer:
    """Closes connections in background tasks it keeps until they finish."""

    def __init__(self, metrics: Metrics, close_timeout_s: float) -> None:
        self.metrics = metrics
        self.close_timeout_s = close_timeout_s
        self._background: set[asyncio.Task[Any]] = set()

    async def close(self, ws: ServerConnection, code: int, text: str) -> None:
        """Close with a code, but never wait on a peer that does not read: websockets drains
        its write buffer before the close timeout starts, so a stuck bot would hang us."""
        try:
            async with asyncio.timeout(self.close_timeout_s):
                await ws.close(code, text)
        except TimeoutError:
            ws.transport.abort()

    def close_for(self, conn: BotConnection, reason: CloseReason, code: int, text: str) -> None:
        """Close from a turn that cannot wait, for ``reason`` (what the metrics will count)."""
        conn.close_reason = reason
        self.spawn(self.close(conn.ws, code, text))

    def close_soon(self, conn: BotConnection, code: int, reason: CloseReason, text: str) -> None:
        """Close from a turn that cannot wait; ``reason`` is counted unless one was decided first."""
        if conn.close_reason is None or conn.close_reason == CloseReason.ERROR:
            conn.close_reason = reason
        self.spawn(self.close(conn.ws, code, text))

    def fail(self, conn: BotConnection, stage: str, exc: BaseException) -> None:
        """Count and log an unexpected error inside one bot's handling (a bug of ours)."""
        self.metrics.bot_failures.labels(stage).inc()
        conn.close_reason = conn.close_reason or CloseReason.ERROR
        log.error(
            "bot handling failed",
            extra={"bot_id": conn.bot_id, "channel": conn.channel, "stage": stage},
            exc_info=exc,
        )

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
