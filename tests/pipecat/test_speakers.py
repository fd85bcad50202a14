"""The speaker policies, fed frames directly (pure)."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("pipecat")

from workers.pipecat.speakers import RATE, SpeakerMixer

FRAME = RATE // 50  # 20 ms


def tone(freq: float, n: int = FRAME, start: int = 0, amp: float = 0.2) -> np.ndarray:
    t = (np.arange(n) + start) / RATE
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def test_one_speaker_passes_at_once_and_whole() -> None:
    mixer = SpeakerMixer("mix")
    out = [mixer.push("a", "Ada", tone(220, start=i * FRAME)) for i in range(10)]
    assert all(len(blocks) == 1 for blocks in out), "one speaker must not wait for anyone"
    joined = np.concatenate([b.samples for blocks in out for b in blocks])
    np.testing.assert_allclose(joined, tone(220, 10 * FRAME), atol=1e-6)
    assert {b.speaker_id for blocks in out for b in blocks} == {"a"}


def test_two_speakers_at_once_are_summed_sample_aligned() -> None:
    mixer = SpeakerMixer("mix")
    blocks = []
    for i in range(20):
        blocks += mixer.push("a", "Ada", tone(220, start=i * FRAME))
        blocks += mixer.push("b", "Bob", tone(330, start=i * FRAME, amp=0.3))
    blocks += mixer.flush()
    joined = np.concatenate([b.samples for b in blocks])
    # Ada's first frame went before anyone else was heard; Bob joins from the next block,
    # and from then on both streams are summed whole: no sample lost or repeated.
    n = 21 * FRAME
    bob = np.concatenate((np.zeros(FRAME, np.float32), tone(330, 20 * FRAME, amp=0.3)))
    assert len(joined) == n
    np.testing.assert_allclose(
        joined, np.concatenate((tone(220, 20 * FRAME), np.zeros(FRAME))) + bob, atol=1e-5
    )
    assert blocks[-1].speaker_id == "b", "the loudest contributor names the block"
    assert set(blocks[5].speakers) == {"a", "b"}


def test_a_speaker_who_stops_is_not_waited_for_beyond_the_skew() -> None:
    mixer = SpeakerMixer("mix", max_skew_ms=60)
    for i in range(5):
        mixer.push("a", "Ada", tone(220, start=i * FRAME))
        mixer.push("b", "Bob", tone(330, start=i * FRAME))
    # Bob stops (his last frame pairs with Ada's next); Ada goes on. Her frames are held
    # at most 60 ms (3 frames), then flow; nothing of hers is lost.
    released = [len(mixer.push("a", "Ada", tone(220, start=(5 + i) * FRAME))) for i in range(10)]
    assert released[:4] == [1, 0, 0, 0] and all(n >= 1 for n in released[4:])
    assert sum(released) == 10
    assert mixer.speakers == ["a"], "a silent speaker is forgotten after the skew"
    later = [len(mixer.push("a", "Ada", tone(220))) for _ in range(3)]
    assert later == [1, 1, 1], "once forgotten, one speaker flows without delay again"


def test_active_speaker_switches_to_a_louder_one_after_some_frames() -> None:
    mixer = SpeakerMixer("active", switch_frames=3)
    passed: list[str] = []
    for _ in range(5):
        passed += [b.speaker_id for b in mixer.push("a", "Ada", tone(220, amp=0.05))]
        passed += [b.speaker_id for b in mixer.push("b", "Bob", tone(330, amp=0.5))]
    assert passed[:2] == ["a", "a"], "the first speaker is active until the other is louder 3 times"
    assert passed[-1] == "b" and mixer.active_speaker == "b"
    assert mixer.dropped_samples > 0


def test_per_speaker_tags_each_stream() -> None:
    mixer = SpeakerMixer("per_speaker")
    [a] = mixer.push("a", "Ada", tone(220))
    [b] = mixer.push("", "Bob", tone(330))
    assert (a.source, a.speaker_name) == ("a", "Ada")
    assert b.source == "Bob", "a legacy frame without an id is keyed by its name"


def test_bad_input_is_refused_clearly() -> None:
    with pytest.raises(ValueError, match="speaker policy"):
        SpeakerMixer("loudest")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="float32"):
        SpeakerMixer().push("a", "Ada", np.zeros(10, np.int16))
