"""The Worker: discovers bots, owns each through a lease, runs handlers per bot.

Design (the why is in ``docs/WORKERS.md``)::

    meetstream:events ──XREAD (every instance)──► registry hash {prefix}:workers:{group}:bots
                                                      │ claim loop: SET lease NX PX (one winner)
                                                      ▼
    {BOT}:events + {BOT}:audio ──XREADGROUP group=<worker group>, consumer=<instance>──► handlers
                                  XACK after the handlers ran; a new owner XAUTOCLAIMs the rest

* Ownership is a lease key per bot and group, renewed every ``lease_renew_s``.
  An instance stops dispatching a bot as soon as its lease *might* have
  expired by its own clock, so two instances never run one bot's handlers at once.
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

from redis.exceptions import RedisError, ResponseError

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
    lease_key,
    registry_key,
)

log = logging.getLogger(__name__)

EventHandler = Callable[[Bot, Event], Awaitable[None] | None]
AudioHandler = Callable[[Bot, AudioFrame], Awaitable[None] | None]
StartHandler = Callable[[Bot], Awaitable[None] | None]
StopHandler = Callable[[Bot, str], Awaitable[None] | None]
F = TypeVar("F", bound=Callable[..., Any])

# Compare-and-act on a lease: only the holder may extend or drop it.
_RENEW = (
    "if redis.call('get', KEYS[1]) == ARGV[1] then "
    "return redis.call('pexpire', KEYS[1], ARGV[2]) end return 0"
)
_RELEASE = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end return 0"

_START_EVENTS = (b"connected", b"ready", b"audio_handshake")

#: Why an instance stopped handling a bot (passed to ``on_bot_stop`` handlers).
STOP_REASONS = ("session_ended", "released", "lease_lost", "expired", "error")


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
    #: A free bot waits this long per bot already owned before we take it: the least loaded instance wins.
    balance_step_s: float = 0.2
    max_bots: int = 1000
    read_count: int = 64
    read_block_ms: int = 1000
    handler_timeout_s: float | None = 60.0
    #: On SIGTERM: wait this long for handlers to finish (below Kubernetes' 30 s grace period).
    graceful_timeout_s: float = 20.0
    bootstrap_lookback_s: float = 3600.0
    command_maxlen: int = 1000
    say_chunk_s: float = 2.0

    def __post_init__(self) -> None:
        check_group(self.group)
        if not self.instance_id:
            object.__setattr__(
                self, "instance_id", f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
            )
        if self.lease_renew_s * 2 >= self.lease_ttl_s:
            raise ValueError("lease_renew_s must be under half of lease_ttl_s")

    def __repr__(self) -> str:
        shown = ", ".join(
            f"{f.name}={redact_url(v) if f.name == 'redis_url' else v!r}"
            for f in fields(self)
            if (v := getattr(self, f.name)) is not None
        )
        return f"WorkerSettings({shown})"

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> WorkerSettings:
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for name, var in (
            ("redis_url", "MEETSTREAM_REDIS_URL"),
            ("key_prefix", "MEETSTREAM_KEY_PREFIX"),
            ("group", "MEETSTREAM_WORKER_GROUP"),
            ("bot_name", "MEETSTREAM_BOT_NAME"),
        ):
            if env.get(var):
                values[name] = env[var]
        values.update({k: v for k, v in overrides.items() if v is not None})
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

    def __init__(self, settings: WorkerSettings | None = None, *, handle_signals: bool = True) -> None:
        self.settings = settings or WorkerSettings.from_env()
        self.handle_signals = handle_signals
        self.stats = WorkerStats()
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
        self._registry = registry_key(self.settings.key_prefix, self.settings.group)

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
        self._conns = await connect(RedisSettings(s.redis_url, s.redis_cluster))  # type: ignore[arg-type]
        self._tasks = [
            asyncio.create_task(self._discovery_loop(), name="worker-discovery"),
            asyncio.create_task(self._claim_loop(), name="worker-claim"),
            asyncio.create_task(self._renew_loop(), name="worker-renew"),
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
            self._wake.set()
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
            if self._conns is not None:
                with contextlib.suppress(Exception):
                    await self._conns.close()
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
                    log.warning("discovery read failed, retrying", extra={"error": repr(exc)})
                    await asyncio.sleep(1.0)
        finally:
            await client.aclose()

    async def _bootstrap(self, client: Any, key: str) -> str:
        """Read back the lookback window: bots that connected and have not ended yet."""
        assert self._conns is not None
        start = f"{int((time.time() - self.settings.bootstrap_lookback_s) * 1000)}-0"
        alive: dict[str, str] = {}
        last = "0-0"
        while True:
            entries = await client.xrange(key, min=start, max="+", count=1000)
            for entry_id, raw in entries:
                last = _s(entry_id)
                f = {_s(k): _s(v) for k, v in raw.items()}
                if f.get("type") == "connected" and f.get("commands_key"):
                    alive[f["bot_id"]] = f["commands_key"]
                elif f.get("type") == "session_ended":
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
                log.warning("claim round failed", extra={"error": repr(exc)})
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.settings.claim_interval_s)

    async def _claim_round(self) -> None:
        assert self._conns is not None
        s, client = self.settings, self._conns.client
        registry = {_s(k): _s(v) for k, v in (await client.hgetall(self._registry)).items()}
        candidates = [b for b in registry if b not in self._runners]
        for gone in set(self._free_since) - set(candidates):
            del self._free_since[gone]
        if not candidates:
            return
        pipe = client.pipeline(transaction=False)
        for bot_id in candidates:
            pipe.exists(lease_key(s.key_prefix, bot_id, s.group))
        held = await pipe.execute()
        now = time.monotonic()
        free = []
        for bot_id, exists in zip(candidates, held, strict=True):
            if exists:
                self._free_since.pop(bot_id, None)
            else:
                free.append(bot_id)
                self._free_since.setdefault(bot_id, now)
        free.sort(key=lambda b: self._free_since[b])
        owned = len(self._runners)
        take: list[str] = []
        for bot_id in free:
            if owned + len(take) >= s.max_bots:
                self.stats.max_bots_hit += 1
                log.warning(
                    "max_bots reached, leaving free bots to other instances",
                    extra={"max_bots": s.max_bots, "free": len(free) - len(take)},
                )
                break
            if now - self._free_since[bot_id] >= (owned + len(take)) * s.balance_step_s:
                take.append(bot_id)
        if not take or self._stopping:
            return
        sent = time.monotonic()
        pipe = client.pipeline(transaction=False)
        for bot_id in take:
            pipe.set(
                lease_key(s.key_prefix, bot_id, s.group), s.instance_id, nx=True, px=int(s.lease_ttl_s * 1000)
            )
        for bot_id, won in zip(take, await pipe.execute(), strict=True):
            self._free_since.pop(bot_id, None)
            if won and not self._stopping:
                self._start_runner(bot_id, registry[bot_id], sent + s.lease_ttl_s * 0.8)

    def _start_runner(self, bot_id: str, commands_key: str, valid_until: float) -> None:
        runner = _BotRunner(self, bot_id, commands_key, valid_until)
        self._runners[bot_id] = runner
        self.stats.bots_started += 1
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
                pipe = self._conns.client.pipeline(transaction=False)
                for r in runners:
                    pipe.eval(_RENEW, 1, r.lease, s.instance_id, int(s.lease_ttl_s * 1000))
                    pipe.exists(r.events_key)
                results = await pipe.execute()
            except (RedisError, OSError) as exc:
                # Runners stop by themselves once their local validity runs out.
                self.stats.redis_errors += 1
                log.warning("lease renewal failed", extra={"error": repr(exc), "bots": len(runners)})
                continue
            for i, r in enumerate(runners):
                renewed, exists = results[2 * i], results[2 * i + 1]
                if not renewed:
                    log.warning("lease lost", extra={"bot_id": r.bot.bot_id})
                    r.valid_until = 0.0
                    r.request_stop("lease_lost")
                elif not exists:
                    r.request_stop("expired")
                else:
                    r.valid_until = sent + s.lease_ttl_s * 0.8

    async def _release(self, bot_ids: list[str]) -> None:
        if not bot_ids or self._conns is None:
            return
        s = self.settings
        pipe = self._conns.client.pipeline(transaction=False)
        for bot_id in bot_ids:
            pipe.eval(_RELEASE, 1, lease_key(s.key_prefix, bot_id, s.group), s.instance_id)
        await pipe.execute()

    def _runner_done(self, runner: _BotRunner, reason: str) -> None:
        if self._runners.get(runner.bot.bot_id) is runner:
            del self._runners[runner.bot.bot_id]
        self.stats.bots_stopped[reason] += 1
        self._wake.set()

    # -- dispatch -------------------------------------------------------------

    async def _call(self, fn: Callable[..., Any], bot: Bot, *args: Any) -> None:
        try:
            async with asyncio.timeout(self.settings.handler_timeout_s):
                await _maybe_await(fn(bot, *args))
        except TimeoutError:
            self.stats.handler_timeouts += 1
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
        )
        self.task: asyncio.Task[None] | None = None
        self.reading = False
        self.stop_reason: str | None = None
        self._groups: set[str] = set()
        self._last_seq: dict[str, int] = {}
        self._held: dict[str, list[tuple[str, dict[str, str] | dict[str, bytes]]]] = {}
        self._ended = False

    def request_stop(self, reason: str) -> None:
        # The run loop sees this within one read_block_ms. (Were it cancelled in a
        # read, nothing would be lost either: entries delivered to us and not yet
        # handled stay pending in the group, and the next owner claims them.)
        if self.stop_reason is None:
            self.stop_reason = reason

    async def run(self) -> None:
        w = self.worker
        s = w.settings
        assert w._conns is not None
        client = await w._conns.dedicated(self.events_key, s.read_block_ms)
        reason = "released"
        try:
            for fn in w._start_handlers:
                await w._call(fn, self.bot)
            await self._ensure_groups(client)
            if self.events_key not in self._groups:
                self.stop_reason = "expired"  # its keys are gone: the bot left long ago
            if self.stop_reason is None:
                await self._claim_pending(client)
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
                await self._process(
                    client, batches, full={k: len(v) >= s.read_count for k, v in batches.items()}
                )
            reason = self.stop_reason or "released"
        except asyncio.CancelledError:
            reason = self.stop_reason or "released"
            if self.stop_reason is None:
                raise
        except (RedisError, OSError) as exc:
            w.stats.redis_errors += 1
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
        with contextlib.suppress(RedisError, OSError):
            if reason in ("session_ended", "expired"):
                await self._forget(client)
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
            if key == self.events_key:
                await self._dispatch_event(eid, raw)
            else:
                await self._dispatch_audio(eid, raw)
            done[key].append(eid)
        pipe = client.pipeline(transaction=False)
        for key, ids in done.items():
            if ids:
                pipe.xack(key, self.worker.settings.group, *ids)
        if any(done.values()):
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
        w.stats.events += 1
        t = event.type
        if t == "connected":
            bot.connected = True
            self._ended = False
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
        for fn in (*w._event_handlers.get(t, ()), *w._event_handlers.get("*", ())):
            await w._call(fn, bot, event)

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
        last = self._last_seq.get(frame.conn)
        if last is not None:
            if frame.seq > last + 1:
                w.stats.seq_gaps += frame.seq - last - 1
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
        self._last_seq[frame.conn] = max(frame.seq, last if last is not None else -1)
        if w.settings.exclude_own_voice and bot.name and frame.speaker_name == bot.name:
            w.stats.own_voice_skipped += 1
            return
        for fn in w._audio_handlers:
            await w._call(fn, bot, frame)
