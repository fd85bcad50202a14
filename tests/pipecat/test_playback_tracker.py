"""Speaking state from the gateway's playback events (pure)."""

from __future__ import annotations

import pytest

pytest.importorskip("pipecat")

from workers.pipecat.playback import PlaybackTracker


def ev(entry: str, uid: str, **kw: object) -> dict[str, str]:
    return {"entry_id": entry, "utterance_id": uid, **{k: str(v) for k, v in kw.items()}}


def test_started_then_stopped_when_everything_written_has_played() -> None:
    t = PlaybackTracker()
    t.wrote("u1", "1-0", 1000.0)
    t.wrote("u1", "2-0", 500.0)
    assert t.event("playback_started", ev("1-0", "u1", duration_ms=1000)) == "started"
    assert t.event("playback_finished", ev("1-0", "u1", duration_ms=1500, played_ms=1500)) == "stopped"
    assert not t.speaking and not t.outstanding


def test_an_underrun_inside_a_response_is_not_a_stop() -> None:
    """The gateway ran dry mid-response and ended the utterance; more of it was written."""
    t = PlaybackTracker()
    t.wrote("u1", "1-0", 300.0)
    assert t.event("playback_started", ev("1-0", "u1")) == "started"
    t.wrote("u1", "2-0", 300.0)  # written late: the gateway's first part ends without it
    assert t.event("playback_finished", ev("1-0", "u1", duration_ms=300)) is None
    assert t.speaking
    assert t.event("playback_started", ev("2-0", "u1")) is None
    assert t.event("playback_finished", ev("2-0", "u1", duration_ms=300)) == "stopped"


def test_back_to_back_responses_do_not_flap() -> None:
    t = PlaybackTracker()
    t.wrote("u1", "1-0", 200.0)
    t.wrote("u2", "2-0", 200.0)
    assert t.event("playback_started", ev("1-0", "u1")) == "started"
    assert t.event("playback_finished", ev("1-0", "u1", duration_ms=200)) is None
    assert t.event("playback_started", ev("2-0", "u2")) is None
    assert t.event("playback_finished", ev("2-0", "u2", duration_ms=200)) == "stopped"


def test_an_interrupt_ends_this_and_older_utterances_not_newer_ones() -> None:
    t = PlaybackTracker()
    t.wrote("u1", "1-0", 5000.0)
    t.wrote("u2", "2-0", 5000.0)
    t.event("playback_started", ev("1-0", "u1"))
    t.wrote("u3", "3-0", 100.0)  # written after the interrupt
    assert t.event("playback_interrupted", ev("1-0", "u1", reason="interrupt")) is None
    assert t.event("playback_interrupted", ev("2-0", "u2", reason="interrupt", played_ms=0)) is None
    assert t.speaking, "u3 is still to play"
    assert t.event("playback_started", ev("3-0", "u3")) is None
    assert t.event("playback_finished", ev("3-0", "u3", duration_ms=100)) == "stopped"


def test_a_rejected_entry_is_not_waited_for() -> None:
    t = PlaybackTracker()
    t.wrote("u1", "1-0", 100.0)
    t.wrote("u1", "2-0", 100.0)
    t.event("playback_started", ev("1-0", "u1"))
    assert t.event("playback_finished", ev("1-0", "u1", duration_ms=100)) is None
    assert t.rejected("2-0") == "stopped"


def test_other_workers_audio_is_ignored() -> None:
    t = PlaybackTracker()
    assert t.event("playback_started", ev("9-0", "")) is None
    assert not t.speaking
