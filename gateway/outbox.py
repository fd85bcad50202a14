"""What waits to be written to one bot's control channel: the async side of its scheduler."""

from __future__ import annotations

import asyncio
import contextlib

from gateway.commands import Command
from gateway.playback import PlaybackConfig, PlaybackScheduler

CLOCK_TICK_S = 0.001  # uvloop's clock resolution


class Outbox:
    """What waits to be written to one control connection: the async side of a
    :class:`~gateway.playback.PlaybackScheduler` (which decides order and pacing).

    :meth:`put` never blocks; :meth:`wait` sleeps until new input or the
    scheduler's next deadline. Reading a bot's stream pauses while ``limit``
    non-audio commands wait (nothing is dropped; unread entries stay in Redis).
    Audio does not count: it is bounded by the scheduler, which rejects what
    is over, so that an ``interrupt`` is always read at once.
    """

    def __init__(
        self,
        limit: int,
        bot_id: str = "",
        playback: PlaybackConfig | None = None,
        limit_bytes: int = 1 << 62,
    ) -> None:
        self.limit = limit
        self.limit_bytes = limit_bytes  # command text held (a few large commands are enough)
        self.reported_bytes = 0  # this bot's share of the process's held bytes
        self.scheduler = PlaybackScheduler(bot_id, playback)
        self._wakeup = asyncio.Event()
        self.clock = asyncio.get_running_loop().time  # monotonic, as the loop's timers
        self.reported_held_s = 0.0  # this bot's share of the held-audio gauge

    def put(self, command: Command, wake: bool = True) -> None:
        """Hand a validated command to the scheduler; raises CommandRejected (queue_full).

        ``wake=False``: the caller writes what is due itself and then calls :meth:`settle`.
        """
        self.scheduler.submit(command, self.clock())
        if wake:
            self._wakeup.set()

    def settle(self) -> None:
        """After a caller wrote what was due: wake the sender only if anything is left.

        A sender woken for nothing costs a task switch and a pass through the
        scheduler per command, for nothing.
        """
        if not self.scheduler.idle:
            self._wakeup.set()

    async def wait(self, deadline: float | None) -> None:
        """Sleep until :meth:`put` or ``deadline`` (loop time; None: no deadline)."""
        self._wakeup.clear()
        # Cancelling here loses nothing: the scheduler still holds everything.
        if deadline is None:
            await self._wakeup.wait()
            return
        # uvloop's clock and timers tick in whole milliseconds: a timer for less than
        # a tick fires at once, again and again, until the clock moves. Wait a tick.
        deadline = max(deadline, self.clock() + CLOCK_TICK_S)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout_at(deadline):
                await self._wakeup.wait()

    @property
    def full(self) -> bool:
        scheduler = self.scheduler
        return scheduler.pending_commands >= self.limit or scheduler.command_bytes >= self.limit_bytes

    @property
    def low(self) -> bool:
        scheduler = self.scheduler
        return (
            scheduler.pending_commands <= self.limit // 2 and scheduler.command_bytes <= self.limit_bytes // 2
        )

    def __len__(self) -> int:
        return self.scheduler.pending_commands
