"""Reproduction, found by the day's order check: after a Redis primary's failover (and
during a slot migration), a bot's frames are stored out of order.

Nine of ten CI-size days since the failover fix (7c06a38), the last two on 7051380, had
127-889 frames of 1-7 bots stored after frames their bot sent later, all on the dead
primary's keys: frames 457..611 of one
bot went in after frame 612, which reached the promoted replica first; a slot migration
reorders a few more. PROTOCOL.md: one entry per frame, "in the order the bot sent them";
a worker then counts a seq gap (``MeetstreamWorkersLostAudio`` fires) and a repeat, and a
recorder writes the audio out of order.

``gateway.routing.Router`` keeps order per *node*: an op is held behind older ops parked
for the node it routes to. But a key's node changes whenever the shared slot map is
refreshed (by the publisher, the command readers, or redis-py on a MOVED), and
``slots_changed`` regroups the parked ops only when the publisher's own refresh returns,
and only those of nodes that serve nothing any more. In between, a new op for the key
routes to its new node while older ones for the same key still wait, parked under the old
node until its backoff ends.

1. An op for key k fails on node A (dead): parked under A.
2. The slot map now says k is on B (the replica promoted), and nothing told the router.
3. A newer op for k is routed: it must not go to B ahead of the parked one. It did, before
   the router filed parked ops again on a new slot map.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from gateway.routing import Node, Router

pytestmark = pytest.mark.system

A: Node = ("127.0.0.1", 7000)
B: Node = ("127.0.0.1", 7001)


@dataclass
class Op:
    seq: int
    key: str
    kind: str = "audio"
    size: int = 1920

    def __lt__(self, other: Op) -> bool:
        return self.seq < other.seq


def test_a_newer_write_never_overtakes_a_parked_one_for_the_same_key() -> None:
    slot_map = {"meetstream:{bot}:audio": A}
    router: Router[Op] = Router(lambda key: slot_map[key], clock=lambda: 100.0)
    first, second = Op(1, "meetstream:{bot}:audio"), Op(2, "meetstream:{bot}:audio")

    assert router.route([first]) == {A: [first]}
    router.failed(A, [first])  # A died under it: parked, A backed off
    slot_map["meetstream:{bot}:audio"] = B  # the shared slot map was refreshed elsewhere

    sent = router.route([second])
    to_b = sent.get(B, [])
    # Either the newer op waits too, or the parked one goes first, to B.
    overtook = second in to_b and (first not in to_b or to_b.index(first) > to_b.index(second))
    assert not overtook, f"sent {sent} while {router.parked} waits"
