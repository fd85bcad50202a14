"""The Worker: discovers bots, owns each through a lease, runs handlers per bot.

Design (the contract is ``docs/PROTOCOL.md``, "Sharing bots among worker
instances"; the SDK's choices are in ``docs/WORKERS.md``)::

    meetstream:events ──XREAD (every instance)──► registry hash {prefix}:workers:{group}:bots
                                                      │ claim round: SET lease NX PX (one winner)
                                                      ▼
    {BOT}:events + {BOT}:audio ──XREADGROUP group=<worker group>, consumer=<instance>──► handlers
                                  XACK after the handlers ran; a new owner XAUTOCLAIMs the rest

* Ownership is a lease key per bot and group, renewed every ``lease_renew_s``.
  An instance stops dispatching a bot as soon as its lease *might* have
  expired by its own clock, so two instances never run one bot's handlers at once.
* A free bot is taken at once by an instance below its fair share of the group
  (:mod:`workers.ownership`), so a crashed instance's bots move within
  ``lease_ttl_s + claim_interval_s``; balance comes from hand-backs afterwards.
* The resume position is the bot's consumer group: entries are acknowledged
  only after the handlers returned, so a new owner claims what the dead one
  had read but not finished, and reads on from there: nothing is skipped.
* Each bot has its own task and its own connection: a slow handler delays
  only its bot, and a bot's entries are handled one at a time, in order.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import os
import signal
import socket
import sys
import time
import uuid
from collections import defaultdict
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any, TypeVar

from prometheus_client import CollectorRegistry
from redis.exceptions import RedisError, ResponseError

from gateway.probes import ProbeServer
from workers import commands, ownership
from workers.audio import AudioFrame
from workers.bot import Bot, Event
from workers.connections import Connections, RedisSettings, connect, redact_url
from workers.constants import (
    DEFAULT_GROUP,
    DEFAULT_PREFIX,
    PLAYBACK_EVENTS,
    bot_audio_key,
    bot_events_key,
    check_group,
    global_events_key,
    journal_key,
    lease_key,
    members_key,
    registry_key,
)
from workers.metrics import WorkerMetrics

log = logging.getLogger(__name__)

EventHandler = Callable[[Bot, Event], Awaitable[None] | None]
AudioHandler = Callable[[Bot, AudioFrame], Awaitable[None] | None]
StartHandler = Callable[[Bot], Awaitable[None] | None]
StopHandler = Callable[[Bot, str], Awaitable[None] | None]
F = TypeVar("F", bound=Callable[..., Any])

_START_EVENTS = (b"connected", b"ready", b"audio_handshake")

#: Why an instance stopped handling a bot (passed to ``on_bot_stop`` handlers).
STOP_REASONS = ("session_ended", "released", "lease_lost", "expired", "error")

#: Settings ``from_env`` reads, by field name.
ENV_SETTINGS = {
    "redis_url": "MEETSTREAM_REDIS_URL",
    "key_prefix": "MEETSTREAM_KEY_PREFIX",
    "group": "MEETSTREAM_WORKER_GROUP",
    "bot_name": "MEETSTREAM_BOT_NAME",
    "instance_id": "MEETSTREAM_WORKER_INSTANCE",
    "lease_ttl_s": "MEETSTREAM_LEASE_TTL_S",
    "lease_renew_s": "MEETSTREAM_LEASE_RENEW_S",
    "claim_interval_s": "MEETSTREAM_CLAIM_INTERVAL_S",
    "metrics_host": "MEETSTREAM_WORKER_METRICS_HOST",
    "metrics_port": "MEETSTREAM_WORKER_METRICS_PORT",
    "conformance": "MEETSTREAM_CONFORMANCE",
}


def _stale(fields: dict[str, str], latest_gateway: str) -> bool:
    """A ``disconnected`` or ``session_ended`` from another gateway than the one the bot
    connected to last: it speaks for a connection the bot has already replaced.

    ``session_ended`` is per gateway; events without a ``gateway`` field (older
    gateways) are taken as they come.
    """
    said_by = fields.get("gateway", "")
    return bool(said_by and latest_gateway and said_by != latest_gateway)


@dataclass(frozen=True)
class WorkerSettings:
    """Everything a worker instance needs; units in the names.

    ``from_env`` reads ``MEETSTREAM_REDIS_URL``, ``MEETSTREAM_KEY_PREFIX``,
    ``MEETSTREAM_WORKER_GROUP`` and ``MEETSTREAM_BOT_NAME``.
    """

    redis_url: str = "redis://127.0.0.1:6379/0"
    redis_cluster: str = "auto"  # auto | yes | no
    key_prefix: str = DEFAULT_PREFIX
    group: str = DEFAULT_GROUP
    instance_id: str = ""  # consumer name in the group; default host-pid-random
    #: The bot's display name in the meeting: its own voice comes back under it.
    bot_name: str | None = None
    exclude_own_voice: bool = True
    lease_ttl_s: float = 5.0
    lease_renew_s: float = 1.0
    claim_interval_s: float = 0.5
    #: Above its fair share, an instance hands one bot back per this many seconds (0: never).
    balance_step_s: float = 0.5
    max_bots: int = 1000
    read_count: int = 64
    read_block_ms: int = 1000
    handler_timeout_s: float | None = 60.0
    #: On SIGTERM: wait this long for handlers to finish (below Kubernetes' 30 s grace period).
    graceful_timeout_s: float = 20.0
    bootstrap_lookback_s: float = 3600.0
    command_maxlen: int = 1000
    say_chunk_s: float = 2.0
    #: ``/metrics`` and ``/healthz`` on this port (0: no server); Prometheus scrapes it.
    metrics_port: int = 0
    metrics_host: str = "0.0.0.0"
    #: Seconds between two measurements of how far owned bots' streams are ahead of us.
    lag_sample_s: float = 5.0
    #: The conformance kit's mode (``python -m workers.conformance``): journal every
    #: frame handled and answer ``{"type": "ping", "id": ...}`` messages with ``pong:ID``.
    conformance: bool = False

    def __post_init__(self) -> None:
        check_group(self.group)
        if not self.instance_id:
            object.__setattr__(
                self, "instance_id", f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
            )
        if self.lease_renew_s * 2 >= self.lease_ttl_s:
            raise ValueError("lease_renew_s must be under half of lease_ttl_s")
        if self.claim_interval_s <= 0:
            raise ValueError("claim_interval_s must be positive")

    def __repr__(self) -> str:
        shown = ", ".join(
            f"{f.name}={redact_url(v) if f.name == 'redis_url' else v!r}"
            for f in fields(self)
            if (v := getattr(self, f.name)) is not None
        )
        return f"WorkerSettings({shown})"

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> WorkerSettings:
        """Settings from ``MEETSTREAM_*`` variables (:data:`ENV_SETTINGS`); ``overrides`` win.

        A lease TTL given without a renewal period, too short for the default one,
        renews at a fifth of it.
        """
        env = os.environ if environ is None else environ
        kinds = {f.name: f.type for f in fields(cls)}
        values: dict[str, Any] = {}
        for name, var in ENV_SETTINGS.items():
            raw = env.get(var)
            if not raw:
                continue
            kind = kinds[name]
            if kind == "bool":
                values[name] = raw.strip().lower() in ("1", "true", "yes", "on")
            elif kind == "float":
                values[name] = float(raw)
            elif kind == "int":
                values[name] = int(raw)
            else:
                values[name] = raw
        values.update({k: v for k, v in overrides.items() if v is not None})
        ttl = values.get("lease_ttl_s")
        if ttl is not None and "lease_renew_s" not in values and cls.lease_renew_s * 2 >= ttl:
            values["lease_renew_s"] = ttl / 5
        return cls(**values)


@dataclass
class WorkerStats:
    """Counters of one instance; every bound the SDK hits shows up here and in a log line."""

    bots_started: int = 0
    bots_stopped: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    events: int = 0
    frames: int = 0
    own_voice_skipped: int = 0
    entries_claimed: int = 0  # taken over from a previous owner (may repeat)
    seq_gaps: int = 0  # frames missing before we read them (trimmed by MAXLEN, lost upstream)
    seq_repeats: int = 0
    handler_errors: int = 0
    handler_timeouts: int = 0
    max_bots_hit: int = 0
    redis_errors: int = 0
    takeovers: int = 0  # bots taken that an instance of the group had handled before
    bots_handed_over: int = 0  # handed back to balance the group


def _s(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _id_key(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


async def _maybe_await(result: Any) -> None:
    if inspect.isawaitable(result):
        await result


class Worker:
    """A group member: register handlers, then ``await worker.run()`` (or ``start``/``stop``).

    ``handle_signals=False`` leaves SIGTERM/SIGINT to an embedding program,
    which calls :meth:`stop` itself.
    """

    def __init__(
        self,
        settings: WorkerSettings | None = None,
        *,
        handle_signals: bool = True,
        registry: CollectorRegistry | None = None,
    ) -> None:
        self.settings = settings or WorkerSettings.from_env()
        self.handle_signals = handle_signals
        self.stats = WorkerStats()
        #: Prometheus metrics, in ``registry`` (default: one of this worker's own).
        self.metrics = WorkerMetrics(self.settings.group, STOP_REASONS, registry or CollectorRegistry())
        self._event_handlers: dict[str, list[EventHandler]] = defaultdict(list)
        self._audio_handlers: list[AudioHandler] = []
        self._start_handlers: list[StartHandler] = []
        self._stop_handlers: list[StopHandler] = []
        self._runners: dict[str, _BotRunner] = {}
        self._free_since: dict[str, float] = {}
        self._conns: Connections | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._wake = asyncio.Event()
        self._stop_requested = asyncio.Event()
        self._renew_stop = asyncio.Event()
        self._stopping = False
        self._stopped = False
        self._stop_lock = asyncio.Lock()
        s = self.settings
        self._registry = registry_key(s.key_prefix, s.group)
        self._members_key = members_key(s.key_prefix, s.group)
        self._journal_key = journal_key(s.key_prefix, s.group)
        self._member_ttl_ms = ownership.member_ttl_ms(s.lease_ttl_s, s.lease_renew_s)
        self._members: list[str] = [s.instance_id]
        self._shed_until: dict[str, float] = {}  # bots we handed back: not ours to take again yet
        self._last_shed = 0.0
        self._probes: ProbeServer | None = None

    # -- registration ---------------------------------------------------------

    def on(self, *types: str) -> Callable[[F], F]:
        """Handle events of these types (``"*"``: every event)."""

        def register(fn: F) -> F:
            for t in types:
                self._event_handlers[t].append(fn)
            return fn

        return register

    def on_ready(self, fn: F) -> F:
        return self.on("ready")(fn)

    def on_message(self, fn: F) -> F:
        return self.on("message")(fn)

    def on_disconnect(self, fn: F) -> F:
        return self.on("disconnected")(fn)

    def on_session_ended(self, fn: F) -> F:
        return self.on("session_ended")(fn)

    def on_playback(self, fn: F) -> F:
        return self.on(*PLAYBACK_EVENTS)(fn)

    def on_command_rejected(self, fn: F) -> F:
        return self.on("command_rejected")(fn)

    def on_audio(self, fn: F) -> F:
        """Handle every audio frame (``fn(bot, frame)``); the bot's own voice is left out
        when ``exclude_own_voice`` and the bot's name is known."""
        self._audio_handlers.append(fn)
        return fn

    def on_bot_start(self, fn: F) -> F:
        """Called when this instance takes a bot (first, or over from another instance)."""
        self._start_handlers.append(fn)
        return fn

    def on_bot_stop(self, fn: F) -> F:
        """Called with a reason from :data:`STOP_REASONS` when this instance lets a bot go:
        close what you opened for it here."""
        self._stop_handlers.append(fn)
        return fn

    # -- introspection --------------------------------------------------------

    @property
    def bots(self) -> dict[str, Bot]:
        """The bots this instance owns now."""
        return {bot_id: r.bot for bot_id, r in self._runners.items()}

    @property
    def instance_id(self) -> str:
        return self.settings.instance_id

    # -- lifecycle ------------------------------------------------------------

    async def start(self) -> None:
        s = self.settings
        log.info("worker starting", extra={"settings": repr(s)})
        if s.metrics_port:
            self._probes = ProbeServer(
                s.metrics_host, s.metrics_port, self.metrics.registry, lambda: not self._stopping
            )
            await self._probes.start()
        self._conns = await connect(RedisSettings(s.redis_url, s.redis_cluster))  # type: ignore[arg-type]
        # Join the member set before the first claim round: the others' fair share counts us.
        await self._heartbeat()
        await self._journal(
            "hello",
            lease_ttl_ms=int(s.lease_ttl_s * 1000),
            claim_interval_ms=int(s.claim_interval_s * 1000),
            impl="python-sdk",
        )
        self._tasks = [
            asyncio.create_task(self._discovery_loop(), name="worker-discovery"),
            asyncio.create_task(self._claim_loop(), name="worker-claim"),
            asyncio.create_task(self._renew_loop(), name="worker-renew"),
            asyncio.create_task(self._lag_loop(), name="worker-lag"),
        ]

    @property
    def metrics_port(self) -> int | None:
        """The port ``/metrics`` is served on, or None when ``metrics_port`` is 0 (no server)."""
        return self._probes.port if self._probes is not None else None

    def request_stop(self) -> None:
        self._stop_requested.set()

    async def run(self) -> None:
        """Start, work until SIGTERM/SIGINT (or :meth:`request_stop`), then stop."""
        loop = asyncio.get_running_loop()
        installed: list[signal.Signals] = []
        if self.handle_signals and sys.platform != "win32":  # Windows loops take no signal handlers
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, self.request_stop)
                installed.append(sig)
        try:
            await self.start()
            await self._stop_requested.wait()
            log.info("stop requested", extra={"bots": len(self._runners)})
        finally:
            await self.stop()
            for sig in installed:
                loop.remove_signal_handler(sig)

    async def stop(self) -> None:
        """Stop claiming, let handlers finish (bounded), hand every bot back at once. Idempotent."""
        async with self._stop_lock:
            if self._stopped:
                return
            self._stopped = True
            self._stopping = True
            self._wake.set()
            # Leave the member set first: the others' fair share grows by our bots, so they
            # take each one at once when we hand it back below.
            with contextlib.suppress(RedisError, OSError):
                if self._conns is not None:
                    await self._conns.client.zrem(self._members_key, self.settings.instance_id)
            # No blocked Redis read is cancelled: redis-py can take its socket
            # timeout to give such a connection up. Loops see the flag within one
            # ``read_block_ms`` instead, and only what overstays is cancelled.
            runners = list(self._runners.values())
            for runner in runners:
                runner.request_stop("released")
            tasks = [r.task for r in runners if r.task is not None]
            cancelled = 0
            if tasks:
                _, pending = await asyncio.wait(tasks, timeout=self.settings.graceful_timeout_s)
                for task in pending:
                    task.cancel()
                cancelled = len(pending)
                await asyncio.wait(tasks, timeout=5)
            self._renew_stop.set()
            if self._tasks:
                _, pending = await asyncio.wait(self._tasks, timeout=self.settings.read_block_ms / 1000 + 5)
                for task in pending:
                    task.cancel()
                await asyncio.wait(self._tasks, timeout=5)
            # Shielded: a second signal must not leave leases behind for others to wait out.
            with contextlib.suppress(Exception):
                await asyncio.shield(self._release([r.bot.bot_id for r in runners]))
            with contextlib.suppress(Exception):
                await self._journal("bye", handed_back=len(runners))
            if self._conns is not None:
                with contextlib.suppress(Exception):
                    await self._conns.close()
            if self._probes is not None:
                await self._probes.stop()
            log.info(
                "worker stopped",
                extra={
                    "bots_handed_back": len(runners),
                    "handlers_cancelled": cancelled,
                    "stats": _stats_dict(self.stats),
                },
            )

    # -- discovery ------------------------------------------------------------

    async def _discovery_loop(self) -> None:
        assert self._conns is not None
        s = self.settings
        key = global_events_key(s.key_prefix)
        client = await self._conns.dedicated(key, s.read_block_ms)
        last_id: str | None = None
        try:
            while not self._stopping:
                try:
                    if last_id is None:
                        last_id = await self._bootstrap(client, key)
                    # Cancelling here loses nothing: on start, discovery reads back
                    # the registry and ``bootstrap_lookback_s`` of the stream.
                    reply = await client.xread({key: last_id}, count=500, block=s.read_block_ms)
                    learned: dict[str, str] = {}
                    for _, entries in reply or ():
                        for entry_id, raw in entries:
                            last_id = _s(entry_id)
                            f = {_s(k): _s(v) for k, v in raw.items()}
                            if f.get("type") == "connected" and f.get("commands_key"):
                                learned[f["bot_id"]] = f["commands_key"]
                    if learned:
                        await self._conns.client.hset(self._registry, mapping=learned)
                        self._wake.set()
                except (RedisError, OSError) as exc:
                    self.stats.redis_errors += 1
                    self.metrics.redis_errors.inc()
                    log.warning("discovery read failed, reconnecting", extra={"error": repr(exc)})
                    await asyncio.sleep(1.0)
                    # Its node may be gone (a failover: the replica serves the stream now,
                    # and the old primary answers MOVED once back): ask the cluster again
                    # and read from whoever serves the stream, as a new connection.
                    await client.aclose()
                    if self._conns.is_cluster:
                        with contextlib.suppress(RedisError, OSError):
                            await self._conns.client.nodes_manager.initialize()
                    client = await self._conns.dedicated(key, s.read_block_ms)
        finally:
            await client.aclose()

    async def _bootstrap(self, client: Any, key: str) -> str:
        """Read back the lookback window: bots that connected and have not ended yet."""
        assert self._conns is not None
        start = f"{int((time.time() - self.settings.bootstrap_lookback_s) * 1000)}-0"
        alive: dict[str, str] = {}
        gateway_of: dict[str, str] = {}  # the gateway of each bot's latest ``connected``
        last = "0-0"
        while True:
            entries = await client.xrange(key, min=start, max="+", count=1000)
            for entry_id, raw in entries:
                last = _s(entry_id)
                f = {_s(k): _s(v) for k, v in raw.items()}
                if f.get("type") == "connected" and f.get("commands_key"):
                    alive[f["bot_id"]] = f["commands_key"]
                    gateway_of[f["bot_id"]] = f.get("gateway", "")
                elif f.get("type") == "session_ended" and not _stale(
                    f, gateway_of.get(f.get("bot_id", ""), "")
                ):
                    alive.pop(f.get("bot_id", ""), None)
            if len(entries) < 1000:
                break
            start = "(" + last
        if alive:
            await self._conns.client.hset(self._registry, mapping=alive)
        log.info("discovery bootstrapped", extra={"bots_alive": len(alive), "group": self.settings.group})
        self._wake.set()
        return last

    # -- ownership ------------------------------------------------------------

    async def _claim_loop(self) -> None:
        while not self._stopping:
            try:
                await self._claim_round()
            except (RedisError, OSError) as exc:
                self.stats.redis_errors += 1
                self.metrics.redis_errors.inc()
                log.warning("claim round failed", extra={"error": repr(exc)})
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.settings.claim_interval_s)

    async def _heartbeat(self, join: bool = True) -> list[str]:
        """Stay in the member set (or only read it) and return the live members."""
        assert self._conns is not None
        ttl = self._member_ttl_ms if join and not self._stopping else 0
        members = await self._conns.client.eval(
            ownership.HEARTBEAT, 1, self._members_key, self.settings.instance_id, ttl
        )
        self._members = sorted({_s(m) for m in members} | ({self.settings.instance_id} if ttl else set()))
        self.metrics.members.set(len(self._members))
        return self._members

    async def _journal(self, kind: str, **fields: str | int) -> None:
        """One ownership record on the group's journal stream (docs/PROTOCOL.md)."""
        assert self._conns is not None
        await self._conns.client.xadd(
            self._journal_key,
            ownership.journal_fields(kind, self.settings.instance_id, **fields),
            maxlen=ownership.JOURNAL_MAXLEN,
            approximate=True,
        )

    async def _claim_round(self) -> None:
        """Take the free bots that are ours to take, then hand one back if we hold too many.

        Every round is one member-set heartbeat, one HGETALL, a GET per bot we do not
        own, and SET NX for what we take (again, further down the list, for lost races).
        """
        assert self._conns is not None
        s, client = self.settings, self._conns.client
        members = await self._heartbeat()
        registry = {_s(k): _s(v) for k, v in (await client.hgetall(self._registry)).items()}
        self.metrics.bots_known.set(len(registry))
        now = time.monotonic()
        for bot_id, until in list(self._shed_until.items()):
            if until <= now:
                del self._shed_until[bot_id]
        candidates = [b for b in registry if b not in self._runners]
        for gone in set(self._free_since) - set(candidates):
            del self._free_since[gone]
        held: dict[str, int] = defaultdict(int)
        held[s.instance_id] = len(self._runners)
        free: dict[str, float] = {}
        if candidates:
            pipe = client.pipeline(transaction=False)
            for bot_id in candidates:
                pipe.get(lease_key(s.key_prefix, bot_id, s.group))
            for bot_id, holder in zip(candidates, await pipe.execute(), strict=True):
                if holder is not None:
                    held[_s(holder)] += 1
                    self._free_since.pop(bot_id, None)
                elif bot_id not in self._shed_until:
                    free[bot_id] = now - self._free_since.setdefault(bot_id, now)
        if free and not self._stopping:
            await self._take(free, registry, members)
        self._maybe_shed(len(registry), members, held)

    async def _take(self, free: dict[str, float], registry: dict[str, str], members: list[str]) -> None:
        assert self._conns is not None
        s, client = self.settings, self._conns.client
        plan = ownership.plan_claims(
            free,
            owned=len(self._runners),
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
                pipe.set(
                    lease_key(s.key_prefix, bot_id, s.group),
                    s.instance_id,
                    nx=True,
                    px=int(s.lease_ttl_s * 1000),
                )
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
                    self._start_runner(bot_id, registry[bot_id], sent + s.lease_ttl_s * 0.8)

    async def _left_meanwhile(self, won: list[str]) -> set[str]:
        """Bots won that left since this round read the registry; their leases are released.

        The last owner forgets a bot before it releases the lease, so a lease won after
        that release finds the bot gone: its ``session_ended`` is handled already and a
        new owner would wait on its streams for good.
        """
        if not won:
            return set()
        assert self._conns is not None
        pipe = self._conns.client.pipeline(transaction=False)
        for bot_id in won:
            pipe.hexists(self._registry, bot_id)
        gone = {b for b, known in zip(won, await pipe.execute(), strict=True) if not known}
        if gone:
            await self._release(sorted(gone))
            log.info("bots left while being claimed; leases released", extra={"bots": sorted(gone)})
        return gone

    def _maybe_shed(self, bots: int, members: list[str], held: Mapping[str, int]) -> None:
        """Hand one bot back if we hold more than our share and someone holds two fewer."""
        s = self.settings
        now = time.monotonic()
        if self._stopping or s.balance_step_s <= 0 or now - self._last_shed < s.balance_step_s:
            return
        running = [r for r in self._runners.values() if r.stop_reason is None]
        if not ownership.should_shed(len(running), bots, members, held, s.instance_id):
            return
        runner = max(running, key=lambda r: r.started_at)  # the newest: least state to hand over
        self._last_shed = now
        self._shed_until[runner.bot.bot_id] = now + s.lease_ttl_s
        self.stats.bots_handed_over += 1
        self.metrics.bots_shed.inc()
        log.info(
            "handing a bot back to balance the group",
            extra={"bot_id": runner.bot.bot_id, "owned": len(running), "members": len(members)},
        )
        runner.request_stop("released")

    def _start_runner(self, bot_id: str, commands_key: str, valid_until: float) -> None:
        runner = _BotRunner(self, bot_id, commands_key, valid_until)
        self._runners[bot_id] = runner
        self.stats.bots_started += 1
        self.metrics.bots_started.inc()
        self.metrics.bots_owned.set(len(self._runners))
        runner.task = asyncio.create_task(runner.run(), name=f"bot-{bot_id}")
        log.info("bot taken", extra={"bot_id": bot_id, "instance": self.instance_id})

    async def _renew_loop(self) -> None:
        s = self.settings
        while not self._renew_stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._renew_stop.wait(), s.lease_renew_s)
            runners = list(self._runners.values())
            if not runners or self._conns is None:
                continue
            sent = time.monotonic()
            try:
                outcomes: list[tuple[Any, Any] | None] = await self._renew(runners)
            except (RedisError, OSError) as exc:
                # One node that does not answer fails a whole pipeline: renew bot by bot,
                # so that only the bots whose keys live on it lapse (a dead node used to
                # move every bot of the instance to another one).
                self.stats.redis_errors += 1
                self.metrics.redis_errors.inc()
                log.warning("lease renewal failed, renewing one by one", extra={"error": repr(exc)})
                each = await asyncio.gather(*(self._renew([r]) for r in runners), return_exceptions=True)
                outcomes = [None if isinstance(o, BaseException) else o[0] for o in each]
            for r, outcome in zip(runners, outcomes, strict=True):
                if outcome is None:
                    continue  # its runner stops by itself once its local validity runs out
                renewed, exists = outcome
                if not renewed:
                    log.warning("lease lost", extra={"bot_id": r.bot.bot_id})
                    r.lease_lost()
                elif not exists:
                    r.request_stop("expired")
                else:
                    r.valid_until = sent + s.lease_ttl_s * 0.8

    async def _renew(self, runners: list[_BotRunner]) -> list[tuple[Any, Any] | None]:
        """Renew the runners' leases and see that their bots' keys still exist, in one pipeline."""
        assert self._conns is not None
        s = self.settings
        pipe = self._conns.client.pipeline(transaction=False)
        for r in runners:
            pipe.eval(ownership.RENEW, 1, r.lease, s.instance_id, int(s.lease_ttl_s * 1000))
            pipe.exists(r.events_key)
        results = await pipe.execute()
        return [(results[2 * i], results[2 * i + 1]) for i in range(len(runners))]

    async def _release(self, bot_ids: list[str]) -> None:
        if not bot_ids or self._conns is None:
            return
        s = self.settings
        pipe = self._conns.client.pipeline(transaction=False)
        for bot_id in bot_ids:
            pipe.eval(ownership.RELEASE, 1, lease_key(s.key_prefix, bot_id, s.group), s.instance_id)
        await pipe.execute()

    def _runner_done(self, runner: _BotRunner, reason: str) -> None:
        if self._runners.get(runner.bot.bot_id) is runner:
            del self._runners[runner.bot.bot_id]
        self.stats.bots_stopped[reason] += 1
        self.metrics.bots_stopped[reason].inc()
        self.metrics.bots_owned.set(len(self._runners))
        self._wake.set()

    async def _lag_loop(self) -> None:
        """Every ``lag_sample_s``: how far the owned bots' streams are ahead of what we handled.

        Only bots whose last read came back full can be behind (a short read took
        everything there was), so a group that keeps up costs no Redis call here.
        """
        s = self.settings
        while not self._renew_stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._renew_stop.wait(), s.lag_sample_s)
            behind = [r for r in self._runners.values() if r.behind and r.stop_reason is None]
            entries, seconds = 0, {"audio": 0.0, "events": 0.0}
            if behind and self._conns is not None:
                try:
                    pipe = self._conns.client.pipeline(transaction=False)
                    for r in behind:
                        pipe.xrevrange(r.audio_key, count=1)
                        pipe.xrevrange(r.events_key, count=1)
                    heads = await pipe.execute()
                except (RedisError, OSError) as exc:
                    self.stats.redis_errors += 1
                    self.metrics.redis_errors.inc()
                    log.warning("lag sample failed", extra={"error": repr(exc)})
                    continue
                for i, r in enumerate(behind):
                    n, audio_s, events_s = r.lag(heads[2 * i], heads[2 * i + 1])
                    entries = max(entries, n)
                    seconds["audio"] = max(seconds["audio"], audio_s)
                    seconds["events"] = max(seconds["events"], events_s)
            self.metrics.lag_entries.set(entries)
            for stream, value in seconds.items():
                self.metrics.lag_seconds[stream].set(value)

    # -- dispatch -------------------------------------------------------------

    async def _call(self, fn: Callable[..., Any], bot: Bot, *args: Any) -> None:
        try:
            async with asyncio.timeout(self.settings.handler_timeout_s):
                await _maybe_await(fn(bot, *args))
        except TimeoutError:
            self.stats.handler_timeouts += 1
            self.metrics.handler_failures["timeout"].inc()
            log.error(
                "handler timed out",
                extra={
                    "bot_id": bot.bot_id,
                    "handler": fn.__qualname__,
                    "handler_timeout_s": self.settings.handler_timeout_s,
                },
            )
        except Exception:
            # The entry is still acknowledged: a handler that always fails on it
            # must not stop the bot's stream forever.
            self.stats.handler_errors += 1
            self.metrics.handler_failures["error"].inc()
            log.exception("handler failed", extra={"bot_id": bot.bot_id, "handler": fn.__qualname__})


def _stats_dict(stats: WorkerStats) -> dict[str, Any]:
    out = {f.name: getattr(stats, f.name) for f in fields(stats)}
    out["bots_stopped"] = dict(stats.bots_stopped)
    return out


class _BotRunner:
    """One owned bot: reads its two streams in its consumer group and dispatches in order."""

    def __init__(self, worker: Worker, bot_id: str, commands_key: str, valid_until: float) -> None:
        s = worker.settings
        assert worker._conns is not None
        self.worker = worker
        self.events_key = bot_events_key(s.key_prefix, bot_id)
        self.audio_key = bot_audio_key(s.key_prefix, bot_id)
        self.lease = lease_key(s.key_prefix, bot_id, s.group)
        self.valid_until = valid_until
        self.bot = Bot(
            bot_id,
            commands_key,
            worker._conns.client,
            command_maxlen=s.command_maxlen,
            say_chunk_s=s.say_chunk_s,
            name=s.bot_name,
            _owned=self.owned,
        )
        self.task: asyncio.Task[None] | None = None
        self.reading = False
        self.stop_reason: str | None = None
        self.started_at = time.monotonic()
        #: The last read of a stream came back full: we may be behind its head.
        self.behind = False
        #: A handler of one of its entries is running (cancelled if the lease is found lost).
        self.handling = False
        self._groups: set[str] = set()
        self._last_seq: dict[str, int] = {}
        self._last_frame: tuple[str, int, int] | None = None  # conn, seq, entry ms
        self._last_event_ms = 0
        self._held: dict[str, list[tuple[str, dict[str, str] | dict[str, bytes]]]] = {}
        self._ended = False
        self._records: list[dict[str, str]] = []  # journal records to write before the XACK

    def owned(self) -> bool:
        """Whether the lease is still ours by our own clock (the fence on ``Bot.send``)."""
        return time.monotonic() <= self.valid_until

    def lease_lost(self) -> None:
        """Another instance may own the bot now: stop, and cut short a handler that is
        running (its commands are refused anyway: :class:`~workers.bot.LeaseLost`)."""
        self.valid_until = 0.0
        self.request_stop("lease_lost")
        if self.handling and self.task is not None:
            self.task.cancel()

    def request_stop(self, reason: str) -> None:
        # The run loop sees this within one read_block_ms. (Were it cancelled in a
        # read, nothing would be lost either: entries delivered to us and not yet
        # handled stay pending in the group, and the next owner claims them.)
        if self.stop_reason is None:
            self.stop_reason = reason

    def lag(self, audio_head: list[Any], events_head: list[Any]) -> tuple[int, float, float]:
        """How far the streams' heads (``XREVRANGE ... COUNT 1`` replies) are ahead of us:
        audio entries (by ``seq``; a head of a newer connection counts its ``seq`` + 1,
        a lower bound), and seconds of entry time on each stream."""
        entries, audio_s, events_s = 0, 0.0, 0.0
        if audio_head and self._last_frame is not None:
            head_id, raw = audio_head[0]
            conn, seq, ms = self._last_frame
            head_seq = int(raw.get(b"seq", b"0"))
            same = _s(raw.get(b"conn", b"")) == conn
            entries = max(0, head_seq - seq) if same else head_seq + 1
            audio_s = max(0.0, (_id_key(_s(head_id))[0] - ms) / 1000)
        if events_head and self._last_event_ms:
            events_s = max(0.0, (_id_key(_s(events_head[0][0]))[0] - self._last_event_ms) / 1000)
        return entries, audio_s, events_s

    async def run(self) -> None:
        w = self.worker
        s = w.settings
        assert w._conns is not None
        client = await w._conns.dedicated(self.events_key, s.read_block_ms)
        reason = "released"
        try:
            # Before anything of the bot is handled: the journal shows who handled it when.
            await w._journal("start", bot_id=self.bot.bot_id)
            for fn in w._start_handlers:
                await w._call(fn, self.bot)
            await self._ensure_groups(client)
            if self.events_key not in self._groups:
                self.stop_reason = "expired"  # its keys are gone: the bot left long ago
            if self.stop_reason is None:
                await self._claim_pending(client)
            if self.bot.taken_over:
                w.stats.takeovers += 1
                w.metrics.takeovers.inc()
            while self.stop_reason is None:
                if time.monotonic() > self.valid_until:
                    self.stop_reason = "lease_lost"
                    break
                if self.audio_key not in self._groups:
                    await self._ensure_groups(client)
                streams = {k: ">" for k in (self.events_key, self.audio_key) if k in self._groups}
                block = None if self._ended else s.read_block_ms
                self.reading = True
                try:
                    reply = await client.xreadgroup(
                        s.group, s.instance_id, streams, count=s.read_count, block=block
                    )
                finally:
                    self.reading = False
                batches = {self.events_key: [], self.audio_key: []}
                for key, entries in reply or ():
                    batches[_s(key)] = entries
                if self._ended and not any(batches.values()) and not any(self._held.values()):
                    self.stop_reason = "session_ended"
                    break
                full = {k: len(v) >= s.read_count for k, v in batches.items()}
                self.behind = any(full.values())
                await self._process(client, batches, full=full)
            reason = self.stop_reason or "released"
        except asyncio.CancelledError:
            reason = self.stop_reason or "released"
            if self.stop_reason is None:
                raise
        except (RedisError, OSError) as exc:
            w.stats.redis_errors += 1
            w.metrics.redis_errors.inc()
            reason = "error"
            log.warning(
                "bot stream failed; releasing it", extra={"bot_id": self.bot.bot_id, "error": repr(exc)}
            )
        finally:
            await asyncio.shield(self._finish(client, reason))

    async def _finish(self, client: Any, reason: str) -> None:
        w = self.worker
        for fn in w._stop_handlers:
            await w._call(fn, self.bot, reason)
        # From here the bot may be another instance's: whatever still holds this Bot
        # (a task a handler spawned) can no longer send for it.
        self.valid_until = 0.0
        with contextlib.suppress(RedisError, OSError):
            if reason in ("session_ended", "expired"):
                await self._forget(client)
            # Before the release: the next owner's ``start`` comes after this in the journal.
            await w._journal("stop", bot_id=self.bot.bot_id, reason=reason)
        with contextlib.suppress(RedisError, OSError):
            if reason != "lease_lost":
                await w._release([self.bot.bot_id])
        await client.aclose()
        w._runner_done(self, reason)
        log.info("bot let go", extra={"bot_id": self.bot.bot_id, "reason": reason})

    async def _forget(self, client: Any) -> None:
        """The meeting ended: drop the bot from the group's registry, unless it came back."""
        assert self.worker._conns is not None
        pool = self.worker._conns.client
        await pool.hdel(self.worker._registry, self.bot.bot_id)
        # A reconnect's ``connected`` lands on the bot's stream before the global one,
        # so anything newer than what we handled means: it is back, keep it known.
        newest = await client.xrevrange(self.events_key, count=1)
        if newest and _s(newest[0][0]) != self._last_event_id:
            await pool.hset(self.worker._registry, self.bot.bot_id, self.bot.commands_key)

    _last_event_id = ""
    _gateway = ""  # the gateway of the bot's latest ``connected``

    async def _ensure_groups(self, client: Any) -> None:
        for key in (self.events_key, self.audio_key):
            if key in self._groups:
                continue
            try:
                # From 0: a group that meets a bot for the first time handles what is retained.
                await client.xgroup_create(key, self.worker.settings.group, id="0")
            except ResponseError as exc:
                text = str(exc)
                if "BUSYGROUP" in text:
                    self.bot.taken_over = True  # someone of this group handled the bot before
                elif "no such key" in text.lower() or "requires the key to exist" in text:
                    continue  # no audio yet; tried again on each round
                else:
                    raise
            self._groups.add(key)

    async def _claim_pending(self, client: Any) -> None:
        """Take over what a previous owner read but did not acknowledge."""
        s = self.worker.settings
        claimed: dict[str, list[Any]] = {self.events_key: [], self.audio_key: []}
        for key in list(self._groups):
            cursor = "0-0"
            while True:
                reply = await client.xautoclaim(
                    key, s.group, s.instance_id, min_idle_time=0, start_id=cursor, count=s.read_count
                )
                cursor = _s(reply[0])
                for entry in reply[1]:
                    if entry and entry[1]:
                        claimed[key].append(entry)
                    elif entry and entry[0]:  # trimmed away since it was read: nothing to hand over
                        await client.xack(key, s.group, entry[0])
                if cursor == "0-0":
                    break
            await self._drop_idle_consumers(client, key)
        n = sum(len(v) for v in claimed.values())
        if n:
            self.worker.stats.entries_claimed += n
            self.worker.metrics.entries_claimed.inc(n)
            self.bot.taken_over = True
            log.info("claimed unacknowledged entries", extra={"bot_id": self.bot.bot_id, "entries": n})
            await self._process(client, claimed, full={})

    async def _drop_idle_consumers(self, client: Any, key: str) -> None:
        s = self.worker.settings
        with contextlib.suppress(ResponseError):
            for c in await client.xinfo_consumers(key, s.group):
                name = _s(c["name"])
                if name != s.instance_id and int(c["pending"]) == 0:
                    await client.xgroup_delconsumer(key, s.group, name)

    async def _process(self, client: Any, batches: dict[str, list[Any]], full: dict[str, bool]) -> None:
        """Merge the two streams by entry id and dispatch, holding back what may be
        overtaken: past the end of a stream's full batch, the other stream could have
        older entries we have not read yet."""
        merged: list[tuple[tuple[int, int, int], str, str, Any]] = []
        for key in (self.events_key, self.audio_key):
            entries = self._held.pop(key, []) + list(batches.get(key, ()))
            merged += [(self._order(key, _s(eid), raw), key, _s(eid), raw) for eid, raw in entries]
        marks = [(_id_key(_s(batches[k][-1][0]))[0], 1) for k, f in full.items() if f and batches.get(k)]
        mark = min(marks) if marks else None
        merged.sort(key=lambda t: t[0])
        done: dict[str, list[str]] = {self.events_key: [], self.audio_key: []}
        for idk, key, eid, raw in merged:
            if mark is not None and idk[:2] > mark:
                self._held.setdefault(key, []).append((eid, raw))
                continue
            if time.monotonic() > self.valid_until:
                # Our lease may be gone: stop before a new owner could handle the same entry.
                self._held.clear()
                self.stop_reason = "lease_lost"
                break
            stream = "events" if key == self.events_key else "audio"
            began = time.perf_counter()
            self.handling = True
            try:
                if key == self.events_key:
                    await self._dispatch_event(eid, raw)
                else:
                    await self._dispatch_audio(eid, raw)
            finally:
                self.handling = False
            metrics = self.worker.metrics
            metrics.handler_seconds[stream].observe(time.perf_counter() - began)
            metrics.entries[stream].inc()
            done[key].append(eid)
        if not any(done.values()):
            return
        w = self.worker
        if self._records and w._conns is not None:
            # Records first: a record may then be written for an entry that comes again
            # (handled twice), never an entry acknowledged without its record. (On the
            # shared pool: in a cluster the journal may live on another node than the bot.)
            records = w._conns.client.pipeline(transaction=False)
            for record in self._records:
                records.xadd(w._journal_key, record, maxlen=ownership.JOURNAL_MAXLEN, approximate=True)
            self._records.clear()
            await records.execute()
        pipe = client.pipeline(transaction=False)
        for key, ids in done.items():
            if ids:
                pipe.xack(key, w.settings.group, *ids)
        await pipe.execute()

    def _order(self, key: str, entry_id: str, raw: Mapping[bytes, bytes]) -> tuple[int, int, int]:
        """Sort key across the two streams. Entry ids are times only to the millisecond
        (the sequence part counts per stream), so within one millisecond a connection's
        start events go before audio, and everything else (ends included) after it."""
        ms, seq = _id_key(entry_id)
        if key == self.audio_key:
            return ms, 1, seq
        return ms, 0 if raw.get(b"type") in _START_EVENTS else 2, seq

    async def _dispatch_event(self, entry_id: str, raw: dict[bytes, bytes]) -> None:
        w, bot = self.worker, self.bot
        f = {_s(k): _s(v) for k, v in raw.items()}
        event = Event(f.get("type", ""), bot.bot_id, f, entry_id)
        self._last_event_id = entry_id
        self._last_event_ms = _id_key(entry_id)[0]
        w.stats.events += 1
        t = event.type
        if t in ("disconnected", "session_ended") and _stale(f, self._gateway):
            # From a gateway the bot has already left for another (a drain, a reconnect):
            # the bot goes on there. Its handlers are not told the meeting ended.
            return
        if t == "connected":
            bot.connected = True
            self._ended = False
            self._gateway = f.get("gateway") or self._gateway
            bot.commands_key = f.get("commands_key") or bot.commands_key
        elif t == "ready":
            bot.ready = True
            data = event.data or {}
            for name_field in ("bot_name", "display_name", "name"):
                if isinstance(data.get(name_field), str) and not w.settings.bot_name:
                    bot.name = data[name_field]
                    break
        elif t == "disconnected" and f.get("channel") == "control":
            bot.ready = False
        elif t == "session_ended":
            bot.ready = bot.connected = False
            self._ended = True
        elif t in PLAYBACK_EVENTS:
            bot.note_playback(event)
        elif t == "message" and w.settings.conformance:
            await self._answer_ping(event)
        for fn in (*w._event_handlers.get(t, ()), *w._event_handlers.get("*", ())):
            await w._call(fn, bot, event)

    async def _answer_ping(self, event: Event) -> None:
        """Conformance mode: ``{"type": "ping", "id": ID}`` from the bot is answered ``pong:ID``."""
        data = event.data or {}
        if data.get("type") == "ping" and isinstance(data.get("id"), str):
            await self.bot.send(commands.sendmsg(f"pong:{data['id']}"))

    async def _dispatch_audio(self, entry_id: str, raw: dict[bytes, bytes]) -> None:
        w, bot = self.worker, self.bot
        get = raw.get
        frame = AudioFrame(
            bot_id=bot.bot_id,
            speaker_id=_s(get(b"speaker_id", b"")),
            speaker_name=_s(get(b"speaker_name", b"")),
            pcm=get(b"pcm", b""),
            sample_rate=int(get(b"sample_rate", b"48000")),
            seq=int(get(b"seq", b"-1")),
            conn=_s(get(b"conn", b"")),
            ts_ms=int(get(b"ts", b"0")),
            entry_id=entry_id,
        )
        w.stats.frames += 1
        self._last_frame = (frame.conn, frame.seq, _id_key(entry_id)[0])
        if w.settings.conformance:
            self._records.append(
                ownership.journal_fields(
                    "frame",
                    w.settings.instance_id,
                    bot_id=bot.bot_id,
                    conn=frame.conn,
                    seq=frame.seq,
                    entry_id=entry_id,
                    at=int(time.time() * 1000),
                )
            )
        last = self._last_seq.get(frame.conn)
        if last is not None:
            if frame.seq > last + 1:
                w.stats.seq_gaps += frame.seq - last - 1
                w.metrics.seq_gaps.inc(frame.seq - last - 1)
                log.warning(
                    "audio frames missing",
                    extra={
                        "bot_id": bot.bot_id,
                        "conn": frame.conn,
                        "after_seq": last,
                        "missing": frame.seq - last - 1,
                    },
                )
            elif frame.seq <= last:
                w.stats.seq_repeats += 1
                w.metrics.seq_repeats.inc()
        self._last_seq[frame.conn] = max(frame.seq, last if last is not None else -1)
        if w.settings.exclude_own_voice and bot.name and frame.speaker_name == bot.name:
            w.stats.own_voice_skipped += 1
            w.metrics.own_voice_skipped.inc()
            return
        for fn in w._audio_handlers:
            await w._call(fn, bot, frame)
