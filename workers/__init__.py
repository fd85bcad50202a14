"""The worker SDK: react to Meetstream meetings through Redis, scaled out by groups.

::

    from workers import Worker, WorkerSettings

    worker = Worker(WorkerSettings.from_env(group="greeter"))

    @worker.on_ready
    async def greet(bot, event):
        await bot.chat("Hello!")

    asyncio.run(worker.run())

See ``docs/WORKERS.md``.
"""

from workers.audio import AudioFrame, Resampler, VoiceDetector, resample
from workers.bot import Bot, Event, LeaseLost
from workers.constants import NO_SPEAKER, STOP_REASONS
from workers.settings import WorkerSettings
from workers.stats import WorkerStats
from workers.worker import Worker

__all__ = [
    "NO_SPEAKER",
    "STOP_REASONS",
    "AudioFrame",
    "Bot",
    "Event",
    "LeaseLost",
    "Resampler",
    "VoiceDetector",
    "Worker",
    "WorkerSettings",
    "WorkerStats",
    "resample",
]
