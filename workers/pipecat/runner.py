"""``PipecatWorker``: one Pipecat pipeline per bot, run by the worker SDK.

The SDK's :class:`~workers.Worker` does discovery, leases, failover and
ordering (docs/WORKERS.md); this class plugs a pipeline factory into it
through its public handlers::

    on_bot_start  ─► a MeetstreamTransport for the bot; if the bot is already
                     ready (a takeover: its ``ready`` was handled by the previous
                     owner), the pipeline starts at once
    ready         ─► factory(transport) ─► PipelineWorker, run in its own WorkerRunner
    audio, events ─► the transport (in stream order, one at a time)
    session_ended ─► EndFrame: the pipeline finishes cleanly (bounded), then stops
    on_bot_stop   ─► released / lease_lost / expired / error: cancelled at once
                     (the bot goes on elsewhere)

A pipeline that ends by itself (an ``EndFrame`` of its own, an idle timeout)
stays ended until the bot's next ``ready``.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from pipecat.frames.frames import EndFrame
from pipecat.pipeline.worker import PipelineWorker
from pipecat.workers.runner import WorkerRunner
from prometheus_client import Counter, Gauge

from workers import AudioFrame, Bot, Event, Worker, WorkerSettings
from workers.pipecat.params import MeetstreamParams
from workers.pipecat.transport import MeetstreamTransport, TransportStats

log = logging.getLogger(__name__)

PipelineFactory = Callable[[MeetstreamTransport], Awaitable[PipelineWorker] | PipelineWorker]


@dataclass
class _Session:
    transport: MeetstreamTransport
    pipeline: PipelineWorker | None = None
    runner_task: asyncio.Task[None] | None = None
    started_at: float = 0.0
    ended: bool = False


class PipecatMetrics:
    """The Pipecat worker's series, in the SDK worker's registry (``worker.metrics.registry``)."""

    def __init__(self, worker: Worker) -> None:
        r, g = worker.metrics.registry, worker.settings.group

        def counter(name: str, doc: str, *labels: str) -> Counter:
            return Counter(f"meetstream_pipecat_{name}", doc, ["group", *labels], registry=r)

        self.running = Gauge(
            "meetstream_pipecat_pipelines_running", "Pipelines running", ["group"], registry=r
        )
        self.running_g = self.running.labels(g)
        started = counter("pipelines_started_total", "Pipelines started")
        self.started = started.labels(g)
        stopped = counter("pipelines_stopped_total", "Pipelines stopped, by how", "how")
        self.stopped = {h: stopped.labels(g, h) for h in ("ended", "cancelled", "finished_early", "failed")}
        self.frames_in = counter("audio_in_frames_total", "Bot audio frames fed to transports").labels(g)
        dropped = counter("audio_in_dropped_total", "Bot audio frames not passed on, by why", "reason")
        self.dropped = {r_: dropped.labels(g, r_) for r_ in ("not_started", "unattributed")}
        self.backpressure = counter(
            "audio_in_backpressure_waits_total", "Times a pipeline's input queue was full"
        ).labels(g)
        self.out_seconds = counter("audio_out_seconds_total", "Audio written as sendaudio").labels(g)
        self.out_dropped = counter(
            "audio_out_dropped_seconds_total", "Output audio dropped (over its bound, or cut by an interrupt)"
        ).labels(g)
        self.interrupts = counter("interrupts_total", "interrupt commands written (barge-in)").labels(g)
        self.rejected = counter("commands_rejected_total", "Our commands the gateway rejected").labels(g)
        self.commands_dropped = counter(
            "commands_dropped_total", "Chat and image commands dropped over max_pending_commands"
        ).labels(g)

    def add(self, before: TransportStats, after: TransportStats) -> None:
        """Move a transport's counts since ``before`` into the series."""
        self.frames_in.inc(after.frames_in - before.frames_in)
        self.dropped["not_started"].inc(after.dropped_not_started - before.dropped_not_started)
        self.dropped["unattributed"].inc(after.dropped_unattributed - before.dropped_unattributed)
        self.backpressure.inc(after.input_backpressure_waits - before.input_backpressure_waits)
        self.out_seconds.inc((after.audio_out_ms - before.audio_out_ms) / 1000)
        self.out_dropped.inc((after.audio_out_dropped_ms - before.audio_out_dropped_ms) / 1000)
        self.interrupts.inc(after.interrupts_sent - before.interrupts_sent)
        self.rejected.inc(after.commands_rejected - before.commands_rejected)
        self.commands_dropped.inc(after.commands_dropped - before.commands_dropped)


class PipecatWorker:
    """Run ``factory(transport)``'s pipeline for every bot this worker instance owns.

    ``factory`` builds the pipeline around ``transport.input()`` and
    ``transport.output()`` and returns its ``PipelineWorker`` (sync or async).
    Everything else is the SDK's :class:`~workers.WorkerSettings`: run as many
    instances of one group as you like, each bot's pipeline runs in exactly one.
    """

    def __init__(
        self,
        factory: PipelineFactory,
        settings: WorkerSettings | None = None,
        params: MeetstreamParams | Callable[[Bot], MeetstreamParams] | None = None,
        *,
        worker: Worker | None = None,
        handle_signals: bool = True,
        end_timeout_s: float = 5.0,
        start_timeout_s: float = 10.0,
    ) -> None:
        if worker is not None and settings is not None:
            raise ValueError("give settings or a Worker, not both")
        self.worker = worker or Worker(settings or WorkerSettings.from_env(), handle_signals=handle_signals)
        self.factory = factory
        self.params = params
        self.end_timeout_s = end_timeout_s
        self.start_timeout_s = start_timeout_s
        self.metrics = PipecatMetrics(self.worker)
        self.sessions: dict[str, _Session] = {}
        self._counted: dict[str, TransportStats] = {}
        if self.worker.settings.bot_name is None:
            log.warning(
                "no bot_name set (MEETSTREAM_BOT_NAME): the bot's own voice is left out only if its "
                "ready handshake names it; otherwise the pipeline hears the bot and may interrupt itself"
            )
        w = self.worker
        w.on_bot_start(self._bot_start)
        w.on_bot_stop(self._bot_stop)
        w.on_ready(self._ready)
        w.on_session_ended(self._session_ended)
        w.on_audio(self._audio)
        w.on("playback_started", "playback_finished", "playback_interrupted", "command_rejected", "message")(
            self._event
        )

    # -- running -------------------------------------------------------------------

    async def run(self) -> None:
        """Work until SIGTERM/SIGINT (the SDK's signal handling), then hand every bot back."""
        await self.worker.run()

    async def start(self) -> None:
        await self.worker.start()

    async def stop(self) -> None:
        """Stop the SDK worker (which stops every pipeline through ``on_bot_stop``). Idempotent."""
        await self.worker.stop()

    # -- the SDK's handlers ------------------------------------------------------------

    async def _bot_start(self, bot: Bot) -> None:
        params = self.params(bot) if callable(self.params) else (self.params or MeetstreamParams())
        session = _Session(MeetstreamTransport(bot, params, name=f"meetstream-{bot.bot_id}"))
        self.sessions[bot.bot_id] = session
        self._counted[bot.bot_id] = TransportStats()
        if bot.ready:
            # Taken over (or found) while ready: the ``ready`` was another owner's to handle,
            # and the SDK read the bot's state back before this handler.
            await self._start_pipeline(bot, session)

    async def _ready(self, bot: Bot, event: Event) -> None:
        session = self.sessions.get(bot.bot_id)
        if session is not None and not self._running(session):
            await self._start_pipeline(bot, session)

    async def _audio(self, bot: Bot, frame: AudioFrame) -> None:
        session = self.sessions.get(bot.bot_id)
        if session is not None:
            await session.transport.feed_audio(frame)
            self._count(bot.bot_id, session)

    async def _event(self, bot: Bot, event: Event) -> None:
        session = self.sessions.get(bot.bot_id)
        if session is not None:
            await session.transport.feed_event(event)

    async def _session_ended(self, bot: Bot, event: Event) -> None:
        session = self.sessions.get(bot.bot_id)
        if session is None:
            return
        await session.transport.feed_session_ended()
        await self._end_pipeline(bot, session, how="ended")

    async def _bot_stop(self, bot: Bot, reason: str) -> None:
        session = self.sessions.pop(bot.bot_id, None)
        if session is None:
            return
        # The bot goes on with another instance (or is gone): nothing to finish here.
        await self._end_pipeline(bot, session, how="cancelled")
        self._count(bot.bot_id, session)
        self._counted.pop(bot.bot_id, None)
        log.info("pipeline stopped", extra={"bot_id": bot.bot_id, "reason": reason})

    # -- pipelines ---------------------------------------------------------------------

    @staticmethod
    def _running(session: _Session) -> bool:
        return session.runner_task is not None and not session.runner_task.done()

    async def _start_pipeline(self, bot: Bot, session: _Session) -> None:
        result = self.factory(session.transport)
        pipeline = await result if inspect.isawaitable(result) else result
        if not isinstance(pipeline, PipelineWorker):
            raise TypeError(f"the pipeline factory returned {type(pipeline).__name__}, not a PipelineWorker")
        started = asyncio.Event()

        @pipeline.event_handler("on_pipeline_started")
        async def _started(_worker: PipelineWorker, _frame: Any) -> None:
            started.set()

        runner = WorkerRunner(handle_sigint=False, handle_sigterm=False)
        await runner.add_workers(pipeline)
        session.pipeline, session.ended = pipeline, False
        session.started_at = time.monotonic()
        session.runner_task = asyncio.create_task(
            self._run(bot.bot_id, runner, session), name=f"pipecat-{bot.bot_id}"
        )
        self.metrics.started.inc()
        self.metrics.running_g.inc()
        # Wait (bounded) for the StartFrame to go through: the SDK hands us the bot's next
        # entries only after this handler returns, so no audio arrives before the input runs.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(started.wait(), self.start_timeout_s)
        log.info(
            "pipeline started",
            extra={"bot_id": bot.bot_id, "taken_over": bot.taken_over, "started": started.is_set()},
        )

    async def _run(self, bot_id: str, runner: WorkerRunner, session: _Session) -> None:
        try:
            await runner.run()
            if not session.ended:
                self.metrics.stopped["finished_early"].inc()
                log.warning("pipeline finished while its bot is in the meeting", extra={"bot_id": bot_id})
        except Exception:
            self.metrics.stopped["failed"].inc()
            log.exception("pipeline failed", extra={"bot_id": bot_id})
        finally:
            self.metrics.running_g.dec()

    async def _end_pipeline(self, bot: Bot, session: _Session, how: str) -> None:
        task, pipeline = session.runner_task, session.pipeline
        if task is None or pipeline is None or task.done():
            return
        session.ended = True
        if how == "ended":
            # A clean end: what is queued is processed, processors close their services.
            await pipeline.queue_frame(EndFrame())
            done, _ = await asyncio.wait({task}, timeout=self.end_timeout_s)
            if done:
                self.metrics.stopped["ended"].inc()
                return
            log.warning("pipeline did not end in time; cancelling it", extra={"bot_id": bot.bot_id})
        await pipeline.cancel(reason=how)
        done, _ = await asyncio.wait({task}, timeout=self.end_timeout_s)
        if not done:
            task.cancel()
            await asyncio.wait({task}, timeout=1.0)
        self.metrics.stopped["cancelled"].inc()

    def _count(self, bot_id: str, session: _Session) -> None:
        before = self._counted.get(bot_id)
        if before is None:
            return
        now = session.transport.stats
        self.metrics.add(before, now)
        self._counted[bot_id] = TransportStats(**{k: v for k, v in vars(now).items() if k != "speakers"})
