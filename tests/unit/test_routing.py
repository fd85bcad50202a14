"""Cluster routing: a node that is down holds back only its own writes, in order."""

from __future__ import annotations

from dataclasses import dataclass

from gateway.routing import MAX_BACKOFF_S, UNROUTED, Router

A, B, C = ("a", 1), ("b", 2), ("c", 3)


@dataclass
class Op:
    seq: int
    key: str
    kind: str = "audio"
    size: int = 10

    def __lt__(self, other: Op) -> bool:
        return self.seq < other.seq


class Clock:
    now = 0.0

    def __call__(self) -> float:
        return self.now


def make(slots: dict[str, tuple[str, int]]) -> tuple[Router, Clock]:
    clock = Clock()
    return Router(lambda key: slots[key], clock), clock


def seqs(groups, node):
    return [op.seq for op in groups.get(node, [])]


def test_a_failed_node_holds_back_only_its_own_ops_and_keeps_their_order():
    slots = {"x": A, "y": B}
    router, clock = make(slots)
    groups = router.route([Op(1, "x"), Op(2, "y")])
    router.failed(A, groups[A])
    router.succeeded(B)
    # New ops: y flows, x waits behind the parked op 1.
    groups = router.route([Op(3, "x"), Op(4, "y")])
    assert seqs(groups, B) == [4] and A not in groups
    assert not router.healthy and len(router) == 2
    clock.now += MAX_BACKOFF_S
    groups = router.route([Op(5, "x")])
    assert seqs(groups, A) == [1, 3, 5]
    assert router.healthy


def test_a_new_slot_map_sends_parked_ops_to_the_promoted_replica():
    slots = {"x": A}
    router, _ = make(slots)
    router.failed(A, router.route([Op(1, "x"), Op(2, "x")])[A])
    assert router.route([Op(3, "x")]) == {}
    slots["x"] = C  # the replica took the slot over
    router.slots_changed({B, C})
    assert A not in router.down
    assert seqs(router.route([Op(4, "x")]), C) == [1, 2, 3, 4]


def test_ops_whose_connection_was_lost_block_newer_ones_until_they_settle():
    router, _ = make({"x": A})
    lost = {A}
    assert router.route([Op(1, "x")], blocked=lambda n: n in lost) == {}
    lost.clear()
    assert seqs(router.route([Op(2, "x")]), A) == [1, 2]


def test_failed_ops_come_back_ahead_of_newer_parked_ones():
    router, clock = make({"x": A})
    first = router.route([Op(1, "x"), Op(2, "x")])[A]  # in flight
    router.failed(A, [])  # another batch failed: A is down
    router.route([Op(3, "x")])  # parked behind
    router.failed(A, first)  # the batch in flight failed too
    clock.now += MAX_BACKOFF_S
    assert seqs(router.route([]), A) == [1, 2, 3]


def test_unrouted_ops_wait_for_a_slot_map():
    def nowhere(key: str):
        raise LookupError(key)

    router = Router(nowhere, Clock())
    assert router.route([Op(1, "x")]) == {} and UNROUTED in router.parked


def test_parked_audio_is_shed_oldest_first():
    router, _ = make({"x": A, "y": B})
    router.failed(A, [Op(1, "x"), Op(4, "x")])
    router.failed(B, [Op(2, "y", kind="event", size=0), Op(3, "y")])
    assert router.shed_oldest_audio(15) == 2
    assert [op.seq for ops in router.parked.values() for op in ops] == [4, 2]
    assert router.parked_bytes == 10
