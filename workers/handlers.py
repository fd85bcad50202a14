"""The handlers a worker registers, and how each one is called: bounded in time, failures counted.

A handler may be a coroutine function or a plain function. One that overstays
``handler_timeout_s`` is cancelled; one that raises is logged. Either way the
entry it was called for is still acknowledged: a handler that always fails on an
entry must not stop the bot's stream forever.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections import defaultdict
from collections.abc import Awaitable, Callable
from typing import Any

from workers.audio import AudioFrame
from workers.bot import Bot, Event
from workers.metrics import WorkerMetrics
from workers.stats import WorkerStats

log = logging.getLogger("workers.worker")  # the name the SDK's lines had before the split

EventHandler = Callable[[Bot, Event], Awaitable[None] | None]
AudioHandler = Callable[[Bot, AudioFrame], Awaitable[None] | None]
StartHandler = Callable[[Bot], Awaitable[None] | None]
StopHandler = Callable[[Bot, str], Awaitable[None] | None]


class Handlers:
    """What a worker registered, by kind; :meth:`call` runs one for a bot."""

    def __init__(self, timeout_s: float | None, stats: WorkerStats, metrics: WorkerMetrics) -> None:
        self.timeout_s = timeout_s
        self.stats = stats
        self.metrics = metrics
        #: By event type; ``"*"``: every event.
        self.events: dict[str, list[EventHandler]] = defaultdict(list)
        self.audio: list[AudioHandler] = []
        self.start: list[StartHandler] = []
        self.stop: list[StopHandler] = []

    def for_event(self, event_type: str) -> tuple[EventHandler, ...]:
        """The handlers of one event type, then those of every event."""
        return (*self.events.get(event_type, ()), *self.events.get("*", ()))

    async def call(self, fn: Callable[..., Any], bot: Bot, *args: Any) -> None:
        """Run ``fn(bot, *args)`` within the timeout; a failure is logged and counted, never raised."""
        try:
            async with asyncio.timeout(self.timeout_s):
                result = fn(bot, *args)
                if inspect.isawaitable(result):
                    await result
        except TimeoutError:
            self.stats.handler_timeouts += 1
            self.metrics.handler_failures["timeout"].inc()
            log.error(
                "handler timed out",
                extra={
                    "bot_id": bot.bot_id,
                    "handler": fn.__qualname__,
                    "handler_timeout_s": self.timeout_s,
                },
            )
        except Exception:
            # The entry is still acknowledged: a handler that always fails on it
            # must not stop the bot's stream forever.
            self.stats.handler_errors += 1
            self.metrics.handler_failures["error"].inc()
            log.exception("handler failed", extra={"bot_id": bot.bot_id, "handler": fn.__qualname__})
