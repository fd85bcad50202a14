"""The conformance kit: its verdicts on made-up journals, and real runs.

The runs take about a minute together (each: a gateway, six simulated bots streaming in
real time, instances killed, paused and stopped): the Python SDK, the Node.js worker, the
two mixed in one group with kill -9 on either side, and a worker that ignores its lease's
validity, which the kit must fail.
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

from tests.workers.conftest import needs_node
from workers.conformance import KitConfig, run
from workers.conformance import checks as ck
from workers.conformance.checks import Action, Record

SDK = f"{shlex.quote(sys.executable)} -m workers greeter"
ROOT = Path(__file__).resolve().parents[2]


def rec(n: int, t_ms: int, kind: str, instance: str, **fields: object) -> Record:
    return Record(f"{t_ms}-{n}", kind, instance, {k: str(v) for k, v in fields.items()})


def frame(n: int, t_ms: int, instance: str, seq: int, at_ms: int | None = None) -> Record:
    return rec(n, t_ms, "frame", instance, bot_id="b", conn="c", seq=seq, at=at_ms or t_ms)


def test_interleaved_handling_fails_one_owner_at_a_time():
    """w0 was paused holding a read batch; after w1 took over, w0 dispatched it anyway."""
    records = [
        rec(0, 1000, "start", "w0", bot_id="b"),
        frame(1, 1100, "w0", 0),
        rec(2, 3200, "start", "w1", bot_id="b"),
        frame(3, 3300, "w1", 1),
        frame(4, 3400, "w0", 2, at_ms=3400),  # dispatched after w1 began
    ]
    verdict = ck.check_one_owner(ck.stints(records))
    assert not verdict.passed and "overlap" in verdict.problems[0]
    # Written late but dispatched before the pause: that is fine.
    records[4] = frame(4, 3400, "w0", 2, at_ms=1150)
    assert ck.check_one_owner(ck.stints(records)).passed


def test_takeover_bound_uses_the_dead_instances_lease_and_the_survivors_claim_interval():
    hellos = {
        "w0": rec(0, 0, "hello", "w0", lease_ttl_ms=2000, claim_interval_ms=250),
        "w1": rec(1, 0, "hello", "w1", lease_ttl_ms=2000, claim_interval_ms=500),
    }
    records = [rec(2, 1000, "start", "w0", bot_id="b"), rec(3, 3600, "start", "w1", bot_id="b")]
    kill = Action("kill", "w0", 1.2)
    bounds = {"default_lease_s": 9, "default_claim_s": 9, "slack_s": 0}
    ok = ck.check_takeover("t", ck.stints(records), hellos, kill, ["w1"], **bounds)
    assert ok.passed and ok.figures["bound_s"] == 2.5 and ok.figures["max_s"] == 2.4
    records[1] = rec(3, 3800, "start", "w1", bot_id="b")
    late = ck.check_takeover("t", ck.stints(records), hellos, kill, ["w1"], **bounds)
    assert not late.passed


def test_handback_must_not_repeat_frames_and_must_exit_zero():
    records = [
        rec(0, 1000, "start", "w0", bot_id="b"),
        frame(1, 1100, "w0", 0),
        rec(2, 2000, "stop", "w0", bot_id="b", reason="released"),
        rec(3, 2100, "start", "w1", bot_id="b"),
        frame(4, 2200, "w1", 0),  # handled again: the hand-back did not acknowledge it
    ]
    term = Action("term", "w0", 1.9)
    verdict = ck.check_handback(
        ck.stints(records), {}, term, ["w1"], exit_code=0, exit_s=0.5, default_claim_s=0.25, slack_s=0.1
    )
    assert not verdict.passed and "handled by both" in verdict.problems[0]
    records[4] = frame(4, 2200, "w1", 1)
    verdict = ck.check_handback(
        ck.stints(records), {}, term, ["w1"], exit_code=1, exit_s=0.5, default_claim_s=0.25, slack_s=0.1
    )
    assert verdict.problems == ["w0 exited 1 after SIGTERM"]


def test_skipped_frames_and_unanswered_pings_are_named():
    stints = ck.stints([rec(0, 1, "start", "w0", bot_id="b"), frame(1, 2, "w0", 0)])
    skipped = ck.check_no_frame_skipped(stints, {"b": {("c", 0), ("c", 1)}})
    assert not skipped.passed and skipped.figures["missing"] == 1
    commands = ck.check_commands({"b": ["b/0", "b/1"]}, {"b": ["b/0", "b/0"]})
    assert not commands.passed and commands.figures == {"pings": 2, "answered": 1, "answered_twice": 1}


def _assert_passed(report) -> None:  # type: ignore[no-untyped-def]
    print("\n" + report.text())
    assert report.passed, report.text()


async def test_the_python_sdk_passes(tmp_path):
    report = await run(KitConfig(workers=[SDK], cwd=str(ROOT), run_dir=str(tmp_path)))
    _assert_passed(report)


@needs_node
async def test_the_node_worker_passes(tmp_path, node_worker_dir):
    node = f"node {node_worker_dir / 'worker.js'}"
    report = await run(KitConfig(workers=[node], cwd=str(ROOT), run_dir=str(tmp_path)))
    _assert_passed(report)


@needs_node
async def test_python_and_node_share_one_group_and_fail_over_both_ways(tmp_path, node_worker_dir):
    """Two instances, one of each: kill -9 of the Python one leaves the Node one the only
    possible new owner, and the next kill -9 (of the Node one) leaves a Python one."""
    node = f"node {node_worker_dir / 'worker.js'}"
    report = await run(KitConfig(workers=[SDK, node], instances=2, cwd=str(ROOT), run_dir=str(tmp_path)))
    _assert_passed(report)
    kills = [c.name for c in report.checks if c.name.startswith("takeover after kill -9")]
    assert len(kills) == 2 and "workers greeter" in kills[0] and "node" in kills[1]


async def test_the_kit_fails_a_worker_that_ignores_its_leases_validity(tmp_path):
    rogue = f"{shlex.quote(sys.executable)} -m tests.workers.rogue_worker"
    report = await run(
        KitConfig(
            workers=[rogue],
            instances=2,
            bots_after=2,
            disruptions=("pause",),
            cwd=str(ROOT),
            run_dir=str(tmp_path),
        )
    )
    print("\n" + report.text())
    failed = {c.name for c in report.checks if not c.passed}
    assert failed == {"one owner at a time"}
