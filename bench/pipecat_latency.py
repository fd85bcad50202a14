"""What the Pipecat transport costs: latency in and out, CPU per bot.

    .venv/bin/python -m bench.pipecat_latency --bots 50 --seconds 20 [--pipeline probe|parrot]

An embedded redis-server, the gateway as its own process, a ``PipecatWorker`` as
its own process (so its CPU is its own), and N simulated bots here, each with one
speaker streaming 20 ms frames in real time. Everything on 127.0.0.1; every process
is stopped at the end, every loop is bounded by ``--seconds``.

* **in**: a frame's ``time.time()`` when the bot sent it, when the SDK handed it to
  the worker (its first ``on_audio`` handler) and when the pipeline's first
  processor after ``transport.input()`` got it. The *transport's* part is SDK → pipeline.
* **out**: every 2 s per bot the probe pushes 300 ms of ``TTSAudioRawFrame``; from the
  push to the bot receiving the first ``sendaudio`` chunk of it (the rest is paced
  by the gateway on purpose).
* **CPU**: the worker process's user+system seconds over the steady window, per bot.

``--pipeline parrot`` runs the parrot example (Silero VAD) instead of the probe, for
the CPU of a real pipeline (latency is then not sampled).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import psutil

from gateway.embedded_redis import RedisServer
from gateway.protocol import AudioFrame as BotFrame
from gateway.testing.bot import SimulatedBot, tone
from gateway.testing.process import GatewayProcess

FRAME_MS = 20
SAMPLES = 48_000 * FRAME_MS // 1000


# -- the worker process ---------------------------------------------------------------


def run_worker(ns: argparse.Namespace) -> int:
    """``--worker``: the PipecatWorker under test; writes its samples to ``--out`` on SIGTERM."""
    from pipecat.frames.frames import (
        Frame,
        StartFrame,
        TTSAudioRawFrame,
        TTSStartedFrame,
        TTSStoppedFrame,
        UserAudioRawFrame,
    )
    from pipecat.pipeline.pipeline import Pipeline
    from pipecat.pipeline.worker import PipelineParams, PipelineWorker
    from pipecat.processors.frame_processor import FrameDirection, FrameProcessor

    from workers import AudioFrame, Bot, Worker, WorkerSettings
    from workers.pipecat import MeetstreamTransport, PipecatWorker
    from workers.pipecat.examples import parrot

    parrot.quiet_pipecat("ERROR")
    sdk_at: dict[tuple[str, int], float] = {}
    rows_in: list[tuple[str, int, float, float]] = []  # bot, seq, sdk, pipeline
    rows_out: list[tuple[str, float]] = []  # bot, push time

    class Probe(FrameProcessor):
        def __init__(self, bot_id: str) -> None:
            super().__init__()
            self.bot_id = bot_id
            self.task: asyncio.Task[None] | None = None

        async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
            await super().process_frame(frame, direction)
            if isinstance(frame, UserAudioRawFrame) and "meetstream_seq" in frame.metadata:
                now = time.time()
                seq = frame.metadata["meetstream_seq"]
                at = sdk_at.pop((self.bot_id, seq), None)
                if at is not None and len(rows_in) < 2_000_000:
                    rows_in.append((self.bot_id, seq, at, now))
            elif isinstance(frame, StartFrame) and self.task is None:
                self.task = self.create_task(self._speak())
            await self.push_frame(frame, direction)

        async def _speak(self) -> None:
            await asyncio.sleep(random.uniform(0.5, 2.0))
            pcm = tone(300, 16_000 * 3 // 10)  # 300 ms at 16 kHz
            while True:
                rows_out.append((self.bot_id, time.time()))
                await self.push_frame(TTSStartedFrame())
                for i in range(0, len(pcm), 640):
                    await self.push_frame(TTSAudioRawFrame(pcm[i : i + 640], 16_000, 1))
                await self.push_frame(TTSStoppedFrame())
                await asyncio.sleep(2.0)

    def probe_pipeline(transport: MeetstreamTransport) -> PipelineWorker:
        return PipelineWorker(
            Pipeline([transport.input(), Probe(transport.bot_id), transport.output()]),
            params=PipelineParams(audio_in_sample_rate=16_000, audio_out_sample_rate=16_000),
            idle_timeout_secs=None,
            enable_rtvi=False,
        )

    settings = WorkerSettings(redis_url=ns.redis_url, group="bench", bot_name="Agent", max_bots=10_000)
    worker = Worker(settings)

    @worker.on_audio
    async def first(bot: Bot, frame: AudioFrame) -> None:  # registered first: runs first
        sdk_at[(bot.bot_id, frame.seq)] = time.time()

    stats: dict[str, float] = {}

    @worker.on_bot_stop
    async def tally(bot: Bot, reason: str) -> None:
        session = agent.sessions.get(bot.bot_id)
        if session is not None:
            for k, v in vars(session.transport.stats).items():
                if isinstance(v, int | float):
                    stats[k] = stats.get(k, 0) + v

    factory = parrot.build_pipeline if ns.pipeline == "parrot" else probe_pipeline
    agent = PipecatWorker(factory, worker=worker)
    print("worker ready", flush=True)
    try:
        asyncio.run(agent.run())
    finally:
        Path(ns.out).write_text(json.dumps({"in": rows_in, "out": rows_out, "stats": stats}))
    return 0


# -- the bench -------------------------------------------------------------------------


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


async def drive(
    url: str, bots: int, seconds: float
) -> tuple[dict[tuple[str, int], float], dict[str, list[float]]]:
    """N bots stream one speaker each in real time; returns send times and audio arrivals."""
    sent: dict[tuple[str, int], float] = {}
    arrivals: dict[str, list[float]] = {}
    sims: list[SimulatedBot] = []
    for i in range(bots):
        bot_id = f"bench_{i}"
        arrivals[bot_id] = []

        def on_command(item: Any, bot_id: str = bot_id) -> None:
            if item.command.get("command") == "sendaudio":
                arrivals[bot_id].append(time.time())

        sim = SimulatedBot(url, bot_id, record_sent=False, on_command=on_command)
        sim.playback.keep_samples = False
        await sim.connect()
        sims.append(sim)
    pcm = tone(220, SAMPLES)
    n_frames = int(seconds * 1000 / FRAME_MS)
    start = time.monotonic()

    async def stream(k: int, sim: SimulatedBot) -> None:
        await asyncio.sleep(k * FRAME_MS / 1000 / max(1, bots))  # spread the bots over a frame
        t0 = time.monotonic()
        for seq in range(n_frames):
            sent[(sim.bot_id, seq)] = time.time()
            await sim.send_frame(BotFrame("spk-1", "Ada", pcm))
            delay = t0 + (seq + 1) * FRAME_MS / 1000 - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)

    await asyncio.gather(*(stream(k, s) for k, s in enumerate(sims)))
    print(f"streamed {n_frames} frames x {bots} bots in {time.monotonic() - start:.1f} s", flush=True)
    await asyncio.sleep(1.0)
    for sim in sims:
        await sim.close()
    return sent, arrivals


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bots", type=int, default=50)
    p.add_argument("--seconds", type=float, default=20.0)
    p.add_argument("--pipeline", choices=("probe", "parrot"), default="probe")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--redis-url", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    ns = p.parse_args(argv)
    if ns.worker:
        return run_worker(ns)
    if not 1 <= ns.bots <= 500 or not 2 <= ns.seconds <= 300:
        p.error("--bots 1..500, --seconds 2..300")

    redis = RedisServer().start()
    tmp = Path(tempfile.mkdtemp(prefix="pipecat-bench-"))
    out = tmp / "samples.json"
    gw = GatewayProcess(redis.url).start()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEETSTREAM_")}
    window = [0.0, 0.0]  # time.time() of the steady window
    worker = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "bench.pipecat_latency",
            "--worker",
            "--redis-url",
            redis.url,
            "--out",
            str(out),
            "--pipeline",
            ns.pipeline,
        ],
        stdout=subprocess.PIPE,
        stderr=open(tmp / "worker.log", "wb"),  # noqa: SIM115
        env=env,
    )
    try:
        assert worker.stdout is not None
        worker.stdout.readline()
        proc = psutil.Process(worker.pid)
        gw_proc = psutil.Process(gw.proc.pid)  # type: ignore[union-attr]

        async def session() -> tuple[Any, Any, dict[str, float]]:
            task = asyncio.create_task(drive(gw.url, ns.bots, ns.seconds))
            await asyncio.sleep(min(5.0, ns.seconds / 3))  # pipelines start, steady state
            c0, g0, t0 = proc.cpu_times(), gw_proc.cpu_times(), time.monotonic()
            window[0] = time.time()
            await asyncio.sleep(ns.seconds - min(5.0, ns.seconds / 3) - 1.0)
            c1, g1, t1 = proc.cpu_times(), gw_proc.cpu_times(), time.monotonic()
            window[1] = time.time()
            cpu = {
                "worker_cpu_s": (c1.user + c1.system) - (c0.user + c0.system),
                "gateway_cpu_s": (g1.user + g1.system) - (g0.user + g0.system),
                "window_s": t1 - t0,
                "worker_rss_mb": proc.memory_info().rss / 2**20,
            }
            sent, arrivals = await task
            return sent, arrivals, cpu

        sent, arrivals, cpu = asyncio.run(session())
    finally:
        worker.send_signal(signal.SIGTERM)
        try:
            worker.wait(60)
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait()
        gw.stop()
        redis.stop()

    samples = json.loads(out.read_text()) if out.exists() else {"in": [], "out": []}
    total, transport = [], []
    for bot_id, seq, sdk, pipe in samples["in"]:
        t_sent = sent.get((bot_id, seq))
        if t_sent is None or not window[0] <= t_sent <= window[1]:
            continue  # start-up backlog and the end are not the steady state
        total.append((pipe - t_sent) * 1000)
        transport.append((pipe - sdk) * 1000)
    first_chunk = []
    by_bot: dict[str, list[float]] = {}
    for bot_id, pushed in samples["out"]:
        by_bot.setdefault(bot_id, []).append(pushed)
    for bot_id, pushes in by_bot.items():
        got = arrivals.get(bot_id, [])
        for pushed in pushes:
            if not window[0] <= pushed <= window[1]:
                continue
            after = [a for a in got if a >= pushed]
            if after and after[0] - pushed < 1.5:
                first_chunk.append((after[0] - pushed) * 1000)
    per_bot = cpu["worker_cpu_s"] / cpu["window_s"] / ns.bots * 100
    report = {
        "bots": ns.bots,
        "seconds": ns.seconds,
        "pipeline": ns.pipeline,
        "frames_in_sampled": len(total),
        "in_bot_to_pipeline_ms": {"p50": pct(total, 50), "p99": pct(total, 99)},
        "in_transport_sdk_to_pipeline_ms": {"p50": pct(transport, 50), "p99": pct(transport, 99)},
        "utterances_out_sampled": len(first_chunk),
        "out_pipeline_to_bot_first_chunk_ms": {"p50": pct(first_chunk, 50), "p99": pct(first_chunk, 99)},
        "worker_cpu_percent_of_a_core": cpu["worker_cpu_s"] / cpu["window_s"] * 100,
        "worker_cpu_percent_per_bot": per_bot,
        "gateway_cpu_percent_of_a_core": cpu["gateway_cpu_s"] / cpu["window_s"] * 100,
        "worker_rss_mb": cpu["worker_rss_mb"],
        "cpus": os.cpu_count(),
        "transport_stats": samples.get("stats", {}),
    }
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
