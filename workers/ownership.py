"""How the instances of a worker group share bots: the scripts and the decisions (pure; no I/O).

The protocol is part of the Redis contract (``docs/PROTOCOL.md``, "Sharing bots
among worker instances"), so that a group may mix languages; the Node.js worker
in ``workers/node/group.js`` implements the same rules. Keys (``P`` the prefix,
``G`` the group)::

    P:workers:G:bots        hash bot_id -> commands_key: the group's live bots
    P:{BOT}:lease:G         the owner's instance id; SET NX PX, renewed by compare-and-PEXPIRE
    P:workers:G:instances   sorted set instance -> expiry (Redis ms): live members
    P:workers:G:journal     stream of ownership records (hello, start, stop, bye)

Ownership is the lease alone; membership only steers balance, so a member
that is wrong about the group's size can cost balance, never exclusivity.

Balance, in two rules that keep the takeover bound ``lease_ttl_s +
claim_interval_s``:

* an instance below its fair share (``ceil(bots / members)``) takes free bots
  at once, up to that share; a bot left free for a whole ``claim_interval_s``
  is anyone's. After a crash the survivors together are below their shares by
  at least the orphaned bots (the dead member leaves the set no later than its
  leases expire), so every orphan is taken in the first claim round after its
  lease expired: no instance waits per bot it already owns;
* an instance above its fair share, while another member is two or more bots
  below it, hands one bot back every ``balance_step_s``: the least loaded take it.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

#: Extend the lease only if we still hold it (another instance may own it now).
RENEW = (
    "if redis.call('get', KEYS[1]) == ARGV[1] then "
    "return redis.call('pexpire', KEYS[1], ARGV[2]) end return 0"
)
#: Delete the lease only if we still hold it.
RELEASE = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end return 0"
#: Join or stay in the member set with an expiry on Redis's clock (clients' clocks may
#: disagree), drop expired members, and return the live ones. ARGV[2] = 0 only reads.
HEARTBEAT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if tonumber(ARGV[2]) > 0 then
  redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
  redis.call('PEXPIRE', KEYS[1], 3600000)
end
return redis.call('ZRANGE', KEYS[1], 0, -1)
"""

#: Approximate MAXLEN of the journal stream.
JOURNAL_MAXLEN = 10_000


def member_ttl_ms(lease_ttl_s: float, lease_renew_s: float) -> int:
    """How long a heartbeat keeps an instance in the member set.

    Shorter than the lease by one renewal period: an instance that dies leaves
    the set no later than its last lease expires, so when its bots come free the
    survivors already count one member less and are below their fair share.
    """
    return max(1, int((lease_ttl_s - lease_renew_s) * 1000))


def next_renewal(due: float, now: float, period_s: float) -> float:
    """When the next renewal round starts, given when this one was due and the time now.

    On a fixed cadence: a round that started late (a busy event loop) does not push the
    next one later by as much, which would eat into the lease's margin twice. A loop
    so far behind that the next due time has passed waits a quarter period, not zero,
    so that rounds never run back to back.
    """
    return max(due + period_s, now + period_s / 4)


def fair_share(bots: int, members: int) -> int:
    """Bots per instance when the group is balanced (rounded up)."""
    return math.ceil(bots / max(1, members))


@dataclass(frozen=True, slots=True)
class ClaimPlan:
    """Free bots one claim round may try, in order.

    ``overdue`` bots (free for a whole claim interval) are anyone's, up to
    ``room``; ``fresh`` ones are taken only up to ``at_once`` (what is left of
    the fair share). Lost races are retried further down the lists.
    """

    overdue: list[str]
    fresh: list[str]
    room: int
    at_once: int


def plan_claims(
    free_for_s: Mapping[str, float],
    *,
    owned: int,
    bots: int,
    members: int,
    max_bots: int,
    claim_interval_s: float,
    instance_id: str,
) -> ClaimPlan:
    """Which of the free bots (``bot_id -> seconds seen free``) to try, and how many."""
    room = max(0, max_bots - owned)
    at_once = max(0, fair_share(bots, members) - owned)

    def order(bot_id: str) -> tuple[float, int]:
        # Longest free first; ties in an order of this instance's own, so that members
        # racing for several bots at once mostly try different ones.
        return (-free_for_s[bot_id], zlib.crc32(f"{instance_id}/{bot_id}".encode()))

    ranked = sorted(free_for_s, key=order)
    overdue = [b for b in ranked if free_for_s[b] >= claim_interval_s]
    fresh = [b for b in ranked if free_for_s[b] < claim_interval_s]
    return ClaimPlan(overdue, fresh, room, at_once)


def next_batch(plan: ClaimPlan, tried: int, won: int, won_fresh: int, tried_fresh: int) -> list[str]:
    """The next bots to try with SET NX, assuming every attempt in flight wins.

    ``tried``/``won`` count the overdue attempts and wins so far,
    ``tried_fresh``/``won_fresh`` the fresh ones.
    """
    room_left = plan.room - won - won_fresh
    take_overdue = plan.overdue[tried : tried + max(0, room_left)]
    room_left -= len(take_overdue)
    fresh_left = min(room_left, plan.at_once - won_fresh)
    take_fresh = plan.fresh[tried_fresh : tried_fresh + max(0, fresh_left)]
    return take_overdue + take_fresh


def should_shed(owned: int, bots: int, members: Sequence[str], held: Mapping[str, int], me: str) -> bool:
    """Whether to hand one bot back: above the fair share, and someone is two or more below us.

    ``held`` counts the leases each instance holds (from the lease values);
    members without a lease count as 0.
    """
    if owned <= fair_share(bots, len(members)):
        return False
    others = [held.get(m, 0) for m in members if m != me]
    return bool(others) and owned - min(others) >= 2


def journal_fields(kind: str, instance: str, **fields: str | int) -> dict[str, str]:
    """One journal record: ``type``, ``instance``, then the record's own fields."""
    return {"type": kind, "instance": instance, **{k: str(v) for k, v in fields.items()}}
