"""The CPU quota bench.run can hold the server to: what it writes where, on either cgroup version."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.cgroup import PERIOD_US, CgroupError, CpuQuota
from bench.report import server_label


def test_cgroup_v2_gets_a_quota_per_period_and_the_process(tmp_path: Path) -> None:
    (tmp_path / "cgroup.controllers").write_text("cpuset cpu io memory pids\n")
    quota = CpuQuota(0.25, "bench-1", root=tmp_path)
    quota.add(4242)
    assert (tmp_path / "bench-1" / "cpu.max").read_text() == f"{PERIOD_US // 4} {PERIOD_US}"
    assert (tmp_path / "bench-1" / "cgroup.procs").read_text() == "4242"
    assert (tmp_path / "cgroup.subtree_control").read_text() == "+cpu"


def test_cgroup_v1_gets_period_and_quota(tmp_path: Path) -> None:
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("-1")
    CpuQuota(1.5, "bench-2", root=tmp_path).add(7)
    group = tmp_path / "cpu" / "bench-2"
    assert (group / "cpu.cfs_period_us").read_text() == str(PERIOD_US)
    assert (group / "cpu.cfs_quota_us").read_text() == str(PERIOD_US * 3 // 2)
    assert (group / "cgroup.procs").read_text() == "7"


def test_no_controller_or_a_bad_quota_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(CgroupError, match="no cgroup cpu controller"):
        CpuQuota(0.5, "x", root=tmp_path)
    (tmp_path / "cgroup.controllers").write_text("memory pids\n")
    with pytest.raises(CgroupError, match="no cpu controller"):
        CpuQuota(0.5, "x", root=tmp_path)
    with pytest.raises(CgroupError, match="must be above 0"):
        CpuQuota(0, "x", root=tmp_path)


def test_the_report_says_which_phases_ran_under_a_quota() -> None:
    assert server_label({"target": "gateway", "server_cpu_quota": None}) == "gateway"
    assert server_label({"target": "reference", "server_cpu_quota": 0.25}) == "reference (0.25 cores)"
    assert server_label({"target": "gateway"}) == "gateway"  # results files from before the option
