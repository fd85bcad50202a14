"""The gateway's lifecycle: start, serve, drain, stop.

Order of shutdown, each step idempotent:

1. drain: readiness goes false, new handshakes get HTTP 503; bots already here
   keep working until they leave or ``drain_timeout_s`` is spent;
2. close the remaining bot sockets with 1012 (service restart), so that a bot
   that reconnects lands on another replica;
3. stop the command readers (unsent commands stay pending in Redis) and the janitor;
4. flush what the publisher holds, then close Redis and the embedded server.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
import sys
import time
from collections.abc import Callable

from prometheus_client import CollectorRegistry
from redis.exceptions import RedisError
from websockets.asyncio.server import Server, serve
from websockets.frames import CloseCode

from gateway.bot_server import BotServer
from gateway.embedded_redis import RedisServer
from gateway.exceptions import InternalTaskFailed
from gateway.janitor import Janitor
from gateway.keys import KeySpace
from gateway.logs import error_text
from gateway.metrics import Metrics, watch_gc
from gateway.probes import ProbeServer
from gateway.publisher import Publisher
from gateway.redis_conn import RedisBackend, connect
from gateway.settings import Settings, redact_url
from gateway.ws_fast_path import BotWebSocket

log = logging.getLogger(__name__)

HEALTH_INTERVAL_S = 2.0
FLUSH_ON_STOP_S = 10.0


class Gateway:
    """One gateway process. ``await start()``, then ``await drain()`` and ``await stop()``."""

    def __init__(self, settings: Settings, registry: CollectorRegistry | None = None) -> None:
        self.settings = settings
        self.keyspace = KeySpace(settings.key_prefix, settings.command_shards)
        self.metrics = Metrics(registry)
        self.embedded: RedisServer | None = None
        self.backend: RedisBackend | None = None
        self.publisher: Publisher | None = None
        self.bots: BotServer | None = None
        self.ws_server: Server | None = None
        self.probes: ProbeServer | None = None
        self.janitor: Janitor | None = None
        self.redis_ok = False
        self._tasks: list[asyncio.Task[None]] = []
        self._crashed: asyncio.Task[None] | None = None
        self._crash = asyncio.Event()
        self._unwatch_gc: Callable[[], None] | None = None
        self._stopped = False
        self._stop_lock = asyncio.Lock()

    @property
    def port(self) -> int:
        """The bot port actually bound (useful with port 0)."""
        if self.ws_server is None:
            return self.settings.port
        port: int = self.ws_server.sockets[0].getsockname()[1]
        return port

    @property
    def redis_url(self) -> str:
        return self.settings.redis_url or (self.embedded.url if self.embedded else "")

    def is_ready(self) -> bool:
        bots = self.bots
        return self.redis_ok and bots is not None and bots.is_ready()

    async def start(self) -> None:
        settings = self.settings
        log.info("starting gateway", extra={"gateway": settings.gateway_id, "settings": repr(settings)})
        url = settings.redis_url
        if not url:
            self.embedded = RedisServer()
            self.embedded.start()
            url = self.embedded.url
            log.warning(
                "no --redis-url given: started an embedded redis-server (data is lost on exit)",
                extra={"redis_url": url, "binary": self.embedded.binary},
            )
        if not settings.auth_secret:
            log.warning(
                "AUTH DISABLED: no --auth-secret, so anyone who can reach the bot port may connect "
                "as any bot. Use this only for development."
            )
        self.backend = await connect(settings, url)
        self.redis_ok = True
        self.publisher = Publisher(self.backend, self.keyspace, settings, self.metrics)
        self.publisher.start()
        self._supervise(self.publisher.task)
        self.bots = BotServer(settings, self.keyspace, self.metrics, self.backend, self.publisher)
        self.bots.shedder.start()
        self.ws_server = await serve(
            self.bots.handler,
            settings.host,
            settings.port,
            process_request=self.bots.process_request,
            compression=None,  # PCM gains nothing from permessage-deflate
            max_size=settings.ws_max_message_bytes,
            # Keepalive is ours (BotServer.keepalive): websockets' would close a socket
            # whose pong sits behind unread audio, though the audio proves it alive.
            ping_interval=None,
            ping_timeout=None,
            close_timeout=settings.ws_close_timeout_s,
            logger=logging.getLogger("websockets.server"),
            create_connection=BotWebSocket,
        )
        if settings.metrics_port:
            self.probes = ProbeServer(
                settings.metrics_host, settings.metrics_port, self.metrics.registry, self.is_ready
            )
            await self.probes.start()
        self._tasks = [
            asyncio.create_task(self._watch_redis(), name="redis-health"),
            asyncio.create_task(self._refresh_expiry(), name="key-expiry"),
        ]
        if settings.ws_ping_interval_s > 0:
            self._tasks.append(asyncio.create_task(self.bots.keepalive(), name="keepalive"))
        for task in self._tasks:
            self._supervise(task)
        # Not supervised: it catches and counts its own failures, and housekeeping is
        # never a reason to stop serving bots.
        self.janitor = Janitor(self.backend, self.keyspace, settings, self.metrics)
        self.janitor.start()
        self._unwatch_gc = watch_gc(self.metrics.gc_pause)
        # What start-up allocated lives as long as the process: out of the collector's
        # sight, a full collection walks only what bots brought (docs/ARCHITECTURE.md).
        gc.collect()
        gc.freeze()
        self.metrics.ready.set(1)
        log.info(
            "gateway listening",
            extra={"host": settings.host, "port": self.port, "redis_url": redact_url(url)},
        )

    def _supervise(self, task: asyncio.Task[None] | None) -> None:
        """These tasks run for the life of the process: one that ends by itself is a bug."""

        def done(task: asyncio.Task[None]) -> None:
            if self._stopped or task.cancelled():
                return
            exc = task.exception()
            log.critical(
                "internal task ended, stopping the gateway",
                extra={"task": task.get_name(), "error": error_text(exc)},
                exc_info=exc,
            )
            self._crashed = task
            self._crash.set()

        if task is not None:
            task.add_done_callback(done)

    async def _watch_redis(self) -> None:
        if self.backend is None:  # started only by start(), after connecting
            return
        while True:
            if self.publisher is not None:
                self.publisher.check_stalled()
            started = time.perf_counter()
            try:
                await self.backend.client.ping()
                ok = True
                self.metrics.redis_latency.labels("ping").observe(time.perf_counter() - started)
            except (RedisError, OSError):
                ok = False
                self.metrics.redis_errors.labels("ping").inc()
            if ok != self.redis_ok:
                log.warning("redis %s", "reachable again" if ok else "unreachable")
            self.redis_ok = ok
            self.metrics.redis_up.set(1 if ok and self.publisher and self.publisher.healthy else 0)
            self.metrics.ready.set(1 if self.is_ready() else 0)
            await asyncio.sleep(HEALTH_INTERVAL_S)

    async def _refresh_expiry(self) -> None:
        interval_s = max(1.0, min(self.settings.key_ttl_s / 4, 300.0))
        while True:
            await asyncio.sleep(interval_s)
            if self.bots is not None:
                self.bots.refresh_expiry()

    async def drain(self, timeout_s: float | None = None) -> None:
        """Refuse new bots and wait, up to the drain time, for connected ones to leave."""
        if self.bots is None:
            return
        timeout_s = self.settings.drain_timeout_s if timeout_s is None else timeout_s
        self.bots.draining = True
        self.metrics.ready.set(0)
        remaining = len(self.bots.registry)
        log.info("draining", extra={"bots": remaining, "drain_timeout_s": timeout_s})
        deadline = time.monotonic() + timeout_s
        # Polled: a once-per-shutdown wait does not warrant an event on every disconnect.
        while len(self.bots.registry) and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.1)
        log.info("drain finished", extra={"bots_left": len(self.bots.registry)})

    async def stop(self) -> None:
        async with self._stop_lock:
            if self._stopped:
                return
            self._stopped = True
            if self.bots is not None:
                self.bots.draining = True
            self.metrics.ready.set(0)
            if self.ws_server is not None:
                self.ws_server.close(code=CloseCode.SERVICE_RESTART, reason="gateway restarting")
                # Shielded: a second signal must not abandon sockets half-closed.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(self.ws_server.wait_closed()), 15)
            if self.bots is not None:
                await self.bots.delivery.stop()
                await self.bots.shedder.stop()
            if self.janitor is not None:
                await self.janitor.stop()
            for task in self._tasks:
                task.cancel()
            for task in self._tasks:
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            if self.publisher is not None:
                await self.publisher.close(FLUSH_ON_STOP_S)
            if self.probes is not None:
                await self.probes.stop()
            if self.backend is not None:
                with contextlib.suppress(Exception):
                    await self.backend.close()
            if self.embedded is not None:
                self.embedded.stop()
            if self._unwatch_gc is not None:
                self._unwatch_gc()
                self._unwatch_gc = None
            log.info("gateway stopped")

    async def run(self) -> None:
        """Start, serve until SIGTERM or SIGINT, drain, stop. A second signal skips the drain."""
        loop = asyncio.get_running_loop()
        signalled = asyncio.Event()
        if sys.platform != "win32":  # Windows event loops take no signal handlers
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, signalled.set)
        try:
            await self.start()
            crashed = asyncio.create_task(self._crash.wait())
            signal_task = asyncio.create_task(signalled.wait())
            await asyncio.wait({crashed, signal_task}, return_when=asyncio.FIRST_COMPLETED)
            crashed.cancel()
            signal_task.cancel()
            if self._crashed is not None:
                # No drain: the bots are better off reconnecting to a healthy replica now.
                raise InternalTaskFailed(f"task {self._crashed.get_name()!r} ended")
            log.info("signal received, draining (send again to stop now)")
            signalled.clear()
            drain = asyncio.create_task(self.drain())
            again = asyncio.create_task(signalled.wait())
            await asyncio.wait({drain, again}, return_when=asyncio.FIRST_COMPLETED)
            drain.cancel()
            again.cancel()
        finally:
            await self.stop()
