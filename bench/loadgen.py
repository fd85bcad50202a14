"""Many simulated bots per process, offering a load it can show it offered.

A bot is the vendor's two channels, opened with the ``websockets`` client (no compression, as
the gateway's own simulated bot does): the control channel sends the ``ready`` handshake and
times every command it receives; the audio channel sends the JSON handshake, then binary audio
frames (``AudioFrame.serialize()``).

So that the generator is not the bottleneck, each audio connection builds its frame once as a
complete, masked WebSocket frame and writes it straight to the transport; per frame only the 12
stamped bytes at the start of the PCM (send time in ``time.time_ns()``, a per-bot frame counter)
are masked again. The connection's protocol object still runs underneath (it answers the
server's pings and sees its close frame). Frames are written between whole frames only: the
event loop is single-threaded and ``transport.write`` is ordered.

Real time: the bots of a process are split into groups spread over the frame interval (one
group every ~5 ms), each group sent on its own schedule; *lateness* is how far the end of a
group's writes was behind its schedule. When a server stops reading, the kernel and transport
buffers fill; past ``max_buffer_bytes`` a frame is not written and is counted as *blocked*
(a real bot would be queueing or dropping it too). Flood: every bot writes frames as fast as
the server reads them (waiting on the transport's flow control).

Every loop is bounded in count and time. :class:`LoadGen` runs this in several processes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import multiprocessing as mp
import os
import queue
import struct
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed
from websockets.utils import apply_mask

from gateway.protocol import BOT_SAMPLE_RATE, AudioFrame
from gateway.testing.bot import tone

#: Stamped over the first PCM bytes of every frame: send time (ns since the epoch), frame counter.
STAMP = struct.Struct("<QI")

#: How long a bot waits for its closing handshake before it drops the connection.
CLOSE_TIMEOUT_S = 15.0
Mode = Literal["realtime", "flood", "commands"]  # commands: bots connect, send no audio, take commands


def frame_pcm(frame_ms: int, speaker: int) -> bytes:
    """One frame of a speaker's tone (the stamp overwrites its first 12 bytes)."""
    n = BOT_SAMPLE_RATE * frame_ms // 1000
    return tone(180.0 + 90 * speaker, n)


def ws_header(length: int) -> bytes:
    """Header of a final, masked, binary client frame (RFC 6455 5.2), without the mask key."""
    if length < 126:
        return bytes((0x82, 0x80 | length))
    if length < 1 << 16:
        return bytes((0x82, 0x80 | 126)) + length.to_bytes(2, "big")
    return bytes((0x82, 0x80 | 127)) + length.to_bytes(8, "big")


class RawAudioSender:
    """Writes one speaker's audio frame on a connection, re-masking only the stamp."""

    def __init__(self, ws: ClientConnection, frame: AudioFrame) -> None:
        payload = frame.serialize()
        mask = os.urandom(4)
        header = ws_header(len(payload))
        pcm_offset = len(payload) - len(frame.pcm)
        self.template = bytearray(header + mask + apply_mask(payload, mask))
        self.stamp_at = len(header) + 4 + pcm_offset
        # Mask bytes that cover the stamp: payload byte j is XORed with mask[j % 4].
        stamp_mask = bytes(mask[(pcm_offset + i) % 4] for i in range(STAMP.size))
        self._mask_int = int.from_bytes(stamp_mask, "little")
        self.transport = ws.transport

    def send(self, t_ns: int, counter: int) -> None:
        stamp = int.from_bytes(STAMP.pack(t_ns, counter & 0xFFFFFFFF), "little") ^ self._mask_int
        self.template[self.stamp_at : self.stamp_at + STAMP.size] = stamp.to_bytes(STAMP.size, "little")
        # bytes(): the transport may keep a reference to what it could not send at once.
        self.transport.write(bytes(self.template))

    @property
    def size(self) -> int:
        return len(self.template)


def send_groups(bots: int, frame_ms: int, group_ms: float, offset: float = 0.0) -> list[tuple[float, range]]:
    """When in each frame interval each group of bots writes: (seconds in, bot indices).

    Grouped (``group_ms`` > 0), every process writes at the same instants, the
    benchmark's long-standing load; with ``group_ms`` <= 0 each bot has a slot of its
    own, as independent bots do, and ``offset`` (this process's place among the
    generator's, in [0, 1)) interleaves the processes' slots.
    """
    n = bots if group_ms <= 0 else round(frame_ms / group_ms)
    n = max(1, min(bots, n))
    shift = offset if group_ms <= 0 else 0.0
    return [((g + shift) * frame_ms / 1000 / n, range(g, bots, n)) for g in range(n)]


def read_stamp(pcm: bytes) -> tuple[int, int]:
    """(send time ns, frame counter) of a frame written by this generator."""
    return STAMP.unpack_from(pcm)


@dataclass
class LoadSpec:
    """What one generator process does."""

    url: str
    bot_ids: list[str]
    frame_ms: int = 100
    speakers: int = 1
    mode: Mode = "realtime"
    duration_s: float = 10.0
    window_start_s: float = 2.0  # measurement window, from the common start
    window_end_s: float = 10.0
    tail_s: float = 1.0  # keep reading commands after the audio ends
    connect_concurrency: int = 16
    open_timeout_s: float = 30.0
    connect_budget_s: float = 120.0
    max_buffer_bytes: int = 4 << 20
    group_ms: float = 5.0  # <= 0: a group per bot, spread evenly (as independent bots send)
    offset: float = 0.0  # this process's place among the generator's processes, in [0, 1)


@dataclass
class LoadResult:
    bots: int = 0
    connected: int = 0
    connect_failures: int = 0
    connect_errors: list[str] = field(default_factory=list)
    connect_s: float = 0.0
    frames_sent: int = 0
    frames_sent_window: int = 0
    bytes_sent: int = 0
    frames_blocked: int = 0
    frames_blocked_window: int = 0
    frames_on_closed: int = 0
    max_write_buffer_bytes: int = 0  # the most any bot held unsent in its own buffer: how far behind
    max_close_s: float = 0.0  # the slowest closing handshake (the server reads what is ahead of it first)
    lateness_ms: list[float] = field(default_factory=list)
    cmd_latency_ms: list[float] = field(default_factory=list)
    commands_received: int = 0
    bad_commands: int = 0
    closed_by_server: dict[str, dict[str, int]] = field(default_factory=dict)
    cpu_window_s: float = 0.0
    window_s: float = 0.0
    error: str = ""


@dataclass
class _Bot:
    bot_id: str
    control: ClientConnection | None = None
    audio: ClientConnection | None = None
    senders: list[RawAudioSender] = field(default_factory=list)
    reader: asyncio.Task[None] | None = None
    counter: int = 0


class _Run:
    def __init__(self, spec: LoadSpec) -> None:
        self.spec = spec
        self.res = LoadResult(bots=len(spec.bot_ids))
        self.bots = [_Bot(b) for b in spec.bot_ids]
        self.frames = [
            AudioFrame(f"spk-{i}", f"Speaker {i}", frame_pcm(spec.frame_ms, i)) for i in range(spec.speakers)
        ]

    # -- connecting ---------------------------------------------------------

    def _url(self, bot_id: str, channel: str) -> str:
        return f"{self.spec.url.rstrip('/')}/{bot_id}/{channel}"

    async def _connect_one(self, bot: _Bot, sem: asyncio.Semaphore) -> None:
        hello = json.dumps({"type": "ready", "bot_id": bot.bot_id, "message": "Ready to receive messages"})
        async with sem:
            try:
                kw: dict[str, Any] = dict(
                    compression=None,
                    max_size=None,
                    ping_interval=None,
                    open_timeout=self.spec.open_timeout_s,
                    close_timeout=2,
                )
                bot.control = await connect(self._url(bot.bot_id, "control"), **kw)
                await bot.control.send(hello)
                bot.reader = asyncio.create_task(self._read_commands(bot.control))
                bot.audio = await connect(self._url(bot.bot_id, "audio"), **kw)
                await bot.audio.send(hello)
                bot.senders = [RawAudioSender(bot.audio, f) for f in self.frames]
            except Exception as exc:
                self.res.connect_failures += 1
                if len(self.res.connect_errors) < 5:
                    self.res.connect_errors.append(repr(exc)[:200])
                bot.audio = None

    async def connect_all(self) -> None:
        started = time.monotonic()
        sem = asyncio.Semaphore(self.spec.connect_concurrency)
        async with asyncio.timeout(self.spec.connect_budget_s):
            await asyncio.gather(*(self._connect_one(b, sem) for b in self.bots))
        self.res.connected = sum(1 for b in self.bots if b.audio is not None)
        self.res.connect_s = time.monotonic() - started

    async def _read_commands(self, ws: ClientConnection) -> None:
        res = self.res
        with contextlib.suppress(ConnectionClosed):
            async for message in ws:
                now = time.time_ns()
                try:
                    sent_ns = int(json.loads(message)["message"])
                except (ValueError, KeyError, TypeError):
                    res.bad_commands += 1
                    continue
                res.commands_received += 1
                res.cmd_latency_ms.append((now - sent_ns) / 1e6)

    # -- sending ------------------------------------------------------------

    async def _measure_cpu(self, start: float) -> None:
        spec = self.spec
        await asyncio.sleep(max(0.0, start + spec.window_start_s - time.time()))
        cpu0, t0 = time.process_time(), time.time()
        await asyncio.sleep(max(0.0, start + spec.window_end_s - time.time()))
        self.res.cpu_window_s = time.process_time() - cpu0
        self.res.window_s = time.time() - t0

    async def realtime(self, start: float) -> None:
        spec, res = self.spec, self.res
        live = [b for b in self.bots if b.audio is not None]
        frame_s = spec.frame_ms / 1000
        groups = [
            (at_s, [live[i] for i in members])
            for at_s, members in send_groups(len(live), spec.frame_ms, spec.group_ms, spec.offset)
        ]
        win0, win1 = start + spec.window_start_s, start + spec.window_end_s
        n_ticks = int(spec.duration_s / frame_s)
        limit = spec.max_buffer_bytes
        per_bot = len(self.frames)
        for k in range(n_ticks):
            for at_s, group in groups:
                due = start + k * frame_s + at_s
                delay = due - time.time()
                # Always yield: command readers and pongs must run between groups.
                await asyncio.sleep(delay if delay > 0 else 0)
                t_ns = time.time_ns()
                sent = blocked = closed = 0
                for bot in group:
                    transport = bot.audio.transport  # type: ignore[union-attr]
                    held = transport.get_write_buffer_size()
                    if held > res.max_write_buffer_bytes:
                        res.max_write_buffer_bytes = held
                    if transport.is_closing():
                        closed += per_bot
                    elif held > limit:
                        blocked += per_bot
                    else:
                        for sender in bot.senders:
                            sender.send(t_ns, bot.counter)
                            bot.counter += 1
                        sent += per_bot
                res.lateness_ms.append((time.time() - due) * 1000)
                res.frames_sent += sent
                res.frames_blocked += blocked
                res.frames_on_closed += closed
                if win0 <= due < win1:
                    res.frames_sent_window += sent
                    res.frames_blocked_window += blocked
        res.bytes_sent = sum(b.counter for b in live) * (live[0].senders[0].size if live else 0)

    async def _flood_one(self, bot: _Bot, start: float) -> None:
        spec, res = self.spec, self.res
        ws = bot.audio
        assert ws is not None
        end = start + spec.duration_s
        win0, win1 = start + spec.window_start_s, start + spec.window_end_s
        senders = bot.senders
        while True:
            now = time.time()
            if now >= end or ws.transport.is_closing():
                return
            for _ in range(8):
                for sender in senders:
                    sender.send(time.time_ns(), bot.counter)
                    bot.counter += 1
            n = 8 * len(senders)
            res.frames_sent += n
            if win0 <= now < win1:
                res.frames_sent_window += n
            if ws.paused:  # type: ignore[attr-defined]
                # Wait for the server to read (the transport's flow control), bounded by the run.
                with contextlib.suppress(TimeoutError, ConnectionClosed, OSError):
                    await asyncio.wait_for(ws.drain(), max(0.001, end - now))  # type: ignore[attr-defined]
            else:
                await asyncio.sleep(0)

    async def flood(self, start: float) -> None:
        live = [b for b in self.bots if b.audio is not None]
        await asyncio.sleep(max(0.0, start - time.time()))
        await asyncio.gather(*(self._flood_one(b, start) for b in live))
        self.res.bytes_sent = sum(b.counter for b in live) * (live[0].senders[0].size if live else 0)

    # -- leaving --------------------------------------------------------------

    async def close_all(self) -> None:
        res = self.res
        codes: dict[str, Counter[str]] = {"audio": Counter(), "control": Counter()}
        for bot in self.bots:
            for channel, ws in (("audio", bot.audio), ("control", bot.control)):
                if ws is not None and ws.close_code is not None:
                    codes[channel][str(ws.close_code)] += 1
        self.res.closed_by_server = {k: dict(v) for k, v in codes.items()}
        sem = asyncio.Semaphore(64)

        async def close(bot: _Bot) -> None:
            async with sem:
                for ws in (bot.audio, bot.control):
                    if ws is not None:
                        t0 = time.monotonic()
                        # Generous: a bot that gave up early would discard what its socket still
                        # held, and a server slow to read it would show as frames lost, not as a
                        # slow close (how the gateway's backpressure starvation, fixed, first showed).
                        with contextlib.suppress(Exception):
                            await asyncio.wait_for(ws.close(1000, "bot left"), CLOSE_TIMEOUT_S)
                        res.max_close_s = max(res.max_close_s, time.monotonic() - t0)
                if bot.reader is not None:
                    bot.reader.cancel()
                    with contextlib.suppress(asyncio.CancelledError, Exception):
                        await bot.reader

        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(2 * CLOSE_TIMEOUT_S):
                await asyncio.gather(*(close(b) for b in self.bots))


async def run_spec(
    spec: LoadSpec, start_at: float | None = None, on_connected: Any = None, wait_go: Any = None
) -> LoadResult:
    """Connect, (report, wait for the go), stream, close. ``start_at``: epoch seconds."""
    run = _Run(spec)
    try:
        await run.connect_all()
        if on_connected is not None:
            on_connected(run.res.connected, run.res.connect_failures)
        if wait_go is not None:
            start_at = await asyncio.to_thread(wait_go)
        start = start_at if start_at is not None else time.time() + 0.5
        cpu = asyncio.create_task(run._measure_cpu(start))
        if spec.mode == "flood":
            await run.flood(start)
        elif spec.mode == "commands":
            await asyncio.sleep(max(0.0, start + spec.duration_s - time.time()))
        else:
            await run.realtime(start)
        await asyncio.sleep(spec.tail_s)
        cpu.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await cpu
    except Exception as exc:
        run.res.error = repr(exc)[:500]
    finally:
        await run.close_all()
    return run.res


# -- several processes ----------------------------------------------------------


def _child(spec: LoadSpec, out: Any, go: Any, start_at: Any, go_timeout_s: float) -> None:
    def connected(ok: int, failed: int) -> None:
        out.put(("connected", ok, failed))

    def wait_go() -> float:
        if not go.wait(go_timeout_s):
            raise TimeoutError("no go from the runner")
        return start_at.value

    try:
        res = asyncio.run(run_spec(spec, on_connected=connected, wait_go=wait_go))
    except BaseException as exc:  # report, never hang the runner
        res = LoadResult(bots=len(spec.bot_ids), error=repr(exc)[:500])
    out.put(("result", asdict(res)))


class LoadGen:
    """Bots spread over ``processes`` child processes, started together on one clock."""

    def __init__(self, spec: LoadSpec, processes: int) -> None:
        self.ctx = mp.get_context("spawn")
        self.out = self.ctx.Queue()
        self.go = self.ctx.Event()
        self.start_at = self.ctx.Value("d", 0.0)
        processes = max(1, min(processes, len(spec.bot_ids)))
        self.specs = [
            LoadSpec(**{**asdict(spec), "bot_ids": spec.bot_ids[i::processes], "offset": i / processes})
            for i in range(processes)
        ]
        self.procs: list[Any] = []
        self.connected = 0
        self.connect_failures = 0

    def start(self) -> LoadGen:
        go_timeout = self.specs[0].connect_budget_s + 60
        for spec in self.specs:
            p = self.ctx.Process(
                target=_child, args=(spec, self.out, self.go, self.start_at, go_timeout), daemon=True
            )
            p.start()
            self.procs.append(p)
        return self

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def wait_connected(self, timeout_s: float) -> tuple[int, int]:
        deadline = time.monotonic() + timeout_s
        seen = 0
        while seen < len(self.procs):
            try:
                kind, *rest = self.out.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                raise TimeoutError(f"{seen}/{len(self.procs)} generator processes connected") from None
            if kind == "connected":
                self.connected += rest[0]
                self.connect_failures += rest[1]
                seen += 1
            elif kind == "result":  # a child failed before connecting
                raise RuntimeError(f"generator process failed: {rest[0].get('error')}")
        return self.connected, self.connect_failures

    def go_at(self, start_at: float) -> None:
        self.start_at.value = start_at
        self.go.set()

    def results(self, timeout_s: float) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout_s
        out: list[dict[str, Any]] = []
        while len(out) < len(self.procs):
            try:
                kind, *rest = self.out.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                break
            if kind == "result":
                out.append(rest[0])
        return out

    def stop(self) -> None:
        self.go.set()  # a child still waiting for the go leaves at once
        for p in self.procs:
            p.join(5)
            if p.is_alive():
                p.terminate()
                p.join(5)
            if p.is_alive():
                p.kill()
                p.join()


def merge(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Add up the per-process results (lists are concatenated, close codes summed)."""
    total: dict[str, Any] = asdict(LoadResult())
    total["processes"] = len(results)
    total["cpu_window_s_per_process"] = []
    codes: dict[str, Counter[str]] = {"audio": Counter(), "control": Counter()}
    for r in results:
        for k, v in r.items():
            if k == "closed_by_server":
                for ch, c in v.items():
                    codes[ch].update(c)
            elif k == "window_s" or k == "connect_s":
                total[k] = max(total[k], v)
            elif k == "error":
                if v:
                    total[k] = (total[k] + "; " + v).strip("; ")
            elif isinstance(v, list):
                total[k].extend(v)
            elif k.startswith("max_"):
                total[k] = max(total[k], v)
            elif isinstance(v, int | float):
                total[k] += v
        total["cpu_window_s_per_process"].append(r.get("cpu_window_s", 0.0))
    total["closed_by_server"] = {k: dict(v) for k, v in codes.items()}
    return total
