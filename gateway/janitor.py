"""Housekeeping of command streams: the leftovers no bot's gateway cleans up.

Two things pile up in Redis without it:

- a command stream a worker wrote for a bot that never connects has no expiry
  (a gateway sets one only on the keys of the bots it holds), so it lives forever;
- every gateway process that ever read a bot's commands leaves its consumer in
  the stream's ``gateway`` group, and in Kubernetes every pod is a new gateway_id.

Every gateway runs a pass every ``janitor_interval_s``, the first after a random
delay up to that, so that replicas started together do not scan together. A pass
SCANs every primary for command streams (``KeySpace.command_pattern``, ``TYPE
stream``) and runs :data:`SWEEP` on each, atomically: a stream without an expiry
gets ``key_ttl_s`` (a live bot's stream has one already, refreshed by its
gateway, and is left alone), and consumers of the ``gateway`` group idle longer
than ``janitor_consumer_idle_s`` with no pending entries are deleted, never this
gateway's own.

Bounded: a pass examines at most ``janitor_max_keys`` streams and the next pass
resumes the scan where it stopped; SCAN asks for :data:`SCAN_COUNT` keys at a time,
the streams found are swept :data:`SWEEP_BATCH` to a pipeline, and the janitor sleeps
:data:`BATCH_PAUSE_S` after each round trip so that Redis is never hogged. A
failed pass is logged and counted, and the next one goes on from the same cursor:
the janitor never stops the gateway.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import random
import time
from dataclasses import dataclass
from typing import Any

from redis.exceptions import NoScriptError, RedisError

from gateway.keys import COMMAND_GROUP, KeySpace
from gateway.logs import error_text
from gateway.metrics import Metrics
from gateway.redis_conn import RedisBackend
from gateway.settings import Settings

log = logging.getLogger(__name__)

#: Keys SCAN walks per call: short enough that one SCAN holds Redis under a millisecond.
SCAN_COUNT = 500
#: Streams swept per pipeline, which Redis runs back to back: ~1.5 ms of it at most
#: (per-stream cost in docs/ARCHITECTURE.md, "Housekeeping").
SWEEP_BATCH = 100
#: Rest after each round trip, so that a pass leaves Redis idle most of the time: a
#: keyspace of 1,000,000 keys is 2,000 SCANs, and 20 s of rest between them.
BATCH_PAUSE_S = 0.01
#: How long :meth:`Janitor.stop` lets a pass finish its round trip before cancelling it.
STOP_WAIT_S = 2.0

#: KEYS: one command stream. ARGV: group, key_ttl_s, idle threshold in ms, our consumer.
#: Returns {1 if an expiry was set, consumers deleted}; {-1, 0} when the key is no
#: longer a stream (deleted or expired since the SCAN).
#:
#: Atomic, so "nothing pending" still holds when the consumer is deleted: XGROUP
#: DELCONSUMER drops a consumer's pending entries, and a consumer that read an entry
#: between a separate XINFO and the delete would lose that command's redelivery. A
#: consumer that becomes active *after* the script is harmless: XREADGROUP and
#: XAUTOCLAIM create their consumer again, and it had nothing pending to lose. A
#: live gateway reads its bots' streams every ``command_block_ms`` (2 s), so its
#: consumer is never idle for anything near the threshold anyway (and a bot whose
#: reading is paused has commands pending).
SWEEP = """
if redis.call('TYPE', KEYS[1]).ok ~= 'stream' then return {-1, 0} end
local expiry_set = 0
if redis.call('TTL', KEYS[1]) == -1 then
  redis.call('EXPIRE', KEYS[1], ARGV[2])
  expiry_set = 1
end
local consumers = redis.pcall('XINFO', 'CONSUMERS', KEYS[1], ARGV[1])
if consumers.err then return {expiry_set, 0} end
local idle_ms = tonumber(ARGV[3])
local deleted = 0
for _, flat in ipairs(consumers) do
  local c = {}
  for i = 1, #flat, 2 do c[flat[i]] = flat[i + 1] end
  if c.pending == 0 and c.idle > idle_ms and c.name ~= ARGV[4] then
    redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], c.name)
    deleted = deleted + 1
  end
end
return {expiry_set, deleted}
"""
_SWEEP_SHA = hashlib.sha1(SWEEP.encode()).hexdigest()


@dataclass(slots=True)
class PassResult:
    """What one pass did."""

    streams_checked: int = 0
    expiries_set: int = 0
    consumers_deleted: int = 0
    #: Every primary's scan came back to its start: the next pass begins a new round.
    round_complete: bool = False


class Janitor:
    """Periodic housekeeping of command streams. :meth:`start`, then :meth:`stop`;
    :meth:`run_once` runs one pass now (tests, tools)."""

    def __init__(
        self, backend: RedisBackend, keyspace: KeySpace, settings: Settings, metrics: Metrics
    ) -> None:
        self.backend = backend
        self.keyspace = keyspace
        self.settings = settings
        self.metrics = metrics
        self.pattern = keyspace.command_pattern()
        #: The current round: cursor per primary not scanned to the end yet.
        self._cursors: dict[str, int] = {}
        #: Streams a SCAN returned beyond the last pass's budget: swept first next time.
        self._backlog: list[bytes] = []
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Run passes in the background, unless ``janitor_interval_s`` is 0."""
        if self.settings.janitor_interval_s > 0 and self._task is None:
            self._stop.clear()
            self._task = asyncio.create_task(self._run(), name="janitor")

    async def stop(self) -> None:
        """Stop after the current round trip (cancelled if it takes longer). Idempotent."""
        self._stop.set()
        task, self._task = self._task, None
        if task is None:
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait({task}, timeout=STOP_WAIT_S)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    async def _run(self) -> None:
        interval_s = self.settings.janitor_interval_s
        delay_s = random.uniform(0, interval_s)
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay_s):
                    await self._stop.wait()
            if self._stop.is_set():
                return
            delay_s = interval_s
            try:
                await self.run_once()
            except (RedisError, OSError) as exc:
                log.warning("housekeeping pass failed, retrying next pass", extra={"error": error_text(exc)})
            except Exception:
                # A bug, but housekeeping is never worth stopping the gateway for.
                log.exception("housekeeping pass failed, retrying next pass")

    async def run_once(self) -> PassResult:
        """One pass: sweep up to ``janitor_max_keys`` command streams, resuming the
        previous pass's scan. Raises what Redis raised (counted in ``janitor_errors``)."""
        self.metrics.janitor_passes.inc()
        started = time.monotonic()
        result = PassResult()
        try:
            await self._pass(result)
        except Exception:
            self.metrics.janitor_errors.inc()
            raise
        level = logging.INFO if result.expiries_set or result.consumers_deleted else logging.DEBUG
        log.log(
            level,
            "housekeeping pass done",
            extra={
                "streams_checked": result.streams_checked,
                "expiries_set": result.expiries_set,
                "consumers_deleted": result.consumers_deleted,
                "round_complete": result.round_complete,
                "duration_s": round(time.monotonic() - started, 3),
            },
        )
        return result

    async def _pass(self, result: PassResult) -> None:
        if not self._cursors and not self._backlog:
            self._cursors = dict.fromkeys(self._primaries(), 0)
        budget = self.settings.janitor_max_keys
        while budget > 0 and not self._stop.is_set():
            if not self._backlog:
                if not self._cursors:
                    result.round_complete = True
                    return
                await self._scan_next()
            else:
                size = min(budget, SWEEP_BATCH)
                batch, self._backlog = self._backlog[:size], self._backlog[size:]
                await self._sweep(batch, result)
                budget -= len(batch)
            await asyncio.sleep(BATCH_PAUSE_S)
        result.round_complete = not self._cursors and not self._backlog

    def _primaries(self) -> list[str]:
        """The nodes to scan: every primary of a Cluster (each holds its own slots), or the one Redis."""
        if self.backend.is_cluster:
            return [node.name for node in self.backend.client.get_primaries()]
        return [""]

    async def _scan_next(self) -> None:
        """One SCAN call on the first node of the round not finished, into the backlog."""
        name, cursor = next(iter(self._cursors.items()))
        client = self.backend.client
        if self.backend.is_cluster:
            node = client.get_node(node_name=name)
            if node is None or name not in self._primaries():
                del self._cursors[name]  # failed over or removed: the next round scans the new primary
                return
            cursors, keys = await client.scan(
                cursor=cursor, match=self.pattern, count=SCAN_COUNT, _type="stream", target_nodes=node
            )
            cursor = cursors[name]
        else:
            cursor, keys = await client.scan(
                cursor=cursor, match=self.pattern, count=SCAN_COUNT, _type="stream"
            )
        if cursor == 0:
            del self._cursors[name]
        else:
            self._cursors[name] = cursor
        self._backlog += keys

    async def _sweep(self, keys: list[bytes], result: PassResult) -> None:
        """Run :data:`SWEEP` on each key, in one pipeline (EVALSHA; EVAL where the script is not cached)."""
        args = (
            COMMAND_GROUP,
            self.settings.key_ttl_s,
            int(self.settings.janitor_consumer_idle_s * 1000),
            self.settings.gateway_id,
        )
        replies = await self._pipeline([("EVALSHA", _SWEEP_SHA, 1, key, *args) for key in keys])
        unloaded = [key for key, reply in zip(keys, replies, strict=True) if isinstance(reply, NoScriptError)]
        if unloaded:
            # After a restart or SCRIPT FLUSH; EVAL caches the script for the next keys.
            again = iter(await self._pipeline([("EVAL", SWEEP, 1, key, *args) for key in unloaded]))
            replies = [next(again) if isinstance(r, NoScriptError) else r for r in replies]
        checked = expiries = deleted = 0
        error: Exception | None = None
        for reply in replies:
            if isinstance(reply, Exception):
                error = error or reply
            elif reply[0] >= 0:
                checked += 1
                expiries += reply[0]
                deleted += reply[1]
        result.streams_checked += checked
        result.expiries_set += expiries
        result.consumers_deleted += deleted
        self.metrics.janitor_streams_checked.inc(checked)
        self.metrics.janitor_expiries_set.inc(expiries)
        self.metrics.janitor_consumers_deleted.inc(deleted)
        if error is not None:
            # The batch is not retried this round: a key that always fails must not stall the scan.
            raise error

    async def _pipeline(self, commands: list[tuple[Any, ...]]) -> list[Any]:
        pipe = self.backend.client.pipeline(transaction=False)
        for command in commands:
            pipe.execute_command(*command)
        replies: list[Any] = await pipe.execute(raise_on_error=False)
        return replies
