"""The version is written once, in pyproject.toml; everything that shows it agrees."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
import yaml

import gateway
from gateway.cli import main
from gateway.metrics import Metrics

ROOT = Path(__file__).resolve().parents[2]


def _pyproject_version() -> str:
    return str(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"])


def test_code_cli_metrics_chart_and_changelog_show_pyproject_version(
    capsys: pytest.CaptureFixture[str],
) -> None:
    version = _pyproject_version()
    assert gateway.__version__ == version  # stale: reinstall (./dev does when pyproject.toml changes)

    with pytest.raises(SystemExit) as exited:
        main(["--version"])
    assert exited.value.code == 0
    assert capsys.readouterr().out.split() == ["meetstream-gateway", version]

    registry = Metrics().registry
    assert registry.get_sample_value("meetstream_gateway_build_info", {"version": version}) == 1.0

    chart = yaml.safe_load((ROOT / "helm/meetstream-gateway/Chart.yaml").read_text())
    assert chart["appVersion"] == version

    changelog = (ROOT / "CHANGELOG.md").read_text()
    released = re.findall(r"^## \[(\d[^\]]*)\]", changelog, re.MULTILINE)
    assert released and released[0] == version, "the newest release in CHANGELOG.md"


def test_version_is_written_nowhere_else_in_the_package() -> None:
    version = _pyproject_version()
    for path in (ROOT / "gateway").rglob("*.py"):
        assert f'"{version}"' not in path.read_text(), f"{path}: read gateway.__version__ instead"
