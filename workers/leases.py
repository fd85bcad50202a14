"""This instance's side of the ownership protocol, with I/O: membership, claims, renewal, release, balance.

The decisions and the scripts are pure, in :mod:`workers.ownership`; this module
runs them against Redis (``docs/PROTOCOL.md``, "What every instance does",
steps 1, 3, 4 and 6):

* :class:`Journal`: the group's stream of ownership records (``hello``,
  ``start``, ``stop``, ``bye``, and ``frame`` in conformance mode);
* :class:`Leases`: the member-set heartbeat, the claim rounds (``SET NX PX``
  at the fair share), the renewals that extend each owned bot's local validity,
  the releases, and the hand-backs that balance the group.

:class:`Leases` never runs a bot: it is handed the instance's owned bots (a
read-only mapping of :class:`Held`) and a ``start`` callback for each bot it wins.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Protocol

from redis.exceptions import RedisError

from gateway.logs import error_text
from workers import ownership
from workers.constants import journal_key, lease_key, members_key
from workers.discovery import Registry, text
from workers.metrics import WorkerMetrics
from workers.settings import WorkerSettings
from workers.stats import WorkerStats

log = logging.getLogger("workers.worker")  # the name the SDK's lines had before the split

#: A renewal's answer for one bot: (RENEW's reply, EXISTS of its events stream),
#: or None when it could not be asked.
Renewal = tuple[Any, Any] | None


class Journal:
    """The group's journal stream: who took and let go which bot, when (``docs/PROTOCOL.md``)."""

    def __init__(self, client: Any, prefix: str, group: str, instance_id: str) -> None:
        self.client = client
        self.key = journal_key(prefix, group)
        self.instance_id = instance_id

    def record(self, kind: str, **fields: str | int) -> dict[str, str]:
        """One record's fields, to write now (:meth:`write`) or later (:meth:`write_all`)."""
        return ownership.journal_fields(kind, self.instance_id, **fields)

    async def write(self, kind: str, **fields: str | int) -> None:
        await self.client.xadd(
            self.key, self.record(kind, **fields), maxlen=ownership.JOURNAL_MAXLEN, approximate=True
        )

    async def write_all(self, records: Iterable[dict[str, str]]) -> None:
        """Several records in one pipeline, in order."""
        pipe = self.client.pipeline(transaction=False)
        for record in records:
            pipe.xadd(self.key, record, maxlen=ownership.JOURNAL_MAXLEN, approximate=True)
        await pipe.execute()


class Held(Protocol):
    """What :class:`Leases` needs of an owned bot (the per-bot runner)."""

    #: Monotonic time until which the lease is ours by this instance's clock.
    valid_until: float
    stop_reason: str | None
    started_at: float

    @property
    def bot_id(self) -> str: ...
    @property
    def lease(self) -> str: ...
    @property
    def events_key(self) -> str: ...
    def request_stop(self, reason: str) -> None: ...
    def lease_lost(self) -> None: ...


class Leases:
    """Membership, claim rounds, renewal, release and balance for one instance.

    ``owned`` is the instance's own view of its bots (bot_id -> runner), which it
    keeps; ``start(bot_id, commands_key, valid_until)`` is called for each bot won.
    """

    def __init__(
        self,
        settings: WorkerSettings,
        client: Any,
        registry: Registry,
        stats: WorkerStats,
        metrics: WorkerMetrics,
        owned: Mapping[str, Held],
        start: Callable[[str, str, float], None],
    ) -> None:
        s = self.settings = settings
        self.client = client
        self.registry = registry
        self.stats = stats
        self.metrics = metrics
        self.owned = owned
        self.start = start
        self.members_key = members_key(s.key_prefix, s.group)
        self.member_ttl_ms = ownership.member_ttl_ms(s.lease_ttl_s, s.lease_renew_s)
        self.members: list[str] = [s.instance_id]
        self._wake = asyncio.Event()
        self._stopping = False
        self._free_since: dict[str, float] = {}
        self._shed_until: dict[str, float] = {}  # bots we handed back: not ours to take again yet
        self._last_shed = 0.0

    def lease_key(self, bot_id: str) -> str:
        return lease_key(self.settings.key_prefix, bot_id, self.settings.group)

    def valid_until(self, sent: float) -> float:
        """Local validity of a lease taken or renewed by a call sent at ``sent`` (monotonic)."""
        return sent + self.settings.lease_ttl_s * 0.8

    def wake(self) -> None:
        """Run a claim round now (a bot was learned or let go)."""
        self._wake.set()

    def stop_claiming(self) -> None:
        """No bot is taken from now on; heartbeats only read the member set."""
        self._stopping = True
        self._wake.set()

    # -- membership -------------------------------------------------------------

    async def heartbeat(self, join: bool = True) -> list[str]:
        """Stay in the member set (or only read it) and return the live members."""
        me = self.settings.instance_id
        ttl = self.member_ttl_ms if join and not self._stopping else 0
        members = await self.client.eval(ownership.HEARTBEAT, 1, self.members_key, me, ttl)
        self.members = sorted({text(m) for m in members} | ({me} if ttl else set()))
        self.metrics.members.set(len(self.members))
        return self.members

    async def leave(self) -> None:
        """Leave the member set: the others' fair share grows by our bots."""
        await self.client.zrem(self.members_key, self.settings.instance_id)

    # -- claims -------------------------------------------------------------------

    async def claim_loop(self) -> None:
        while not self._stopping:
            try:
                await self.claim_round()
            except (RedisError, OSError) as exc:
                self.stats.redis_errors += 1
                self.metrics.redis_errors.inc()
                log.warning("claim round failed", extra={"error": error_text(exc)})
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.settings.claim_interval_s)

    async def claim_round(self) -> None:
        """Take the free bots that are ours to take, then hand one back if we hold too many.

        Every round is one member-set heartbeat, one HGETALL, a GET per bot we do not
        own, and SET NX for what we take (again, further down the list, for lost races).
        """
        s, client = self.settings, self.client
        members = await self.heartbeat()
        registry = await self.registry.read()
        self.metrics.bots_known.set(len(registry))
        now = time.monotonic()
        for bot_id, until in list(self._shed_until.items()):
            if until <= now:
                del self._shed_until[bot_id]
        candidates = [b for b in registry if b not in self.owned]
        for gone in set(self._free_since) - set(candidates):
            del self._free_since[gone]
        held: dict[str, int] = defaultdict(int)
        held[s.instance_id] = len(self.owned)
        free: dict[str, float] = {}
        if candidates:
            pipe = client.pipeline(transaction=False)
            for bot_id in candidates:
                pipe.get(self.lease_key(bot_id))
            for bot_id, holder in zip(candidates, await pipe.execute(), strict=True):
                if holder is not None:
                    held[text(holder)] += 1
                    self._free_since.pop(bot_id, None)
                elif bot_id not in self._shed_until:
                    free[bot_id] = now - self._free_since.setdefault(bot_id, now)
        if free and not self._stopping:
            await self._take(free, registry, members)
        self._maybe_shed(len(registry), members, held)

    async def _take(self, free: dict[str, float], registry: dict[str, str], members: list[str]) -> None:
        s, client = self.settings, self.client
        plan = ownership.plan_claims(
            free,
            owned=len(self.owned),
            bots=len(registry),
            members=len(members),
            max_bots=s.max_bots,
            claim_interval_s=s.claim_interval_s,
            instance_id=s.instance_id,
        )
        if plan.room == 0:
            self.stats.max_bots_hit += 1
            self.metrics.max_bots_hit.inc()
            log.warning(
                "max_bots reached, leaving free bots to other instances",
                extra={"max_bots": s.max_bots, "free": len(free)},
            )
            return
        tried = won = tried_fresh = won_fresh = 0
        overdue = set(plan.overdue)
        while not self._stopping:
            batch = ownership.next_batch(plan, tried, won, won_fresh, tried_fresh)
            if not batch:
                return
            sent = time.monotonic()
            pipe = client.pipeline(transaction=False)
            for bot_id in batch:
                pipe.set(self.lease_key(bot_id), s.instance_id, nx=True, px=int(s.lease_ttl_s * 1000))
            replies = await pipe.execute()
            gone = await self._left_meanwhile([b for b, got in zip(batch, replies, strict=True) if got])
            for bot_id, got in zip(batch, replies, strict=True):
                self._free_since.pop(bot_id, None)
                got = got and bot_id not in gone
                if bot_id in overdue:
                    tried += 1
                    won += bool(got)
                else:
                    tried_fresh += 1
                    won_fresh += bool(got)
                if got and not self._stopping:
                    self.start(bot_id, registry[bot_id], self.valid_until(sent))

    async def _left_meanwhile(self, won: list[str]) -> set[str]:
        """Bots won that left since this round read the registry; their leases are released.

        The last owner forgets a bot before it releases the lease, so a lease won after
        that release finds the bot gone: its ``session_ended`` is handled already and a
        new owner would wait on its streams for good.
        """
        gone = await self.registry.unknown(won)
        if gone:
            await self.release(sorted(gone))
            log.info("bots left while being claimed; leases released", extra={"bots": sorted(gone)})
        return gone

    def _maybe_shed(self, bots: int, members: list[str], held: Mapping[str, int]) -> None:
        """Hand one bot back if we hold more than our share and someone holds two fewer."""
        s = self.settings
        now = time.monotonic()
        if self._stopping or s.balance_step_s <= 0 or now - self._last_shed < s.balance_step_s:
            return
        running = [r for r in self.owned.values() if r.stop_reason is None]
        if not ownership.should_shed(len(running), bots, members, held, s.instance_id):
            return
        runner = max(running, key=lambda r: r.started_at)  # the newest: least state to hand over
        self._last_shed = now
        self._shed_until[runner.bot_id] = now + s.lease_ttl_s
        self.stats.bots_handed_over += 1
        self.metrics.bots_shed.inc()
        log.info(
            "handing a bot back to balance the group",
            extra={"bot_id": runner.bot_id, "owned": len(running), "members": len(members)},
        )
        runner.request_stop("released")

    # -- renewal and release -------------------------------------------------------

    async def renew_loop(self, until: asyncio.Event) -> None:
        """Every ``lease_renew_s`` until ``until`` is set: renew every owned bot's lease."""
        s = self.settings
        due = time.monotonic() + s.lease_renew_s
        while not until.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(until.wait(), max(0.0, due - time.monotonic()))
            due = ownership.next_renewal(due, time.monotonic(), s.lease_renew_s)
            runners = list(self.owned.values())
            if not runners:
                continue
            sent = time.monotonic()
            try:
                outcomes: list[Renewal] = await self.renew(runners)
            except (RedisError, OSError) as exc:
                # One node that does not answer fails a whole pipeline: renew bot by bot,
                # so that only the bots whose keys live on it lapse (a dead node used to
                # move every bot of the instance to another one).
                self.stats.redis_errors += 1
                self.metrics.redis_errors.inc()
                log.warning("lease renewal failed, renewing one by one", extra={"error": error_text(exc)})
                each = await asyncio.gather(*(self.renew([r]) for r in runners), return_exceptions=True)
                outcomes = [None if isinstance(o, BaseException) else o[0] for o in each]
            for r, outcome in zip(runners, outcomes, strict=True):
                if outcome is None:
                    continue  # its runner stops by itself once its local validity runs out
                renewed, exists = outcome
                if not renewed:
                    log.warning("lease lost", extra={"bot_id": r.bot_id})
                    r.lease_lost()
                elif not exists:
                    r.request_stop("expired")
                else:
                    r.valid_until = self.valid_until(sent)

    async def renew(self, runners: list[Held]) -> list[Renewal]:
        """Renew the runners' leases and see that their bots' keys still exist, in one pipeline."""
        s = self.settings
        pipe = self.client.pipeline(transaction=False)
        for r in runners:
            pipe.eval(ownership.RENEW, 1, r.lease, s.instance_id, int(s.lease_ttl_s * 1000))
            pipe.exists(r.events_key)
        results = await pipe.execute()
        return [(results[2 * i], results[2 * i + 1]) for i in range(len(runners))]

    async def release(self, bot_ids: list[str]) -> None:
        """Delete these bots' leases where they are still ours (one pipeline)."""
        if not bot_ids:
            return
        s = self.settings
        pipe = self.client.pipeline(transaction=False)
        for bot_id in bot_ids:
            pipe.eval(ownership.RELEASE, 1, self.lease_key(bot_id), s.instance_id)
        await pipe.execute()
