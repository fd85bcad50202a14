"""A misspelt MEETSTREAM_* variable stops the gateway; other components' names do not."""

from __future__ import annotations

import re
from dataclasses import fields
from pathlib import Path

import pytest

from gateway.cli import main
from gateway.exceptions import ConfigError
from gateway.settings import Settings, env_name

ROOT = Path(__file__).resolve().parents[2]
_NAME = re.compile(rb"MEETSTREAM_[A-Z0-9][A-Z0-9_]*")


def test_a_misspelt_variable_is_refused_with_the_closest_name() -> None:
    with pytest.raises(ConfigError) as refused:
        Settings.from_sources([], {"MEETSTREAM_AUDIO_MAXLN": "1200"})
    assert "MEETSTREAM_AUDIO_MAXLN" in str(refused.value)
    assert "did you mean MEETSTREAM_AUDIO_MAXLEN?" in str(refused.value)


def test_the_cli_exits_2_on_a_misspelt_variable(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("MEETSTREAM_AUDIO_MAXLN", "1200")
    assert main(["run", "--port", "0", "--metrics-port", "0"]) == 2  # before anything starts
    assert "MEETSTREAM_AUDIO_MAXLEN" in capsys.readouterr().err


def _names_used_in_the_repo() -> set[str]:
    """Every MEETSTREAM_* name the code, chart, compose file, tests or bench mention."""
    names: set[str] = set()
    for top in ("gateway", "workers", "deploy", "helm", "bench", "tests"):
        for path in (ROOT / top).rglob("*"):
            if (
                path.is_file()
                and "node_modules" not in path.parts
                and path.suffix in {".py", ".js", ".yaml", ".yml", ".json", ".tpl", ".txt", ""}
                and path != Path(__file__).resolve()
            ):
                names.update(m.decode() for m in _NAME.findall(path.read_bytes()))
    return names


def test_every_name_another_component_reads_is_accepted() -> None:
    from workers.worker import ENV_SETTINGS  # the SDK's names, as it reads them

    own = {env_name(f.name) for f in fields(Settings)}
    used = _names_used_in_the_repo() | set(ENV_SETTINGS.values())
    assert "MEETSTREAM_WORKER_GROUP" in used and "MEETSTREAM_AUDIO_MAXLEN" in used  # the scan works
    foreign = sorted(used - own)
    assert foreign  # e.g. the SDK's MEETSTREAM_LEASE_TTL_S
    environ = dict.fromkeys(foreign, "1") | {"MEETSTREAM_AUDIO_MAXLEN": "1200"}
    assert Settings.from_sources([], environ).audio_maxlen == 1200
