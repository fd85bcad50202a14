"""The ordered, batched, bounded writer of everything the gateway puts in Redis.

Bot handlers never await Redis: they append to this writer's buffer, and one
task sends what has piled up as a single pipeline per round trip. That keeps a
gateway core's frame rate near what the client library allows, and keeps every
write in arrival order, so a bot's frames, its events, the XACK of a command
and the final EXPIRE of its keys land in the order they were made.

Commands are encoded here (:mod:`gateway.resp`) and written on a raw
connection per Redis node, replies parsed by hiredis: redis-py's pipeline
costs about three times the CPU per XADD, and the publisher is the hot path.

Bounded: audio is held up to ``publish_buffer_bytes``; past that the *oldest*
audio is dropped (fresh audio is worth more to a live agent than stale) and
counted as ``buffer_full``. Events, acks and expiries go in a separate count-
bounded buffer so that a flood of audio never pushes out a lifecycle event.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import json
import logging
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import hiredis
from redis.exceptions import RedisError

from gateway.command_reader import ack_args
from gateway.keys import BotKeys, KeySpace
from gateway.limits import StreamTrim
from gateway.logs import RateLimiter, error_text
from gateway.metrics import Metrics
from gateway.protocol import BOT_SAMPLE_RATE, AudioFrame
from gateway.redis_conn import REDIRECT_ERRORS, WRITE_SOCKET_TIMEOUT_S, RawConnection, RedisBackend
from gateway.resp import AudioEncoder, FrameEncoder, encode_command
from gateway.routing import Node, Router
from gateway.settings import Settings

log = logging.getLogger(__name__)

# Retry often enough that a Redis restart costs well under a second of extra
# buffering, rarely enough that a dead Redis sees at most a few attempts a second.
MAX_BACKOFF_S = 0.5

#: Event types that also go to the global lifecycle stream.
LIFECYCLE = frozenset({"connected", "ready", "audio_handshake", "disconnected", "session_ended"})
CONTROL_BUFFER_MAX = 100_000
EVENT_TRIMS_MAX = 100_000  # bots whose event streams are tracked (limits.StreamTrim)


@dataclass(slots=True)
class _Op:
    seq: int
    kind: str  # audio | event | ack | expire
    key: str  # the command's (first) key: routes it on a Cluster
    payload: list[bytes]  # RESP-encoded command
    size: int  # audio bytes (0 for the rest)
    held: int = 0  # what a control op counts against the control buffer

    def __lt__(self, other: _Op) -> bool:
        return self.seq < other.seq


@dataclass(slots=True)
class _Flight:
    """A batch on the wire, and the task that settles it."""

    batch: list[_Op]
    settled: asyncio.Future[None]  # done once accounted for; fails if the batch must be sent again
    size: int  # bytes held for Redis: audio, and what control ops count (_Op.held)
    started: float  # time.perf_counter() when written
    nodes: frozenset[Node | None] = frozenset()  # where it went (a Cluster's nodes)


def now_ms() -> int:
    return int(time.time() * 1000)


class Publisher:
    """Buffers stream writes and sends them to Redis in ordered pipelines."""

    def __init__(
        self, backend: RedisBackend, keyspace: KeySpace, settings: Settings, metrics: Metrics
    ) -> None:
        self.backend = backend
        self.keyspace = keyspace
        self.settings = settings
        self.metrics = metrics
        self._audio: deque[_Op] = deque()
        self._control: deque[_Op] = deque()
        self._audio_bytes = 0
        self._seq = 0
        self._wakeup = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self.healthy = True
        self._audio_encoder = AudioEncoder(
            settings.audio_maxlen,
            BOT_SAMPLE_RATE,
            speaker_max_bytes=settings.audio_speaker_max_bytes,
        )
        # Backpressure: past this much unsent audio, audio sockets stop being read.
        self._high_water = min(settings.publish_backpressure_bytes, settings.publish_buffer_bytes // 2)
        self.backlogged = False
        self.on_backlog: Callable[[bool], None] | None = None
        self.may_pause: Callable[[], bool] = lambda: True
        self._raw: dict[tuple[str, int] | None, RawConnection] = {}
        # A Cluster's writes wait per node when one is down, never all of them (routing).
        self._router: Router[_Op] = Router(
            backend.node_of, time.monotonic, backend.slot_map_version if backend.is_cluster else None
        )
        self._map_version = backend.slot_map_version() if backend.is_cluster else 0
        self._due_timer: asyncio.TimerHandle | None = None
        self._refresh_task: asyncio.Task[None] | None = None
        self._raw_timeout_s = WRITE_SOCKET_TIMEOUT_S
        self._inflight_bytes = 0
        self._flights: deque[_Flight] = deque()
        self._publish_latency = metrics.redis_latency.labels("publish")
        self._published_audio = metrics.published.labels("audio")
        self._published_events = metrics.published.labels("event")
        self._maxlen_events = str(settings.events_maxlen).encode()
        self._maxlen_global = str(settings.global_events_maxlen).encode()
        # Streams are capped by entries; these keep them within bytes too (limits.StreamTrim).
        self._event_trims: dict[str, StreamTrim] = {}
        self._global_trim = StreamTrim(settings.global_events_maxlen, settings.global_events_max_bytes)
        self._control_bytes = 0
        self._log_limit = RateLimiter(burst=5, interval_s=10.0, counter=metrics.log_suppressed)
        # Read at scrape time: a gauge set on every frame would cost the hot path a lock.
        metrics.publish_buffer_bytes.set_function(self.buffered_bytes)

    # -- producers (synchronous: never wait on Redis) -----------------------

    def audio(
        self, keys: BotKeys, frame: AudioFrame, seq: int, conn_id: bytes, trim: StreamTrim | None = None
    ) -> None:
        """Publish a decoded frame (a legacy PCMChunk); raises FrameError for an outsized speaker."""
        payload = self._audio_encoder.encode(
            keys.audio, frame.speaker_id, frame.speaker_name, frame.pcm, seq, conn_id, now_ms(), trim
        )
        self._queue_audio(keys.audio, payload, len(payload[0]) + len(payload[1]) + len(payload[2]))

    def frame_encoder(self, keys: BotKeys, conn_id: bytes) -> FrameEncoder:
        """What :meth:`audio_frame` needs to publish one audio connection's binary frames."""
        trim = StreamTrim(self.settings.audio_maxlen, self.settings.audio_stream_max_bytes)
        return FrameEncoder(self._audio_encoder, keys.audio, conn_id, trim)

    def audio_frame(self, encoder: FrameEncoder, data: bytes, seq: int) -> int:
        """Publish a bot's binary audio frame as it came; return its PCM bytes.

        Raises :class:`~gateway.exceptions.FrameError` for a frame that does not
        decode, before anything is queued.
        """
        payload = encoder.encode(data, seq, now_ms())
        head, pcm, tail = payload
        # Held bytes are the whole command (a long speaker name counts, not only the PCM).
        self._queue_audio(encoder.key, payload, len(head) + len(pcm) + len(tail))
        return len(pcm)

    def _queue_audio(self, key: str, payload: list[bytes], size: int) -> None:
        self._seq += 1
        self._audio.append(_Op(self._seq, "audio", key, payload, size))
        self._audio_bytes += size
        if self._audio_bytes > self._high_water and not self.backlogged and self.healthy and self.may_pause():
            self._set_backlogged(True)
        if self._audio_bytes + self._router.parked_bytes > self.settings.publish_buffer_bytes:
            self._shed_audio()
        self._wakeup.set()

    def release_backpressure(self) -> None:
        if self.backlogged:
            self._set_backlogged(False)

    def _set_backlogged(self, on: bool) -> None:
        """Ask the bot side to stop (or resume) reading audio sockets.

        Only while Redis is healthy: then a backlog means frames arrive faster than
        Redis round trips take them, and TCP should push back on the senders. While
        Redis is away, sockets keep being read (a paused socket misses its keepalive
        pongs and dies) and the buffer budget decides what is kept.
        """
        self.backlogged = on
        if on:
            self.metrics.backpressure.inc()
        if self.on_backlog is not None:
            self.on_backlog(on)

    def event(
        self,
        keys: BotKeys,
        type_: str,
        channel: str,
        data: dict[str, Any] | str | None = None,
        **extra: Any,
    ) -> None:
        """Publish an event on the bot's stream, and on the global one if it is lifecycle."""
        fields: list[Any] = [b"type", type_, b"bot_id", keys.bot_id, b"channel", channel, b"ts", now_ms()]
        text = None
        if data is not None:
            text = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
            fields += [b"data", text]
        for name, value in extra.items():
            if value is not None:
                fields += [name, value]
        # What the entry costs Redis, roughly: its text, and ~200 bytes of the rest.
        size = 200 + (len(text) if text is not None else 0)
        trim = self._event_trims.get(keys.events)
        if trim is None:
            if len(self._event_trims) >= EVENT_TRIMS_MAX:
                self._event_trims.clear()  # bounded: bots come and go (session_ended forgets)
            trim = self._event_trims[keys.events] = StreamTrim(
                self.settings.events_maxlen, self.settings.events_stream_max_bytes
            )
        maxlen = trim.note(size)
        self._control_op(
            "event",
            ("XADD", keys.events, b"MAXLEN", b"~", maxlen or self._maxlen_events, b"*", *fields),
            size,
        )
        if type_ == "session_ended":
            self._event_trims.pop(keys.events, None)
        if type_ in LIFECYCLE:
            if text is not None and len(text) > self.settings.global_event_data_max_bytes:
                # The shared stream gets no bot's bulk: the bot's own stream has it whole.
                at = fields.index(b"data")
                fields[at : at + 2] = [b"data_bytes", len(text)]
                size = 200
            self._control_op(
                "event",
                (
                    "XADD",
                    self.keyspace.global_events,
                    b"MAXLEN",
                    b"~",
                    self._global_trim.note(size) or self._maxlen_global,
                    b"*",
                    *fields,
                ),
                size,
            )

    def ack(self, stream: str, entry_ids: Iterable[str], owner: tuple[str, str] | None = None) -> None:
        """Ack command entries in order with everything else (see :func:`ack_args`)."""
        ids = tuple(entry_ids)
        if ids:
            self._control_op("ack", ack_args(stream, ids, owner))

    def expire(self, keys: Iterable[str], ttl_s: int) -> None:
        for key in keys:
            self._control_op("expire", ("EXPIRE", key, ttl_s))

    def _control_op(self, kind: str, args: tuple[Any, ...], size: int = 100) -> None:
        self._seq += 1
        key = args[3] if args[0] == "EVAL" else args[1]
        payload: list[bytes] = []
        encode_command(args, payload)
        # Held bytes are counted from the caller's estimate (the event's text): summing
        # the encoded pieces of every ack and expiry would cost more than it tells.
        self._control.append(_Op(self._seq, kind, key, payload, 0, size))
        self._control_bytes += size
        while self._control and (
            len(self._control) > CONTROL_BUFFER_MAX
            or self._control_bytes > self.settings.publish_control_buffer_bytes
        ):
            # Only when Redis has been away for long (or a flood of bot text met a
            # slow Redis): an unsent ack means a redelivery, an unsent event a gap the
            # metric shows. The oldest go first, as with audio.
            lost = self._control.popleft()
            self._control_bytes -= lost.held
            self.metrics.dropped.labels("buffer_full").inc()
            if self._log_limit.allow("control_full"):
                log.warning("control buffer full, dropped oldest", extra={"kind": lost.kind})
        self._wakeup.set()

    def _shed_audio(self) -> None:
        # What waits for a Cluster node that is down is the oldest audio: it goes first.
        over = self._audio_bytes + self._router.parked_bytes - self.settings.publish_buffer_bytes
        dropped = self._router.shed_oldest_audio(over) if over > 0 else 0
        budget = self.settings.publish_buffer_bytes - self._router.parked_bytes
        while self._audio_bytes > budget and self._audio:
            op = self._audio.popleft()
            self._audio_bytes -= op.size
            dropped += 1
        if dropped:
            self.metrics.dropped.labels("buffer_full").inc(dropped)

    @property
    def pending(self) -> int:
        return len(self._audio) + len(self._control)

    def buffered_bytes(self) -> float:
        """Audio and control bytes held for Redis, parked ones included (not those in flight)."""
        return float(self._audio_bytes + self._control_bytes + self._router.parked_bytes)

    # -- the writer task ----------------------------------------------------

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="publisher")

    @property
    def task(self) -> asyncio.Task[None] | None:
        return self._task

    def _take_batch(self) -> list[_Op]:
        limit = self.settings.publish_batch_max
        batch: list[_Op] = []
        if not self._control:
            for _ in range(min(limit, len(self._audio))):
                batch.append(self._audio.popleft())
        elif not self._audio:
            for _ in range(min(limit, len(self._control))):
                batch.append(self._control.popleft())
        else:
            # Merge the two buffers back into arrival order.
            for op in heapq.merge(self._audio, self._control):
                batch.append(op)
                if len(batch) >= limit:
                    break
            for op in batch:
                (self._audio if op.kind == "audio" else self._control).popleft()
        self._audio_bytes -= sum(op.size for op in batch)
        self._control_bytes -= sum(op.held for op in batch)
        return batch

    async def _run(self) -> None:
        """Keep up to ``publish_pipeline_depth`` batches on the wire.

        Waiting for each batch's replies before sending the next would idle both
        sides for a round trip per batch; under load a round trip includes a whole
        turn of our event loop (every ready bot socket), and the buffer would fill
        while Redis sits idle. Batches are settled in the order they were sent.
        """
        flights = self._flights
        try:
            await self._pipeline(flights)
        finally:
            for flight in flights:
                flight.settled.cancel()

    async def _pipeline(self, flights: deque[_Flight]) -> None:
        backoff_s = 0.05
        retry: list[_Op] = []  # a failed batch: sent again first, so order is kept
        loop = asyncio.get_running_loop()
        interval_s = self.settings.publish_interval_ms / 1000
        depth = self.settings.publish_pipeline_depth
        batch_max = self.settings.publish_batch_max
        last_flush = 0.0
        waited = False
        cluster = self.backend.is_cluster
        router = self._router
        while True:
            while flights and flights[0].settled.done():
                flight = flights.popleft()
                self._inflight_bytes -= flight.size
                if flight.settled.exception() is None:
                    # On a Cluster a batch settles even when a node failed it: what did
                    # not land waits for that node alone (gateway.routing).
                    self._set_health(router.healthy if cluster else True)
                    backoff_s = 0.05
                    continue
                # The head failed: let the rest settle (on one connection they fail
                # with it), then take back every batch that did not land, in order.
                # Anything but a Redis or socket error is a bug: say so loudly, but
                # keep the accepted data and stay not-ready rather than die.
                exc = flight.settled.exception()
                failed = list(flight.batch)
                if flights:
                    await asyncio.wait([f.settled for f in flights])
                while flights:
                    other = flights.popleft()
                    self._inflight_bytes -= other.size
                    if other.settled.exception() is not None:
                        failed += other.batch
                retry = sorted(failed + retry)
                self._set_health(False)
                self.metrics.redis_errors.labels("publish").inc()
                expected = isinstance(exc, RedisError | OSError | TimeoutError)
                log.log(
                    logging.WARNING if expected else logging.ERROR,
                    "redis write failed, retrying",
                    extra={"error": error_text(exc), "batch": len(retry), "backoff_s": backoff_s},
                    exc_info=None if expected else exc,
                )
                self._requeue_for_budget(retry)
                await asyncio.sleep(backoff_s)
                backoff_s = min(backoff_s * 2, MAX_BACKOFF_S)
            if self.backlogged and self._audio_bytes < self._high_water // 4:
                self._set_backlogged(False)
            room = len(flights) < depth and self._inflight_bytes < self._high_water
            if room and (retry or self.pending or (cluster and self._parked_due())):
                self._idle.clear()
                if not cluster and flights and not all(conn.connected for conn in self._raw.values()):
                    # A connection was lost under batches not settled yet: they will
                    # fail and be sent again, so nothing may overtake them on a new one.
                    await asyncio.wait([f.settled for f in flights])
                    continue
                if retry:
                    batch, retry = retry, []
                else:
                    # Let a few frames pile up between writes: each costs a syscall and
                    # a wake-up whether it carries 2 frames or 200. Wait once per batch:
                    # uvloop's clock ticks in whole milliseconds, so waiting until it
                    # shows the interval over would spin through zero-delay timers.
                    wait_s = last_flush + interval_s - loop.time()
                    if wait_s > 0 and not waited and not self._closing and len(self._audio) < batch_max:
                        waited = True
                        await asyncio.sleep(wait_s)
                        continue  # flights may have settled meanwhile
                    if cluster and flights and self.backend.slot_map_version() != self._map_version:
                        # The slot map changed: let what is in flight settle (what fails is
                        # parked, then filed under its key's new node) before anything newer
                        # is routed, so that nothing overtakes an older write for its key.
                        await asyncio.wait([f.settled for f in flights])
                        continue
                    self._map_version = self.backend.slot_map_version() if cluster else 0
                    waited = False
                    last_flush = loop.time()
                    batch = self._take_batch()
                try:
                    launched = await self._launch(batch)
                except Exception as exc:  # could not even connect: the batch is retried
                    failed_task: asyncio.Future[None] = loop.create_future()
                    failed_task.set_exception(exc)
                    flights.append(_Flight(batch, failed_task, 0, time.perf_counter()))
                    continue
                if launched is not None:
                    flights.append(launched)
                    self._inflight_bytes += launched.size
                    continue
                # Everything went to a node that is down: wait for a wake-up (new data,
                # a settled batch, the node's backoff over, or a new slot map).
            if not flights and not retry and not self.pending and not router.parked:
                self._idle.set()
                if self._closing:
                    return
            # Wait for new data or a settled batch (both set the wake-up).
            self._wakeup.clear()
            await self._wakeup.wait()

    async def _launch(self, batch: list[_Op]) -> _Flight | None:
        """Write a batch now (one pipeline per node on a Cluster); settle it later.

        Connections are opened first, so that the writes themselves happen without
        a pause and batches reach each node in the order they were taken. None when
        nothing could be sent (a Cluster whose nodes for this batch are down).
        """
        if self.backend.is_cluster:
            return await self._launch_cluster(batch)
        conn = self._raw.get(None)
        if conn is None:
            conn = self._raw[None] = self.backend.raw_connection()
        await conn.connect()
        payload = b"".join([piece for op in batch for piece in op.payload])
        try:
            future = conn.submit(payload, len(batch))
        except Exception as exc:
            future = asyncio.get_running_loop().create_future()
            future.set_exception(exc)
        # In flight counts every byte held for Redis, audio and the rest: a flood of bot
        # text must meet the same bound on the wire as audio does.
        size = sum(op.size + op.held for op in batch)
        # One Redis: settle in the reply's own callback, with no task or gather per
        # batch (at light load those were most of a batch's cost). A stalled Redis
        # is caught by check_stalled(), run from the health loop.
        flight = _Flight(batch, asyncio.get_running_loop().create_future(), size, time.perf_counter())
        future.add_done_callback(lambda f: self._settle_one(flight, batch, f))
        return flight

    async def _launch_cluster(self, batch: list[_Op]) -> _Flight | None:
        """Group by node what is due; a node that cannot be reached keeps its ops parked."""
        groups = self._router.route(batch, self._blocked)
        submitted: list[tuple[Node, list[_Op], asyncio.Future[list[Any]]]] = []
        for node, ops in groups.items():
            conn = self._raw.get(node)
            if conn is None:
                conn = self._raw[node] = self.backend.raw_connection(*node)
            try:
                await conn.connect()
                payload = b"".join([piece for op in ops for piece in op.payload])
                submitted.append((node, ops, conn.submit(payload, len(ops))))
            except Exception as exc:
                self._node_failed(node, ops, exc)
        self._arm_due_timer()
        if not submitted:
            self._set_health(self._router.healthy)
            return None
        sent = [op for _, ops, _ in submitted for op in ops]
        size = sum(op.size + op.held for op in sent)
        task = asyncio.ensure_future(self._settle(submitted))
        task.add_done_callback(lambda _: self._wakeup.set())
        return _Flight(sent, task, size, time.perf_counter(), frozenset(n for n, _, _ in submitted))

    def _blocked(self, node: Node) -> bool:
        """A node whose connection was lost under batches not settled yet: they will be
        parked when they fail, and nothing newer for that node may overtake them."""
        conn = self._raw.get(node)
        if conn is None or conn.connected:
            return False
        return any(node in f.nodes and not f.settled.done() for f in self._flights)

    def _parked_due(self) -> bool:
        due = self._router.next_due()
        return due is not None and due <= time.monotonic()

    def _arm_due_timer(self) -> None:
        """Wake the writer when parked ops may be tried again."""
        due = self._router.next_due()
        if self._due_timer is not None:
            self._due_timer.cancel()
            self._due_timer = None
        if due is not None:
            delay = max(0.0, due - time.monotonic())
            self._due_timer = asyncio.get_running_loop().call_later(delay, self._wakeup.set)

    def _node_failed(self, node: Node, ops: list[_Op], exc: BaseException) -> None:
        """A node did not take a write: its ops wait (in order) and the slot map is
        refreshed, since a dead primary never says that its slots moved."""
        self._router.failed(node, ops)
        self.metrics.redis_errors.labels("publish").inc()
        if self._log_limit.allow(f"node:{node}"):
            log.warning(
                "redis node did not take a write, its writes wait",
                extra={"node": f"{node[0]}:{node[1]}", "error": error_text(exc), "parked": len(self._router)},
            )
        if self._audio_bytes + self._router.parked_bytes > self.settings.publish_buffer_bytes:
            self._shed_audio()
        self._request_refresh()

    def _request_refresh(self) -> None:
        if self._refresh_task is None or self._refresh_task.done():
            self._refresh_task = asyncio.create_task(self._refresh_slots(), name="slot-map-refresh")

    async def _refresh_slots(self) -> None:
        try:
            primaries = await self.backend.refresh_slots()
        except Exception as exc:  # the next failure asks again
            if self._log_limit.allow("slot-refresh"):
                log.warning("could not refresh the cluster's slot map", extra={"error": error_text(exc)})
            return
        if primaries is not None:
            self._router.slots_changed(primaries)
            for node in [n for n in self._raw if n is not None and n not in primaries]:
                # A node that serves nothing now; never under a batch in flight, whose
                # writes may have landed (failing them would write them twice).
                if not any(node in f.nodes and not f.settled.done() for f in self._flights):
                    self._raw.pop(node).close()
            self._arm_due_timer()
            self._wakeup.set()

    def _settle_one(self, flight: _Flight, ops: list[_Op], replies: asyncio.Future[list[Any]]) -> None:
        done = flight.settled
        if not done.done():
            if replies.cancelled():
                done.set_exception(RedisError("write cancelled"))
            elif (exc := replies.exception()) is not None:
                done.set_exception(exc)
            else:
                self._account(ops, replies.result())
                self._publish_latency.observe(time.perf_counter() - flight.started)
                done.set_result(None)
        self._wakeup.set()

    def check_stalled(self) -> bool:
        """Give up on a batch Redis has not answered within the write timeout: its
        connection is closed, so that it and everything after it is sent again."""
        if self._flights and time.perf_counter() - self._flights[0].started > self._raw_timeout_s:
            log.warning(
                "redis did not answer a write in time, reconnecting", extra={"timeout_s": self._raw_timeout_s}
            )
            for conn in self._raw.values():
                conn.close()
            return True
        return False

    async def _settle(self, submitted: list[tuple[Node, list[_Op], asyncio.Future[list[Any]]]]) -> None:
        """A Cluster batch: account for what landed; what a node did not take (an error,
        a timeout, a redirect) waits for that node alone (gateway.routing)."""
        started = time.perf_counter()
        try:
            async with asyncio.timeout(self._raw_timeout_s):
                results = await asyncio.gather(*(f for _, _, f in submitted), return_exceptions=True)
        except TimeoutError:
            results = []
            for node, _, future in submitted:
                if not future.done():
                    if (conn := self._raw.get(node)) is not None:
                        conn.close()  # unknown state: everything on it failed
                    results.append(TimeoutError(f"no reply from {node[0]}:{node[1]}"))
                else:
                    results.append(future.exception() or future.result())
        ok = True
        for (node, ops, _), result in zip(submitted, results, strict=True):
            if isinstance(result, BaseException):
                ok = False
                self._node_failed(node, ops, result)
                continue
            landed: list[_Op] = []
            replies: list[Any] = []
            redirected: list[_Op] = []
            for op, reply in zip(ops, result, strict=True):
                if isinstance(reply, hiredis.ReplyError) and str(reply).startswith(REDIRECT_ERRORS):
                    redirected.append(op)
                else:
                    landed.append(op)
                    replies.append(reply)
            self._account(landed, replies)
            if redirected:
                # The slot map changed (resharding, failover): refresh it; these wait.
                ok = False
                self._node_failed(node, redirected, RedisError(f"{len(redirected)} writes redirected"))
            else:
                self._router.succeeded(node)
        self._arm_due_timer()
        if ok:
            self._publish_latency.observe(time.perf_counter() - started)

    def _requeue_for_budget(self, batch: list[_Op]) -> None:
        """While we retry, audio keeps arriving: keep the whole backlog in budget."""
        held = sum(op.size for op in batch)
        self._audio_bytes += held
        if self._audio_bytes > self.settings.publish_buffer_bytes:
            self._shed_audio()
            # Still over: the batch itself holds the oldest audio.
            while self._audio_bytes > self.settings.publish_buffer_bytes:
                oldest = next((op for op in batch if op.kind == "audio"), None)
                if oldest is None:
                    break
                batch.remove(oldest)
                self._audio_bytes -= oldest.size
                self.metrics.dropped.labels("buffer_full").inc()
        self._audio_bytes -= sum(op.size for op in batch)

    def _account(self, ops: list[_Op], replies: list[Any]) -> None:
        audio = events = audio_bytes = 0
        for op, reply in zip(ops, replies, strict=True):
            if isinstance(reply, hiredis.ReplyError):
                # A command Redis refused (WRONGTYPE, OOM...): retrying will not help.
                self.metrics.redis_errors.labels("publish").inc()
                if op.kind == "audio":
                    self.metrics.dropped.labels("redis_error").inc()
                log.error(
                    "redis refused a write", extra={"kind": op.kind, "key": op.key, "error": str(reply)}
                )
            elif op.kind == "audio":
                audio += 1
                audio_bytes += op.size
            elif op.kind == "event":
                events += 1
            elif op.kind == "ack" and reply == -1:
                self.metrics.acks_refused.inc()
                log.info("ack refused: the bot is owned by another connection now", extra={"key": op.key})
        if audio:
            self._published_audio.inc(audio)
            self.metrics.bytes_published.inc(audio_bytes)
        if events:
            self._published_events.inc(events)

    def _set_health(self, ok: bool) -> None:
        if not ok and self.backlogged:
            self._set_backlogged(False)  # Redis is away: keep reading (see _set_backlogged)
        if ok != self.healthy:
            self.healthy = ok
            log.info("redis writes %s", "resumed" if ok else "failing")
            self.metrics.redis_up.set(1 if ok else 0)

    async def flush(self, timeout_s: float) -> bool:
        """Wait until everything buffered so far is in Redis; False on timeout."""
        self._wakeup.set()
        try:
            async with asyncio.timeout(timeout_s):
                while self.pending or self._router.parked or not self._idle.is_set():
                    if self._task is None or self._task.done():
                        return False  # nobody is writing: waiting would not help
                    await self._idle.wait()
                    await asyncio.sleep(0)
            return True
        except TimeoutError:
            return False

    async def close(self, timeout_s: float) -> None:
        """Flush within ``timeout_s``, then stop; what could not be sent is counted."""
        self._closing = True
        flushed = await self.flush(timeout_s)
        if self._task is not None and not self._task.done():
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for conn in self._raw.values():
            conn.close()
        if not flushed:
            # What waits for a Cluster node that never came back is lost too: count it.
            parked = [op for ops in self._router.parked.values() for op in ops]
            lost_audio = len(self._audio) + sum(op.kind == "audio" for op in parked)
            self.metrics.dropped.labels("redis_error").inc(lost_audio)
            log.error(
                "stopped with writes unsent",
                extra={
                    "audio_frames": lost_audio,
                    "control_ops": len(self._control) + sum(op.kind != "audio" for op in parked),
                },
            )
