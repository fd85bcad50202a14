"""Per-bot buckets: refill, what counts as abuse, and a table that stays bounded."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.limits import BucketTable, Budget, StreamTrim, TokenBucket


def test_a_bucket_allows_its_burst_then_its_rate():
    bucket = TokenBucket(rate=10, burst=5, now=0.0)
    assert [bucket.take(0.0) for _ in range(6)] == [True] * 5 + [False]
    assert bucket.take(0.1)  # one token refilled
    assert not bucket.take(0.1)


def test_a_catch_up_is_not_abuse_but_a_whole_refused_burst_is():
    bucket = TokenBucket(rate=10, burst=5, now=0.0)
    for _ in range(5 + 4):
        bucket.take(0.0)
    assert not bucket.violating  # 4 refused: less than a burst
    assert bucket.take(1.0) and bucket.take(1.0)  # it slowed down: forgiven
    assert bucket.refused == 0 and not bucket.violating
    for _ in range(20):
        bucket.take(1.0)
    assert bucket.violating


def test_bytes_and_messages_both_bound_a_budget():
    budget = Budget(TokenBucket(100, 100, 0.0), TokenBucket(1000, 1000, 0.0))
    assert budget.admit(0.0, 600) is None
    assert budget.admit(0.0, 600) == "bot_budget"
    assert budget.admit(0.0, 0) is None  # a ping: no bytes to count
    for _ in range(98):
        budget.admit(0.0, 0)
    assert budget.admit(0.0, 1) == "rate_limited"


def test_the_table_is_bounded_and_forgets_refilled_buckets_first():
    now = [0.0]
    table = BucketTable(rate=1, burst=2, max_keys=4, clock=lambda: now[0])
    for key in "abcd":
        table.take(key)
        table.take(key)  # empty
    now[0] = 1.0
    table.take("a")  # a is recent
    now[0] = 10.0  # every bucket has refilled: forgetting them costs nothing
    for key in "efgh":
        table.take(key)
    assert len(table) <= 4 and table.evicted == 0
    # A table of buckets that are all still empty evicts the least recently used, counted.
    for key in "ijklm":
        table.take(key)
        table.take(key)
    assert len(table) <= 4 and table.evicted >= 1


def test_a_bot_keeps_its_bucket_across_connections():
    table = BucketTable(rate=1, burst=3, max_keys=100, clock=lambda: 0.0)
    assert [table.take("bot") for _ in range(3)] == [True] * 3
    assert table.get("bot") is table.get("bot") and not table.take("bot")


def _simulate(trim: StreamTrim, sizes: list[int]) -> list[int]:
    """A stream as Redis keeps it: each XADD appends, then trims to its MAXLEN."""
    stream: list[int] = []
    for size in sizes:
        maxlen = trim.note(size) or trim.maxlen
        stream.append(size)
        del stream[: max(0, len(stream) - maxlen)]
        assert sum(stream) <= trim.max_bytes, (size, len(stream))
    return stream


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(1, 5000), max_size=400))
def test_a_trimmed_stream_never_holds_more_than_its_bytes(sizes):
    _simulate(StreamTrim(maxlen=50, max_bytes=20_000), sizes)


def test_small_entries_are_never_trimmed_below_the_count_cap():
    trim = StreamTrim(maxlen=600, max_bytes=16 << 20)
    assert all(trim.note(9600) is None for _ in range(5000))
    # One large entry among small ones cuts the stream by a few entries at most...
    assert (trim.note(70_000) or 600) >= 595
    assert all((trim.note(9600) or 600) >= 595 for _ in range(10))
    # ...a run of them does, to what fits.
    stream = _simulate(trim, [1 << 20] * 30)
    assert 10 <= len(stream) <= 16
