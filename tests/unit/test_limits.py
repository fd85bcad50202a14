"""Per-bot buckets: refill, what counts as abuse, and a table that stays bounded."""

from __future__ import annotations

from gateway.limits import BucketTable, Budget, TokenBucket


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
