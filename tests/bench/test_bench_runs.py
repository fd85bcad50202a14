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
        ("gateway", "commands"),
        ("reference", "commands"),
    }
    for p in result["phases"]:
        assert not p.get("failed"), p.get("errors")
        assert p["bots_connected"] == p["bots"] and p["connect_failures"] == 0
        assert 0 < p["bot_close_s_max"] < 15  # every bot saw its closing handshake through
        if p["mode"] == "commands":  # no audio: every command arrives, and what one cost is read
            assert p["frames_sent"] == 0 and p["frames_in_redis"] == 0
            assert p["commands_written"] > 0 and p["commands_received"] == p["commands_written"]
            assert p["server_cpu_us_per_command"] > 0 and p["kept_up"]
            lat = p["command_latency_ms"]
            assert 0 < lat["p50"] <= lat["p99"] <= lat["max"]
            continue
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
    headings = [
        "physical limit",
        "Throughput and CPU",
        "Ratios",
        "Command latency",
        "overload",
        "Commands alone",
    ]
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


def test_grouped_sends_share_instants_and_spread_sends_give_each_bot_its_own() -> None:
    """--group-ms: the generator's default writes its bots' frames in 5 ms groups, at the
    same instants in every process; 0 gives each bot a slot of its own, the processes'
    slots interleaved, as independent bots send."""
    from bench.loadgen import LoadGen, LoadSpec, send_groups

    grouped = send_groups(100, 100, 5.0, offset=0.5)  # the offset only moves per-bot slots
    assert [at for at, _ in grouped] == pytest.approx([g * 0.005 for g in range(20)])
    assert sorted(i for _, members in grouped for i in members) == list(range(100))
    assert all(len(members) == 5 for _, members in grouped)

    spread = send_groups(50, 100, 0, offset=0.5)
    assert [list(members) for _, members in spread] == [[i] for i in range(50)]
    assert [at for at, _ in spread] == pytest.approx([(i + 0.5) * 0.002 for i in range(50)])

    specs = LoadGen(LoadSpec(url="ws://x", bot_ids=[f"b{i}" for i in range(100)], group_ms=0), 2).specs
    assert [spec.offset for spec in specs] == [0.0, 0.5]
    assert [len(spec.bot_ids) for spec in specs] == [50, 50]


def test_a_loop_that_never_idled_has_no_cost_per_wakeup() -> None:
    """A saturated server hardly ever sleeps: dividing its CPU by a wake-up or two
    would print a meaningless figure, so the table says so instead."""
    base = {"phase": "realtime-20ms", "bots": 200, "redis_fps": 10_000.0, "server_cpu_us_per_frame": 25.0}
    rows = report.wakeup_table(
        [
            {
                **base,
                "target": "gateway",
                "server_wakeups_per_s": 1900.0,
                "server_wakeups_per_frame": 0.19,
                "server_cpu_us_per_wakeup": 136.4,
            },
            {
                **base,
                "target": "reference",
                "server_wakeups_per_s": 0.1,
                "server_wakeups_per_frame": 0.0,
                "server_cpu_us_per_wakeup": 10_000_000.0,
            },
        ]
    ).splitlines()
    assert "| 136.4 |" in rows[2]
    assert "| never idle |" in rows[3] and "10000000" not in rows[3]
