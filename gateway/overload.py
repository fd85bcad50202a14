"""Deliberate degradation when a gateway process is offered more than it can take.

A plain bridge under overload falls behind on every socket at once: its event
loop lags, keepalive pongs wait behind unread audio, the ping timeout closes
the sockets (1011) and most of the audio is lost by accident. Here the event
loop's lag is measured continuously; when it passes ``overload_lag_s`` the
gateway

* sheds a growing share of incoming audio right after reading it (before any
  decoding or Redis work), spread evenly over all connections and counted as
  ``frames_dropped_total{reason="overload"}``, so the loop keeps reading every
  socket (and its pongs) and no bot is disconnected;
* reports not-ready, so no new bots are routed to it (an autoscaler adds one).

The share rises while the lag stays high and falls back once it is low
(additive increase, additive decrease), so a short burst costs little.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from gateway.metrics import Metrics

log = logging.getLogger(__name__)

TICK_S = 0.05
STEP_UP = 0.05
STEP_DOWN = 0.02
MAX_RATIO = 0.95  # always let some audio through: a trickle shows the bot is alive


class LoadShedder:
    """Measures event-loop lag and decides what share of audio to shed."""

    def __init__(self, lag_threshold_s: float, metrics: Metrics) -> None:
        self.lag_threshold_s = lag_threshold_s
        self.metrics = metrics
        self.ratio = 0.0
        self.lag_s = 0.0
        self._task: asyncio.Task[None] | None = None

    @property
    def overloaded(self) -> bool:
        return self.ratio > 0.0

    def start(self) -> None:
        if self.lag_threshold_s > 0:
            self._task = asyncio.create_task(self._run(), name="overload-watch")

    def update(self, lag_s: float) -> None:
        """One tick's decision (pure, so tests can drive it)."""
        self.lag_s = lag_s
        before = self.ratio
        if lag_s > self.lag_threshold_s:
            self.ratio = min(MAX_RATIO, self.ratio + STEP_UP)
        elif lag_s < self.lag_threshold_s / 2:
            self.ratio = max(0.0, self.ratio - STEP_DOWN)
        if (before == 0.0) != (self.ratio == 0.0):
            log.warning(
                "overloaded: shedding audio and refusing new bots" if self.ratio else "overload over",
                extra={"lag_s": round(lag_s, 3)},
            )
        self.metrics.loop_lag.set(lag_s)
        self.metrics.shed_ratio.set(self.ratio)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            start = loop.time()
            await asyncio.sleep(TICK_S)
            self.update(max(0.0, loop.time() - start - TICK_S))

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
