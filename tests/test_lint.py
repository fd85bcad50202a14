"""The habits that keep the code readable, checked with the tests: ruff and strict mypy."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PYTHON_TREES = ["gateway", "workers", "tests", "bench"]


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=300
    )


@pytest.mark.parametrize(
    "command",
    [("ruff", "check", "."), ("ruff", "format", "--check", *PYTHON_TREES)],
    ids=["ruff-check", "ruff-format"],
)
def test_ruff_is_clean(command: tuple[str, ...]) -> None:
    result = run(*command)
    assert result.returncode == 0, result.stdout + result.stderr


def test_gateway_and_worker_sdk_type_check_strict() -> None:
    # Settings in pyproject.toml ([tool.mypy]: strict, packages = gateway and workers;
    # workers/pipecat excluded).
    result = run("mypy")
    assert result.returncode == 0, result.stdout + result.stderr
