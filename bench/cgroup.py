"""A CPU quota for the server under test, through the kernel's cgroups (Linux, root).

Two cores cannot offer a gateway a whole core's worth of real-time bots: the
load generator and Redis fill the other core first. Giving the server a fraction
of a core instead (``bench.run --cpu-quota 0.25``) lets a phase find where it
stops keeping up, and that count of bots, divided by the fraction, is what one
core serves: measured at saturation, not extrapolated from CPU time at a lighter
load. The quota is enforced every 10 ms period, so a server over it stalls for
at most the rest of a period.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

PERIOD_US = 10_000
ROOT = Path("/sys/fs/cgroup")


class CgroupError(RuntimeError):
    """The quota could not be set up (not Linux, not root, or no cpu controller)."""


class CpuQuota:
    """A cgroup holding one process, allowed ``fraction`` of one core."""

    def __init__(self, fraction: float, name: str, root: Path = ROOT) -> None:
        if not 0 < fraction <= 64:
            raise CgroupError(f"CPU quota {fraction} must be above 0 (in cores)")
        self.fraction = fraction
        quota_us = max(1000, round(fraction * PERIOD_US))
        if (root / "cgroup.controllers").exists():  # cgroup v2, unified
            if "cpu" not in (root / "cgroup.controllers").read_text().split():
                raise CgroupError(f"no cpu controller in {root}")
            self.path = root / name
            self._enable = root / "cgroup.subtree_control"  # children get cpu.max only once enabled
            self._files = {"cpu.max": f"{quota_us} {PERIOD_US}"}
        elif (root / "cpu" / "cpu.cfs_quota_us").exists():  # cgroup v1
            self.path = root / "cpu" / name
            self._enable = None
            self._files = {"cpu.cfs_period_us": str(PERIOD_US), "cpu.cfs_quota_us": str(quota_us)}
        else:
            raise CgroupError(f"no cgroup cpu controller under {root}")

    def add(self, pid: int) -> None:
        """Create the group, set its quota and move ``pid`` (all its threads) into it."""
        try:
            if self._enable is not None:
                self._enable.write_text("+cpu")
            self.path.mkdir(exist_ok=True)
            for name, value in self._files.items():
                (self.path / name).write_text(value)
            (self.path / "cgroup.procs").write_text(str(pid))
        except OSError as exc:
            raise CgroupError(f"cannot set a CPU quota in {self.path}: {exc} (needs root)") from exc

    def remove(self, timeout_s: float = 2.0) -> None:
        """Remove the group once its process has exited (the kernel lets go of it a
        moment after the process is reaped)."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                os.rmdir(self.path)
                return
            except FileNotFoundError:
                return
            except OSError as exc:
                if time.monotonic() > deadline:
                    raise CgroupError(f"cannot remove {self.path}: {exc}") from exc
                time.sleep(0.05)
