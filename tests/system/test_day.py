"""A day of production in a box, small enough for CI (issue 16).

1. Redis Cluster 3 primaries + 3 replicas (1 s node timeout); three gateway replicas
   behind the Service stand-in; three SDK worker processes; 16 bots (plus the ones
   that replace those whose meeting ends, and a burst) in real time for 80 s:
   20 ms frames, two speakers, chat questions answered in the chat and by voice,
   barge-ins interrupted.
2. At known times: a worker SIGKILLed, a worker joining, a gateway SIGKILLed (and
   replaced), a Redis primary SIGKILLed (its replica promoted, then the old primary
   back as a replica), a slot migrated, a rolling restart of every gateway with a
   burst of new bots during it, a worker stopped with SIGTERM.
3. The ledger balances: every frame sent is in Redis or lost within a documented
   bound; every command written is delivered, rejected, or explained; no bot was
   handled by two workers at once and every frame in Redis was handled; each fault
   healed within its bound. Otherwise the test fails with the report's problems.

``python -m tests.system.day`` runs the full size and writes the report (see day.py).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest

from tests.system.day import run_day
from tests.system.plan import DayPlan
from tests.system.report import markdown, write_report

pytestmark = pytest.mark.system


@pytest.mark.timeout(480)
async def test_a_day_of_production_balances_its_ledger(tmp_path: Path) -> None:
    plan = DayPlan(bots=16, seconds=80.0, workers=3, bot_procs=1).build()
    run_dir = tmp_path / "day.run"
    run_dir.mkdir()
    started = time.monotonic()
    ledger = await run_day(plan, run_dir, overload_lag_s=0.0)
    ledger.report["run"]["wall_s"] = round(time.monotonic() - started, 1)
    # MEETSTREAM_SYSTEM_REPORT=PREFIX keeps the report and the records past pytest's
    # clean-up of old temporary directories.
    keep = os.environ.get("MEETSTREAM_SYSTEM_REPORT")
    write_report(ledger, Path(keep) if keep else tmp_path / "day")
    if keep:
        shutil.copytree(run_dir, Path(keep + ".run"), dirs_exist_ok=True)
    print("\n" + markdown(ledger, "day.png"))
    print(f"\nfull report: {tmp_path / 'day.md'}, raw records: {run_dir}")

    r = ledger.report
    faults = {f["name"]: f for f in r["faults"]}
    assert set(faults) == {f.name for f in plan.faults}, "every fault ran"
    assert not [f for f in r["faults"] if "error" in f], "a fault could not be staged"
    frames, commands = r["frames"]["total"], r["commands"]["total"]
    assert frames.get("sent", 0) > 0.9 * frames.get("captured", 1), "bots could send most of their frames"
    assert commands.get("written", 0) > 100 and r["bot_messages"].get("sent", 0) > 50
    assert r["commands"]["by_kind"].get("int", {}).get("delivered", 0) > 0, "barge-ins were interrupted"
    assert not ledger.problems, "the ledger does not balance:\n" + "\n".join(
        json.dumps(p, default=str)[:500] for p in ledger.problems
    )
