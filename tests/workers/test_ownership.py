"""The group's claim and balance decisions (pure), and the scripts against a real Redis."""

from __future__ import annotations

import asyncio

import pytest

from workers import ownership
from workers.ownership import ClaimPlan, fair_share, next_batch, next_renewal, plan_claims, should_shed


def test_fair_share_rounds_up_and_survives_an_empty_group():
    assert fair_share(8, 2) == 4
    assert fair_share(7, 2) == 4
    assert fair_share(0, 3) == 0
    assert fair_share(5, 0) == 5


def _plan(free: dict[str, float], owned: int, bots: int, members: int, max_bots: int = 100) -> ClaimPlan:
    return plan_claims(
        free,
        owned=owned,
        bots=bots,
        members=members,
        max_bots=max_bots,
        claim_interval_s=0.5,
        instance_id="me",
    )


def test_a_survivor_takes_the_orphans_at_once_whatever_it_already_owns():
    """The old rule made an instance wait 0.2 s per bot it owned before taking a free one:
    6.1-6.3 s takeovers against a promised 5.5 s. Now an instance below its share takes
    every orphan in its first round."""
    free = {f"b{i}": 0.0 for i in range(4)}
    plan = _plan(free, owned=4, bots=8, members=1)  # the other member is gone: share 8
    assert plan.at_once == 4
    assert sorted(next_batch(plan, 0, 0, 0, 0)) == sorted(free)


def test_an_instance_at_its_share_leaves_new_bots_to_the_others_for_a_claim_interval():
    plan = _plan({"new": 0.1}, owned=2, bots=4, members=2)
    assert plan.at_once == 0 and next_batch(plan, 0, 0, 0, 0) == []
    # ...unless nobody took it for a whole claim interval: then it is anyone's.
    plan = _plan({"new": 0.6}, owned=2, bots=4, members=2)
    assert next_batch(plan, 0, 0, 0, 0) == ["new"]


def test_lost_races_are_retried_further_down_the_list_up_to_the_share():
    free = {f"b{i}": 0.0 for i in range(6)}
    plan = _plan(free, owned=0, bots=6, members=2)  # share 3
    first = next_batch(plan, 0, 0, 0, 0)
    assert len(first) == 3
    # All three lost to another member: the next three are tried in the same round.
    second = next_batch(plan, 0, 0, 0, 3)
    assert len(second) == 3 and not set(first) & set(second)
    # Won one of them: two more at most.
    assert len(next_batch(plan, 0, 0, 1, 3)) == 2
    assert next_batch(plan, 0, 0, 3, 6) == []


def test_max_bots_caps_overdue_and_fresh_alike():
    free = {"a": 9.0, "b": 9.0, "c": 0.0}
    plan = _plan(free, owned=9, bots=12, members=1, max_bots=10)
    assert plan.room == 1
    assert next_batch(plan, 0, 0, 0, 0) == ["a"] or next_batch(plan, 0, 0, 0, 0) == ["b"]


def test_members_race_for_ties_in_different_orders():
    free = {f"bot_{i}": 0.0 for i in range(20)}
    orders = [
        plan_claims(
            free, owned=0, bots=20, members=4, max_bots=100, claim_interval_s=0.5, instance_id=who
        ).fresh
        for who in ("w1", "w2")
    ]
    assert orders[0][:5] != orders[1][:5]


@pytest.mark.parametrize(
    ("owned", "bots", "members", "held", "shed"),
    [
        (4, 4, ["me", "new"], {}, True),  # a member joined with nothing: hand over
        (2, 4, ["me", "b"], {"b": 2}, False),  # balanced
        (3, 5, ["me", "b"], {"b": 2}, False),  # the share is 3: one more is not two more
        (5, 8, ["me", "b", "c"], {"b": 3}, True),  # c holds nothing
        (5, 8, ["me"], {}, False),  # alone
    ],
)
def test_shedding_only_towards_someone_two_below(owned, bots, members, held, shed):
    assert should_shed(owned, bots, members, held, "me") is shed


def test_a_dead_member_leaves_the_set_before_its_leases_expire():
    # A heartbeat keeps a member lease_ttl_s - lease_renew_s; its last lease renewal is at
    # most lease_renew_s before it died, and keeps the lease lease_ttl_s from then.
    ttl, renew = 5.0, 1.0
    died = 100.0
    last_heartbeat = died  # the latest it can have been
    last_renewal = died - renew  # the earliest it can have been
    assert last_heartbeat + ownership.member_ttl_ms(ttl, renew) / 1000 <= last_renewal + ttl


async def test_heartbeat_script_on_redis_time(redis_client):
    key = "meetstream:workers:g:instances"
    live = await redis_client.eval(ownership.HEARTBEAT, 1, key, "a", 300)
    assert live == [b"a"]
    assert await redis_client.eval(ownership.HEARTBEAT, 1, key, "b", 5000) == [b"a", b"b"]
    await asyncio.sleep(0.4)
    # "a" expired; a reader (ttl 0) drops it and does not join.
    assert await redis_client.eval(ownership.HEARTBEAT, 1, key, "c", 0) == [b"b"]
    assert 0 < await redis_client.pttl(key) <= 3_600_000


async def test_lease_scripts_act_only_for_the_holder(redis_client):
    key = "meetstream:{bot}:lease:g"
    assert await redis_client.set(key, "a", nx=True, px=1000)
    assert not await redis_client.set(key, "b", nx=True, px=1000)
    assert await redis_client.eval(ownership.RENEW, 1, key, "b", 60_000) == 0
    assert await redis_client.eval(ownership.RENEW, 1, key, "a", 60_000) == 1
    assert await redis_client.pttl(key) > 50_000
    assert await redis_client.eval(ownership.RELEASE, 1, key, "b") == 0
    assert await redis_client.eval(ownership.RELEASE, 1, key, "a") == 1
    assert await redis_client.get(key) is None


def test_renewals_keep_their_cadence_when_a_round_starts_late():
    """Period 0.4 s, a round due at 10.0 s started 0.3 s late (a busy loop): the next is due
    at 10.4 s, not 10.7 s (0.8-2.0 s between rounds were measured in a full-size day with
    a 2 s lease, which then lapsed). Far behind, it waits a quarter period, never zero."""
    assert next_renewal(10.0, 10.3, 0.4) == pytest.approx(10.4)
    assert next_renewal(10.0, 10.0, 0.4) == pytest.approx(10.4)
    assert next_renewal(10.0, 11.0, 0.4) == pytest.approx(11.1)
