"""What one bot may hold and send on this replica, whatever it does with its connections.

Everything here is kept per bot_id (or per token, on a bare path whose bot is not
known yet), so that reconnecting refills nothing: connection slots, the rate of
new connections, the rate of messages (per channel) and the bytes it sends. The
tables are bounded (:class:`~gateway.limits.BucketTable`). No I/O: the bot
server asks, and closes or refuses with the answer.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable

from gateway.limits import BucketTable, Budget, TokenBucket
from gateway.settings import Settings

#: New connections a bot_id may open at once before its per-minute rate applies.
CONNECT_BURST = 20


class Admission:
    def __init__(self, settings: Settings, clock: Callable[[], float]) -> None:
        self.settings = settings
        self._clock = clock
        # Enough keys for every bot a full replica holds, twice over (both channels).
        max_keys = max(10_000, 2 * settings.max_connections)
        rate = settings.max_frames_per_s
        self._messages = BucketTable(rate, rate * settings.rate_burst_s, max_keys, clock)
        per_s = settings.bot_max_bytes_per_s
        self._bytes = BucketTable(per_s, per_s * settings.rate_burst_s, max_keys, clock)
        self._connects = BucketTable(settings.bot_connects_per_min / 60, CONNECT_BURST, max_keys, clock)
        self._slots: dict[str, int] = {}

    # -- connection slots and reconnect rate --------------------------------

    @staticmethod
    def token_key(token: str) -> str:
        """The slot key of a token that names no bot (never the token itself: keys are logged)."""
        return "token:" + hashlib.sha256(token.encode()).hexdigest()[:16]

    def admit_connection(self, key: str, bot_id: str | None) -> str | None:
        """Take a slot for ``key`` (a bot_id, or :meth:`token_key`); None, or why not."""
        if self._slots.get(key, 0) >= self.settings.max_connections_per_bot:
            return "bot_connections"
        if bot_id is not None and not self._connects.take(bot_id):
            return "reconnect_rate"
        self._slots[key] = self._slots.get(key, 0) + 1
        return None

    def release(self, key: str) -> None:
        left = self._slots.get(key, 0) - 1
        if left > 0:
            self._slots[key] = left
        else:
            self._slots.pop(key, None)

    def slots(self, key: str) -> int:
        return self._slots.get(key, 0)

    # -- what a connection may send -------------------------------------------

    def unbound_budget(self) -> Budget:
        """A connection's own budget until it names its bot."""
        s, now = self.settings, self._clock()
        return Budget(
            TokenBucket(s.max_frames_per_s, s.max_frames_per_s * s.rate_burst_s, now),
            TokenBucket(s.bot_max_bytes_per_s, s.bot_max_bytes_per_s * s.rate_burst_s, now),
        )

    def budget(self, bot_id: str, channel: str) -> Budget:
        """The bot's shared budget: messages per channel, bytes across both."""
        return Budget(self._messages.get(f"{bot_id}:{channel}"), self._bytes.get(bot_id))
