"""Where a Redis Cluster write goes, node by node, and what waits for a node that is down.

A dead primary answers nothing, so no MOVED ever tells a client its slots moved:
the slot map must be refreshed when a node stops answering (the publisher asks
:meth:`~gateway.redis_conn.RedisBackend.refresh_slots`), and until its replica
takes over (the cluster's node timeout, then an election: seconds, docs/OPERATIONS.md),
writes for its slots must wait *without holding up anyone else's*.
A batch that fails on one node used to be retried first, whole, which stopped
every bot's audio while one node was gone.

So ops for a node that failed are *parked* per node, in order, and the node is
tried again after a backoff (or as soon as the slot map changes); ops for other
nodes flow. An op is never sent before an older op for the same node that is
parked or still in flight on a lost connection, so each stream's entries keep
their order. No I/O here: the publisher asks where to send, and reports back.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

Node = tuple[str, int]
#: Where ops go whose slot no node serves right now (the map is being refreshed).
UNROUTED: Node = ("", 0)
MIN_BACKOFF_S = 0.05
MAX_BACKOFF_S = 0.5


class RoutedOp(Protocol):
    seq: int
    key: str
    kind: str
    size: int

    def __lt__(self, other: Any, /) -> bool: ...


Op = TypeVar("Op", bound=RoutedOp)


@dataclass(slots=True)
class _Down:
    retry_at: float
    backoff_s: float


class Router(Generic[Op]):
    """Order is kept per *key*: an op never goes out ahead of an older one for its key.

    Ops are parked per node, and a key's node changes whenever the shared slot map is
    refreshed (by us, the command readers, or redis-py on a MOVED). So when the map
    changes (``map_version``; without one, on every call), what is parked is filed
    again under the node that serves it now, before anything newer is routed.
    """

    def __init__(
        self,
        node_of: Callable[[str], Node],
        clock: Callable[[], float],
        map_version: Callable[[], object] | None = None,
    ) -> None:
        self._node_of = node_of
        self._clock = clock
        self._map_version = map_version
        self._seen_version: object = None
        self.parked: dict[Node, list[Op]] = {}
        self.parked_bytes = 0  # audio bytes parked (counted against the audio budget)
        self.down: dict[Node, _Down] = {}

    def node_of(self, key: str) -> Node:
        try:
            return self._node_of(key)
        except Exception:  # no node serves the slot now (redis-py raises its own errors)
            return UNROUTED

    def route(
        self, batch: Iterable[Op], blocked: Callable[[Node], bool] = lambda node: False
    ) -> dict[Node, list[Op]]:
        """Group parked ops that are due and a new batch (newer than anything parked) by
        node; ops for a node that is down, or ``blocked`` (its connection was lost under
        ops still in flight), are parked instead, behind what is parked for it."""
        now = self._clock()
        if self.parked:
            version = self._map_version() if self._map_version is not None else object()
            if version != self._seen_version:
                self._seen_version = version
                self.remap()
        due = [node for node in self.parked if self._may_send(node, now, blocked)]
        ops: Iterable[Op] = batch
        if due:
            taken = [self.parked.pop(node) for node in due]
            self.parked_bytes -= sum(op.size for ops_ in taken for op in ops_)
            # Parked ops are older than the new batch; merge keeps each node's order.
            ops = heapq.merge(*taken, batch)
        groups: dict[Node, list[Op]] = {}
        for op in ops:
            node = self.node_of(op.key)
            if node in self.parked or not self._may_send(node, now, blocked):
                self._park(node, [op])
            else:
                groups.setdefault(node, []).append(op)
        return groups

    def _may_send(self, node: Node, now: float, blocked: Callable[[Node], bool]) -> bool:
        if node == UNROUTED:
            return False
        down = self.down.get(node)
        return (down is None or down.retry_at <= now) and not blocked(node)

    def _park(self, node: Node, ops: list[Op]) -> None:
        parked = self.parked.get(node)
        if parked is None:
            self.parked[node] = list(ops)
        elif parked and ops and ops[0] < parked[-1]:
            parked[:] = list(heapq.merge(parked, ops))  # failed ops come back older than parked ones
        else:
            parked += ops
        self.parked_bytes += sum(op.size for op in ops)

    def failed(self, node: Node, ops: list[Op]) -> None:
        """Ops sent to ``node`` that did not land: parked (in order), the node backed off.

        They are routed again when due: to the same node, or to whoever serves their
        slots once the map is refreshed.
        """
        down = self.down.get(node)
        backoff_s = MIN_BACKOFF_S if down is None else min(down.backoff_s * 2, MAX_BACKOFF_S)
        self.down[node] = _Down(self._clock() + backoff_s, backoff_s)
        if ops:
            self._park(node, ops)

    def succeeded(self, node: Node) -> None:
        self.down.pop(node, None)

    def slots_changed(self, primaries: set[Node]) -> None:
        """The slot map was refreshed: parked ops are routed afresh (their slots may have a
        new primary), and nodes that serve nothing any more stop counting as down."""
        for node in [n for n in self.down if n not in primaries]:
            del self.down[node]
        for down in self.down.values():
            down.retry_at = self._clock()
        regroup = [node for node in self.parked if node not in primaries]
        if regroup:
            ops = list(heapq.merge(*(self.parked.pop(node) for node in regroup)))
            self.parked_bytes -= sum(op.size for op in ops)
            for op in ops:
                self._park(self.node_of(op.key), [op])

    def remap(self) -> None:
        """File every parked op again under the node that serves its key now."""
        ops = list(heapq.merge(*self.parked.values()))
        self.parked.clear()
        self.parked_bytes = 0
        for op in ops:
            self._park(self.node_of(op.key), [op])

    def next_due(self) -> float | None:
        """When parked ops may next be tried (None: nothing parked)."""
        if not self.parked:
            return None
        return min((self.down[n].retry_at if n in self.down else 0.0) for n in self.parked)

    def shed_oldest_audio(self, bytes_over: int) -> int:
        """Drop parked audio, oldest first, until ``bytes_over`` is freed; how many ops."""
        dropped = 0
        while bytes_over > 0 and self.parked_bytes > 0:
            node = min(
                (n for n, ops in self.parked.items() if any(op.kind == "audio" for op in ops)),
                key=lambda n: next(op.seq for op in self.parked[n] if op.kind == "audio"),
                default=None,
            )
            if node is None:
                break
            ops = self.parked[node]
            index = next(i for i, op in enumerate(ops) if op.kind == "audio")
            op = ops.pop(index)
            if not ops:
                del self.parked[node]
            self.parked_bytes -= op.size
            bytes_over -= op.size
            dropped += 1
        return dropped

    @property
    def healthy(self) -> bool:
        """Nothing accepted waits for a node (a node that is down but serves none of our
        writes any more, its slots taken over, does not count)."""
        return not self.parked

    def __len__(self) -> int:
        return sum(len(ops) for ops in self.parked.values())
