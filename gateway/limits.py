"""Rate and byte budgets that belong to a bot, not to one of its connections (pure; no I/O).

A limit kept per connection is refilled by reconnecting: one bot_id that
reconnected in a loop got 171,133 frames/s accepted against a limit of 250/s.
So buckets are kept per bot_id (and channel) in a :class:`BucketTable` that
outlives connections, bounded in size: when it is full, buckets that have
refilled completely are forgotten first (forgetting them gives nothing away),
and only then the least recently used.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Callable


class TokenBucket:
    """``rate`` units a second, up to ``burst`` at once; :meth:`take` says whether there is room.

    Also counts what it refused since the last time it had room to spare, so that a
    sender that keeps going over (a whole burst refused) can be told apart from a
    healthy catch-up, which stops.
    """

    __slots__ = ("at", "burst", "rate", "refused", "tokens")

    def __init__(self, rate: float, burst: float, now: float) -> None:
        self.rate = rate
        self.burst = burst
        self.tokens = burst
        self.at = now
        self.refused = 0.0  # units refused in a row (reset once a take succeeds with room left)

    def take(self, now: float, amount: float = 1.0) -> bool:
        tokens = self.tokens + (now - self.at) * self.rate
        if tokens > self.burst:
            tokens = self.burst
        self.at = now
        if tokens >= amount:
            self.tokens = tokens - amount
            if self.tokens >= amount:
                self.refused = 0.0
            return True
        self.tokens = tokens
        self.refused += amount
        return False

    def full(self, now: float) -> bool:
        return self.tokens + (now - self.at) * self.rate >= self.burst

    @property
    def violating(self) -> bool:
        """Refused a whole burst's worth in a row: not a catch-up any more, abuse."""
        return self.refused >= self.burst


class Budget:
    """What one connection may still send: its bot's message rate and its bot's bytes.

    Shared by every connection of the bot on this channel (the message rate) or on
    both (the bytes), so reconnecting refills nothing.
    """

    __slots__ = ("bytes", "messages")

    def __init__(self, messages: TokenBucket, bytes_: TokenBucket) -> None:
        self.messages = messages
        self.bytes = bytes_

    def admit(self, now: float, size: int) -> str | None:
        """None if a message of ``size`` bytes may pass, else why not (a drop reason).

        Both :meth:`TokenBucket.take` inlined: this runs for every audio frame, and
        the two calls were a third of its cost (``bench.hotpath``).
        """
        m = self.messages
        tokens = m.tokens + (now - m.at) * m.rate
        if tokens > m.burst:
            tokens = m.burst
        m.at = now
        if tokens < 1.0:
            m.tokens = tokens
            m.refused += 1.0
            return "rate_limited"
        m.tokens = tokens = tokens - 1.0
        if m.refused and tokens >= 1.0:
            m.refused = 0.0
        if size:
            b = self.bytes
            tokens = b.tokens + (now - b.at) * b.rate
            if tokens > b.burst:
                tokens = b.burst
            b.at = now
            if tokens < size:
                b.tokens = tokens
                b.refused += size
                return "bot_budget"
            b.tokens = tokens = tokens - size
            if b.refused and tokens >= size:
                b.refused = 0.0
        return None

    @property
    def violating(self) -> bool:
        return self.messages.violating or self.bytes.violating


class BucketTable:
    """Token buckets by key (``bot_id``, ``bot_id:channel``...), at most ``max_keys`` of them."""

    def __init__(self, rate: float, burst: float, max_keys: int, clock: Callable[[], float]) -> None:
        self.rate = rate
        self.burst = burst
        self.max_keys = max(1, max_keys)
        self._clock = clock
        self._buckets: OrderedDict[str, TokenBucket] = OrderedDict()
        self.evicted = 0  # buckets forgotten before they had refilled (the table was too small)

    def get(self, key: str) -> TokenBucket:
        bucket = self._buckets.get(key)
        if bucket is None:
            if len(self._buckets) >= self.max_keys:
                self._make_room()
            bucket = self._buckets[key] = TokenBucket(self.rate, self.burst, self._clock())
        else:
            self._buckets.move_to_end(key)
        return bucket

    def take(self, key: str, amount: float = 1.0) -> bool:
        return self.get(key).take(self._clock(), amount)

    def _make_room(self) -> None:
        now = self._clock()
        # Oldest first; a bucket that is full again holds nothing worth keeping.
        for key in list(self._buckets)[: max(1, len(self._buckets) // 4)]:
            if self._buckets[key].full(now):
                del self._buckets[key]
        if len(self._buckets) >= self.max_keys:
            self._buckets.popitem(last=False)
            self.evicted += 1

    def __len__(self) -> int:
        return len(self._buckets)


class StreamTrim:
    """Keeps one writer's stream within ``max_bytes`` although Redis caps streams by count.

    A stream is written with ``MAXLEN ~ maxlen``. Entries up to ``max_bytes / maxlen``
    (the *share*) can never add up to more than ``max_bytes``, and nearly all are that
    small (a 100 ms frame is 9.6 kB of a 28 kB share), so they cost a comparison.
    Larger ones are remembered, with their position, for as long as the cap keeps
    them; when the newest ``maxlen`` entries could exceed ``max_bytes`` (counting every
    small one at a full share), :meth:`note` returns the smaller MAXLEN that keeps
    only what fits. Redis applies MAXLEN to the whole stream, newest first, so the
    bound holds across reconnects too: the entries kept are the newest, ours.

    The hot path inlines :meth:`note`: ``trim.n += 1``, then :meth:`check` only if
    ``size > trim.share or trim.big``.
    """

    __slots__ = ("big", "big_sum", "max_bytes", "maxlen", "n", "share")

    def __init__(self, maxlen: int, max_bytes: int) -> None:
        self.maxlen = maxlen
        self.max_bytes = max_bytes
        self.share = max(1, max_bytes // maxlen)
        self.n = 0  # entries written
        self.big: deque[tuple[int, int]] = deque()  # (entry number, size), oldest first
        self.big_sum = 0

    def note(self, size: int) -> int | None:
        """Count one more entry of ``size`` bytes; the MAXLEN to write it with, if not
        the stream's usual one (None)."""
        self.n += 1
        if size > self.share or self.big:
            return self.check(size)
        return None

    def check(self, size: int) -> int | None:
        """:meth:`note` after ``n`` was counted."""
        n, big = self.n, self.big
        if size > self.share:
            big.append((n, size))
            self.big_sum += size
        while big and big[0][0] <= n - self.maxlen:  # trimmed by count already
            self.big_sum -= big.popleft()[1]
        live = min(n, self.maxlen)
        if self.big_sum + (live - len(big)) * self.share <= self.max_bytes:
            return None
        # Keep the newest entries while they fit; every small one counts a full share.
        budget, share = self.max_bytes, self.share
        total = keep = 0
        newer = n + 1
        for index, entry_size in reversed(big):
            smalls = newer - index - 1
            if total + smalls * share > budget:
                keep += (budget - total) // share
                break
            total += smalls * share
            keep += smalls
            if total + entry_size > budget:
                break
            total += entry_size
            keep += 1
            newer = index
        else:
            keep += min(live - keep, (budget - total) // share)
        keep = max(1, keep)
        while big and big[0][0] <= n - keep:
            self.big_sum -= big.popleft()[1]
        return keep
