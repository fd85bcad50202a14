"""py-spy on a server under load, folded into the functions where its CPU goes.

``py-spy record --format raw`` writes collapsed stacks (``frame;frame;... count``, root first).
*Self* is the share of samples whose innermost frame is the function; *inclusive* the share whose
stack contains it anywhere. With ``--idle`` off (the default), samples only count while the
process is on CPU, so shares are shares of CPU time, and ``cpu_us_per_frame x share`` says what a
function costs per audio frame.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

#: Frames on every stack of an asyncio program: not informative as "inclusive" rows.
_ROOT_PREFIXES = ("<module>", "main (", "run (", "asyncio_run (")
_ROOT_PARTS = (
    "_run_module_as_main",
    "_run_code",
    "Runner.run",
    "run_until_complete",
    "run_forever",
    "_run_once",
    "Handle._run",
    "uvicorn/main.py",
    "Server.run (",
    "Server.serve (",
)


def is_boilerplate(function: str) -> bool:
    return function.startswith(_ROOT_PREFIXES) or any(p in function for p in _ROOT_PARTS)


_FRAME_RE = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")


def py_spy_binary() -> str | None:
    here = Path(sys.executable).parent / "py-spy"
    return str(here) if here.exists() else shutil.which("py-spy")


def record(pid: int, seconds: float, out: Path, rate_hz: int = 100) -> tuple[bool, str]:
    """Sample ``pid`` for ``seconds``; (ok, message). Never raises for a missing py-spy."""
    exe = py_spy_binary()
    if exe is None:
        return False, "py-spy not installed (pip install -e '.[bench]')"
    cmd = [
        exe,
        "record",
        "--pid",
        str(pid),
        "--duration",
        str(max(1, round(seconds))),
        "--rate",
        str(rate_hz),
        "--format",
        "raw",
        "--output",
        str(out),
        "--nonblocking",
    ]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 30)
    except subprocess.TimeoutExpired:
        return False, "py-spy timed out"
    if proc.returncode != 0 or not out.exists():
        return False, (proc.stderr or proc.stdout)[-500:]
    return True, " ".join(cmd)


def _short(frame: str) -> str:
    m = _FRAME_RE.match(frame.strip())
    if not m:
        return frame.strip()
    path = m["file"]
    for marker in ("site-packages/", "lib/python3.", "/work/main/"):
        if marker in path:
            path = path.split(marker, 1)[1]
            if marker == "lib/python3.":
                path = "stdlib:" + path.split("/", 1)[-1]
            break
    return f"{m['func']} ({path})"


def fold(raw: str, top: int = 25) -> dict[str, Any]:
    """Top functions by self and inclusive share of samples, and top modules by self share."""
    self_c: Counter[str] = Counter()
    incl_c: Counter[str] = Counter()
    mod_c: Counter[str] = Counter()
    total = 0
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = [
            _short(f)
            for f in stack.split(";")
            if f and not f.startswith("process ") and not f.startswith("thread ")
        ]
        if not frames:
            continue
        total += n
        self_c[frames[-1]] += n
        for f in set(frames):
            incl_c[f] += n
        leaf = frames[-1]
        mod = leaf[leaf.rfind("(") + 1 : -1].split(":")[0]
        mod_c[mod] += n

    def rows(c: Counter[str]) -> list[dict[str, Any]]:
        return [{"function": f, "share": n / total} for f, n in c.most_common(top)] if total else []

    return {
        "samples": total,
        "self": rows(self_c),
        "inclusive": rows(incl_c),
        "by_file_self": [{"file": f, "share": n / total} for f, n in mod_c.most_common(top)] if total else [],
    }
