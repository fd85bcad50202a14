"""``python -m workers.demo`` runs end to end and stops by itself."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_demo_shows_bots_speakers_frames_commands(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "workers.demo", "--seconds", "6", "--bots", "3", "--out", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    out = result.stdout
    assert "new speaker 'Ada'" in out and "session_ended" in out
    assert (
        "demo-bot-0: 40 frames, speakers ['Ada', 'Grace'], commands {'sendmsg': 1}" in out
    )  # 2 s, 2 speakers
    assert sorted(p.name for p in (tmp_path / "demo-bot-0").iterdir()) == ["Ada_spk-1.wav", "Grace_spk-2.wav"]
    assert all(f"demo-bot-{i}: 40 frames" in out for i in range(3))
    # The teardown used to block the loop the gateway runs on while workers stopped.
    assert "overloaded" not in result.stderr + out
