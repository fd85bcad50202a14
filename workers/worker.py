"""The Worker: a group member that discovers bots, owns each through a lease, runs handlers per bot.

Design (the contract is ``docs/PROTOCOL.md``, "Sharing bots among worker
instances"; the SDK's choices are in ``docs/WORKERS.md``)::

    meetstream:events ──XREAD (every instance)──► registry hash {prefix}:workers:{group}:bots
                                                      │ claim round: SET lease NX PX (one winner)
                                                      ▼
    {BOT}:events + {BOT}:audio ──XREADGROUP group=<worker group>, consumer=<instance>──► handlers
                                  XACK after the handlers ran; a new owner XAUTOCLAIMs the rest

One concept per module, as arq does:

* :mod:`workers.settings`: :class:`WorkerSettings`;
* :mod:`workers.discovery`: the global stream folded into the group's registry;
* :mod:`workers.leases` (I/O) and :mod:`workers.ownership` (pure): membership,
  claims, renewal, release, balance, the journal. An instance stops dispatching
  a bot as soon as its lease *might* have expired by its own clock, so two
  instances never run one bot's handlers at once; a crashed instance's bots move
  within ``lease_ttl_s + claim_interval_s``;
* :mod:`workers.runner`: one owned bot, in its own task on its own connection
  (a slow handler delays only its bot; a bot's entries are handled one at a
  time, in order, acknowledged only after the handlers returned, so a new owner
  claims what a dead one had read but not finished);
* :mod:`workers.handlers`: what is registered, and how a handler is called;
* this module: the public :class:`Worker`, registration, lifecycle (run, drain,
  stop), signals and stats.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys
from collections.abc import Callable
from typing import Any, TypeVar

from prometheus_client import CollectorRegistry
from redis.exceptions import RedisError

from gateway.logs import error_text
from gateway.probes import ProbeServer
from workers import runner as _runner
from workers.bot import Bot
from workers.connections import Connections, RedisSettings, connect
from workers.constants import PLAYBACK_EVENTS, STOP_REASONS
from workers.discovery import Discovery, Registry
from workers.handlers import Handlers
from workers.leases import Journal, Leases
from workers.metrics import WorkerMetrics
from workers.runner import BotRunner, RunnerContext
from workers.settings import ENV_SETTINGS, WorkerSettings
from workers.stats import WorkerStats

__all__ = ["ENV_SETTINGS", "STOP_REASONS", "Worker", "WorkerSettings", "WorkerStats"]

log = logging.getLogger(__name__)

F = TypeVar("F", bound=Callable[..., Any])


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
        self._handlers = Handlers(self.settings.handler_timeout_s, self.stats, self.metrics)
        self._runners: dict[str, BotRunner] = {}
        self._conns: Connections | None = None
        self._leases: Leases | None = None
        self._discovery: Discovery | None = None
        self._journal: Journal | None = None
        self._runner_ctx: RunnerContext | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._stop_requested = asyncio.Event()
        self._renew_stop = asyncio.Event()
        self._stopping = False
        self._stopped = False
        self._stop_lock = asyncio.Lock()
        self._probes: ProbeServer | None = None

    # -- registration ---------------------------------------------------------

    def on(self, *types: str) -> Callable[[F], F]:
        """Handle events of these types (``"*"``: every event)."""

        def register(fn: F) -> F:
            for t in types:
                self._handlers.events[t].append(fn)
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
        self._handlers.audio.append(fn)
        return fn

    def on_bot_start(self, fn: F) -> F:
        """Called when this instance takes a bot (first, or over from another instance)."""
        self._handlers.start.append(fn)
        return fn

    def on_bot_stop(self, fn: F) -> F:
        """Called with a reason from :data:`STOP_REASONS` when this instance lets a bot go:
        close what you opened for it here."""
        self._handlers.stop.append(fn)
        return fn

    # -- introspection --------------------------------------------------------

    @property
    def bots(self) -> dict[str, Bot]:
        """The bots this instance owns now."""
        return {bot_id: r.bot for bot_id, r in self._runners.items()}

    @property
    def instance_id(self) -> str:
        return self.settings.instance_id

    @property
    def metrics_port(self) -> int | None:
        """The port ``/metrics`` is served on, or None when ``metrics_port`` is 0 (no server)."""
        return self._probes.port if self._probes is not None else None

    # -- lifecycle ------------------------------------------------------------

    async def start(self) -> None:
        s = self.settings
        log.info("worker starting", extra={"settings": repr(s)})
        if s.metrics_port:
            self._probes = ProbeServer(
                s.metrics_host, s.metrics_port, self.metrics.registry, lambda: not self._stopping
            )
            await self._probes.start()
        conns = self._conns = await connect(RedisSettings(s.redis_url, s.redis_cluster))  # type: ignore[arg-type]
        registry = Registry(conns.client, s.key_prefix, s.group)
        journal = self._journal = Journal(conns.client, s.key_prefix, s.group, s.instance_id)
        leases = self._leases = Leases(
            s, conns.client, registry, self.stats, self.metrics, self._runners, self._start_runner
        )
        self._discovery = Discovery(s, conns, registry, self.stats, self.metrics, leases.wake)
        self._runner_ctx = RunnerContext(
            settings=s,
            conns=conns,
            handlers=self._handlers,
            stats=self.stats,
            metrics=self.metrics,
            journal=journal,
            registry=registry,
            release=leases.release,
            runner_done=self._runner_done,
        )
        # Join the member set before the first claim round: the others' fair share counts us.
        await leases.heartbeat()
        await journal.write(
            "hello",
            lease_ttl_ms=int(s.lease_ttl_s * 1000),
            claim_interval_ms=int(s.claim_interval_s * 1000),
            impl="python-sdk",
        )
        self._tasks = [
            asyncio.create_task(self._discovery.run(), name="worker-discovery"),
            asyncio.create_task(leases.claim_loop(), name="worker-claim"),
            asyncio.create_task(leases.renew_loop(self._renew_stop), name="worker-renew"),
            asyncio.create_task(self._lag_loop(), name="worker-lag"),
        ]

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
            leases = self._leases
            if leases is not None:
                leases.stop_claiming()
            if self._discovery is not None:
                self._discovery.stop()
            # Leave the member set first: the others' fair share grows by our bots, so they
            # take each one at once when we hand it back below.
            with contextlib.suppress(RedisError, OSError):
                if leases is not None:
                    await leases.leave()
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
            if leases is not None:
                with contextlib.suppress(Exception):
                    await asyncio.shield(leases.release([r.bot.bot_id for r in runners]))
            if self._journal is not None:
                with contextlib.suppress(Exception):
                    await self._journal.write("bye", handed_back=len(runners))
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
                    "stats": self.stats.as_dict(),
                },
            )

    # -- the owned bots -------------------------------------------------------

    def _start_runner(self, bot_id: str, commands_key: str, valid_until: float) -> None:
        assert self._runner_ctx is not None  # started: the claim loop runs only after start()
        # Looked up at call time, so that a test may replace the runner class.
        runner = _runner.BotRunner(self._runner_ctx, bot_id, commands_key, valid_until)
        self._runners[bot_id] = runner
        self.stats.bots_started += 1
        self.metrics.bots_started.inc()
        self.metrics.bots_owned.set(len(self._runners))
        runner.task = asyncio.create_task(runner.run(), name=f"bot-{bot_id}")
        log.info("bot taken", extra={"bot_id": bot_id, "instance": self.instance_id})

    def _runner_done(self, runner: BotRunner, reason: str) -> None:
        if self._runners.get(runner.bot.bot_id) is runner:
            del self._runners[runner.bot.bot_id]
        self.stats.bots_stopped[reason] += 1
        self.metrics.bots_stopped[reason].inc()
        self.metrics.bots_owned.set(len(self._runners))
        if self._leases is not None:
            self._leases.wake()

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
            if behind and self._conns is not None:
                try:
                    entries, seconds = await _runner.sample_lag(self._conns.client, behind)
                except (RedisError, OSError) as exc:
                    self.stats.redis_errors += 1
                    self.metrics.redis_errors.inc()
                    log.warning("lag sample failed", extra={"error": error_text(exc)})
                    continue
            else:
                entries, seconds = 0, {"audio": 0.0, "events": 0.0}
            self.metrics.lag_entries.set(entries)
            for stream, value in seconds.items():
                self.metrics.lag_seconds[stream].set(value)
