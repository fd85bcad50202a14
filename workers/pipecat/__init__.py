"""Pipecat on meetings: run any Pipecat pipeline as a Meetstream worker.

::

    from workers import WorkerSettings
    from workers.pipecat import MeetstreamParams, MeetstreamTransport, PipecatWorker

    def pipeline(transport: MeetstreamTransport) -> PipelineWorker:
        return PipelineWorker(Pipeline([transport.input(), stt, ..., tts, transport.output()]))

    asyncio.run(PipecatWorker(pipeline, WorkerSettings.from_env(group="agent")).run())

Needs the ``pipecat`` extra (``pip install 'meetstream-gateway[pipecat]'``).
See ``docs/WORKERS.md`` ("Pipecat").
"""

from workers.pipecat.params import MeetstreamParams
from workers.pipecat.playback import PlaybackTracker
from workers.pipecat.runner import PipecatMetrics, PipecatWorker, PipelineFactory
from workers.pipecat.speakers import POLICIES, Block, SpeakerMixer, SpeakerPolicy
from workers.pipecat.transport import (
    ChatMessage,
    MeetstreamInputTransport,
    MeetstreamOutputTransport,
    MeetstreamTransport,
    TransportStats,
)

__all__ = [
    "POLICIES",
    "Block",
    "ChatMessage",
    "MeetstreamInputTransport",
    "MeetstreamOutputTransport",
    "MeetstreamParams",
    "MeetstreamTransport",
    "PipecatMetrics",
    "PipecatWorker",
    "PipelineFactory",
    "PlaybackTracker",
    "SpeakerMixer",
    "SpeakerPolicy",
    "TransportStats",
]
