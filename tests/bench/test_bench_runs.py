"""The benchmark runs: a tiny configuration end to end, and its results are complete and sane.

No speed is asserted here (the figures live in docs/BENCHMARKS.md): only that frames were
offered, counted and written, commands were timed, CPU was read, and the report renders.
"""

from __future__ import annotations

import json
import sys

import pytest

pytest.importorskip("fastapi", reason="the reference bridge needs the extras: pip install -e '.[bench]'")
pytest.importorskip("uvicorn")
pytest.importorskip("psutil")

from bench import report
from bench.loadgen import STAMP, RawAudioSender, read_stamp, ws_header
from bench.profile import fold
from bench.run import config, run


def test_ws_header_lengths() -> None:
    assert ws_header(125) == bytes((0x82, 0x80 | 125))
    assert ws_header(9600) == bytes((0x82, 0x80 | 126)) + (9600).to_bytes(2, "big")
    assert ws_header(1 << 16) == bytes((0x82, 0x80 | 127)) + (1 << 16).to_bytes(8, "big")


def test_raw_sender_frame_unmasks_to_the_audio_frame_with_its_stamp() -> None:
    """What the generator writes is a valid masked frame whose payload parses as the bot's frame."""
    from websockets.utils import apply_mask

    from gateway.protocol import AudioFrame, parse_audio_frame

    written: list[bytes] = []

    class Transport:
        def write(self, data: bytes) -> None:
            written.append(data)

    class Ws:
        transport = Transport()

    frame = AudioFrame("spk-0", "Ada", bytes(1920))
    sender = RawAudioSender(Ws(), frame)  # type: ignore[arg-type]
    sender.send(123_456_789, 7)
    data = written[0]
    header = ws_header(len(frame.serialize()))
    assert data.startswith(header)
    mask = data[len(header) : len(header) + 4]
    payload = apply_mask(data[len(header) + 4 :], mask)
    parsed = parse_audio_frame(payload)
    assert (parsed.speaker_id, parsed.speaker_name, len(parsed.pcm)) == ("spk-0", "Ada", 1920)
    assert read_stamp(parsed.pcm) == (123_456_789, 7)
    assert parsed.pcm[STAMP.size :] == bytes(1920 - STAMP.size)


def test_fold_collapsed_stacks() -> None:
    raw = "main (a.py:1);loop (b.py:2);xadd (c.py:3) 30\nmain (a.py:1);loop (b.py:2) 10\n"
    folded = fold(raw)
    assert folded["samples"] == 40
    assert folded["self"][0] == {"function": "xadd (c.py)", "share": 0.75}
    assert {"function": "loop (b.py)", "share": 1.0} in folded["inclusive"]


@pytest.mark.timeout(240)
def test_tiny_benchmark_runs_and_results_are_complete(tmp_path) -> None:  # type: ignore[no-untyped-def]
    result = run(config("tiny", processes=1, profile=False), results_dir=tmp_path)

    saved = json.loads((tmp_path / "latest-tiny.json").read_text())
    assert saved["phases"] and saved["limit"]
    assert saved["meta"]["load_before"]["cpus"] >= 1
    for row in result["limit"]:
        assert row["xadds"] > 0 and row["xadd_per_s"] > 0 and row["client_cpu_us_per_xadd"] > 0

    targets = {(p["target"], p["mode"]) for p in result["phases"]}
    assert targets == {
        ("gateway", "realtime"),
        ("reference", "realtime"),
        ("gateway", "flood"),
        ("reference", "flood"),
    }
    for p in result["phases"]:
        assert not p.get("failed"), p.get("errors")
        assert p["bots_connected"] == p["bots"] and p["connect_failures"] == 0
        assert p["frames_sent"] > 0 and p["frames_in_redis"] > 0
        assert 0 < p["frames_in_redis"] <= p["frames_sent"]
        assert p["server_cpu_s"] > 0 and p["frames_per_cpu_s"] > 0 and p["server_cpu_us_per_frame"] > 0
        assert p["redis_cpu_s"] >= 0 and p["window_s"] > 0
        assert p["rss_streaming_bytes"] > 0
        assert p["ingest_latency_ms"]["n"] > 0 and p["ingest_latency_ms"]["p50"] > 0
        if p["mode"] == "realtime":
            assert p["intended_fps"] == p["bots"] * 10
            if sys.platform == "linux":  # from /proc; a flood may keep a loop from ever idling
                assert p["server_wakeups_per_s"] > 0 and p["server_cpu_us_per_wakeup"] > 0
            assert p["offered_fps"] > 0 and p["send_lateness_ms"]["n"] > 0
            assert p["commands_written"] > 0 and p["commands_received"] > 0
            lat = p["command_latency_ms"]
            assert 0 < lat["p50"] <= lat["p99"] <= lat["max"]
        if p["target"] == "gateway":
            assert p["gateway_received_total"] >= p["frames_in_redis"]

    text = report.render(result)
    headings = ["physical limit", "Throughput and CPU", "Ratios", "Command latency", "overload"]
    if sys.platform == "linux":
        headings.append("Event-loop wake-ups")
    for heading in headings:
        assert heading in text
    report.plot(result, tmp_path / "plot.png")
    assert (tmp_path / "plot.png").stat().st_size > 1000


def test_hotpath_benchmark_runs_and_every_frame_reaches_redis(redis_url: str) -> None:
    """The hot-path benchmark drives a real gateway; its figures mean something only
    if every frame it handed over was published (20 ms frames, one and ten per read)."""
    import uvloop

    from bench.hotpath import measure

    for per_read in (1, 10):
        row = uvloop.run(measure(redis_url, frame_ms=20, frames=500, per_read=per_read, burst=100))
        assert row["frames"] == 500
        assert row["published"] == 500
        assert row["stored_xlen"] == 500
        assert row["inside_us_per_frame_median"] > 0


def test_floor_benchmark_runs_and_its_server_wakes_for_the_frames() -> None:
    """The do-nothing server the gateway's light-load figures are set against: it
    completes the bots' handshakes, receives their frames, and its CPU is read."""
    from bench.floor import measure

    row = measure(bots=5, frame_ms=100, window_s=1.0, warmup_s=0.5)
    assert row["offered_fps"] > 20  # 5 bots x 10 frames/s, give or take the window's edges
    assert row["server_cpu_us_per_frame"] >= 0  # (a second of 50 frames may cost under a clock tick)
    if sys.platform == "linux":  # the server's own loop woke for them
        assert row["wakeups_per_s"] > 0
