"""The playback scheduler, driven by a fake clock: what goes out, in what order, when."""

from __future__ import annotations

import base64
import json

import msgpack
import numpy as np
import pytest

from gateway.commands import Command, parse_command
from gateway.exceptions import CommandRejected
from gateway.playback import Outgoing, PlaybackConfig, PlaybackScheduler

RATE = 48_000
CFG = PlaybackConfig(chunk_ms=100, lead_ms=300, max_held_s=120.0, max_entries=64, max_commands=8)


def audio(entry: str, seconds: float, rate: int = RATE, uid: str = "", value: int = 1000) -> Command:
    samples = np.full(int(seconds * rate), value, dtype="<i2")
    fields = {"command": "sendaudio", "audiochunk": samples.tobytes(), "sample_rate": rate}
    if uid:
        fields["utterance_id"] = uid
    return parse_command({b"msgpack": msgpack.packb(fields)}, "b", entry_id=entry)


def cmd(entry: str, **fields: object) -> Command:
    return parse_command({b"json": json.dumps(fields).encode()}, "b", entry_id=entry)


def chat(entry: str, text: str, final: bool, role: str = "assistant") -> Command:
    return cmd(entry, command="sendchat", role=role, text=text, is_final=final)


def interrupt(entry: str) -> Command:
    return cmd(entry, command="interrupt", action="clear_audio_queue")


class Driver:
    """Plays the socket's part: writes instantly, jumps the clock to each deadline."""

    def __init__(self, config: PlaybackConfig = CFG) -> None:
        self.s = PlaybackScheduler("b", config)
        self.now = 0.0
        self.log: list[tuple[float, Outgoing]] = []
        self.events: list[tuple[float, str, dict]] = []

    def submit(self, command: Command) -> None:
        self.s.submit(command, self.now)
        self._events()

    def _events(self) -> None:
        self.events += [(self.now, e.type, e.fields) for e in self.s.take_events()]

    def run(self, until: float) -> None:
        while True:
            out = self.s.next_send(self.now)
            self._events()
            if out is not None:
                self.s.sent(out, self.now)
                self.log.append((self.now, out))
                continue
            deadline = self.s.next_deadline()
            if deadline is None or deadline > until:
                self.now = until
                self.s.next_send(self.now) and None
                self._events()
                return
            self.now = max(self.now, deadline)

    def chunks(self) -> list[tuple[float, Outgoing]]:
        return [(t, o) for t, o in self.log if o.lane == "audio"]

    def acks(self) -> list[str]:
        return [a for _, o in self.log for a in o.acks]


def bot_queue(chunks: list[tuple[float, Outgoing]]) -> list[float]:
    """Audio queued at the modelled bot right after each chunk arrives."""
    end = 0.0
    queued = []
    for t, out in chunks:
        end = max(end, t) + out.samples / RATE
        queued.append(end - t)
    return queued


def test_ten_seconds_at_24k_paced_within_the_lead_without_gaps():
    d = Driver()
    d.submit(audio("1-0", 10.0, rate=24_000, uid="u1"))
    d.run(until=12.0)
    chunks = d.chunks()
    assert sum(o.samples for _, o in chunks) == 480_000
    assert all(o.samples == 4800 for _, o in chunks)
    payload = json.loads(chunks[0][1].text)
    assert payload["sample_rate"] == 48000 and payload["encoding"] == "pcm16"
    assert "utterance_id" not in payload
    assert len(base64.b64decode(payload["audiochunk"])) == 9600
    # The first chunks fill the lead at once; then one chunk per 100 ms.
    assert [round(t, 9) for t, _ in chunks[:3]] == [0.0, 0.0, 0.0]
    queued = bot_queue(chunks)
    assert max(queued) <= 0.3 + 1e-9
    assert min(queued[2:-1]) >= 0.2 - 1e-9  # never starves: >= lead - chunk
    assert chunks[-1][0] == pytest.approx(9.7)
    # Acked with the chunk that sends its last sample, not before.
    assert [a for _, o in chunks for a in o.acks] == ["1-0"]
    assert chunks[-1][1].acks == ["1-0"]
    types = [(round(t, 3), kind) for t, kind, _ in d.events]
    assert types == [(0.0, "playback_started"), (10.0, "playback_finished")]
    assert d.events[1][2] == {
        "utterance_id": "u1",
        "entry_id": "1-0",
        "played_ms": 10000,
        "duration_ms": 10000,
    }


def test_interrupt_jumps_every_queue_and_drops_all_held_audio():
    d = Driver()
    d.submit(audio("1-0", 60.0, uid="long"))
    d.submit(audio("2-0", 5.0, uid="next"))
    d.run(until=2.0)
    d.submit(chat("3-0", "still queued", final=True))
    d.submit(interrupt("4-0"))
    d.submit(interrupt("5-0"))  # a second one in the same breath is sent once
    out = d.s.next_send(d.now)
    assert out is not None and out.lane == "interrupt"
    assert out.acks == ["4-0", "1-0", "2-0", "5-0"]
    assert d.s.held_samples == 0 and d.s.held_entries == 0
    d.s.sent(out, d.now)
    nxt = d.s.next_send(d.now)
    assert nxt is not None and nxt.name == "sendchat"
    d.log.clear()
    d.run(until=5.0)
    assert d.chunks() == []
    interrupted = [f for _, kind, f in d.events if kind == "playback_interrupted"]
    assert [f["utterance_id"] for f in interrupted] == ["long", "next"]
    long = interrupted[0]
    # 2 s played at the interrupt; what the bot still held (the lead) is cut on Meet.
    assert long["played_ms"] == 2000 and long["dropped_ms"] == 58000
    assert 2000 < long["sent_ms"] <= 2300
    assert interrupted[1]["played_ms"] == 0 and interrupted[1]["dropped_ms"] == 5000


def test_audio_after_an_interrupt_plays_at_once():
    d = Driver()
    d.submit(audio("1-0", 3.0))
    d.run(until=1.0)
    d.submit(interrupt("2-0"))
    d.submit(audio("3-0", 1.0, uid="fresh"))
    d.log.clear()
    d.run(until=1.0)
    assert [o.lane for _, o in d.log[:4]] == ["interrupt", "audio", "audio", "audio"]


def test_utterances_play_back_to_back_in_order():
    d = Driver()
    d.submit(audio("1-0", 1.0, uid="a", value=100))
    d.submit(audio("2-0", 1.0, rate=22_050, uid="b", value=200))
    d.run(until=3.0)
    chunks = d.chunks()
    owners = [o.utterance.utterance_id for _, o in chunks]
    assert owners == ["a"] * 10 + ["b"] * 10
    assert min(bot_queue(chunks)[2:-1]) > 0.19  # no gap at the boundary either
    kinds = [(kind, f["utterance_id"], round(t, 3)) for t, kind, f in d.events]
    assert kinds == [
        ("playback_started", "a", 0.0),
        ("playback_finished", "a", 1.0),
        ("playback_started", "b", 1.0),
        ("playback_finished", "b", 2.0),
    ]


def test_entries_with_one_utterance_id_are_one_utterance():
    d = Driver()
    for i in range(5):
        d.submit(audio(f"{i}-0", 0.25, uid="tts"))
    d.submit(audio("9-0", 0.25))  # no id: an utterance of its own
    d.run(until=3.0)
    kinds = [(kind, f["utterance_id"]) for _, kind, f in d.events]
    assert kinds == [
        ("playback_started", "tts"),
        ("playback_finished", "tts"),
        ("playback_started", ""),
        ("playback_finished", ""),
    ]
    assert d.events[1][2]["duration_ms"] == 1250
    # A chunk spans entries: 1.25 s of one utterance in 13 chunks, the last short.
    tts = [o for _, o in d.chunks() if o.utterance.utterance_id == "tts"]
    assert [o.samples for o in tts] == [4800] * 12 + [2400]
    assert sorted(d.acks()) == ["0-0", "1-0", "2-0", "3-0", "4-0", "9-0"]


def test_streamed_entries_arriving_in_time_leave_no_gap():
    d = Driver()
    for i in range(20):  # 200 ms entries written every 150 ms: faster than real time
        d.submit(audio(f"{i}-0", 0.2, uid="s"))
        d.run(until=d.now + 0.15)
    d.run(until=10.0)
    assert d.s.counts["underruns"] == 0
    assert [k for _, k, _ in d.events] == ["playback_started", "playback_finished"]


def test_commands_go_out_at_once_in_stream_order_while_audio_plays():
    d = Driver()
    d.submit(audio("1-0", 2.0))
    d.run(until=0.5)
    d.submit(cmd("2-0", command="sendmsg", message="one"))
    d.submit(cmd("3-0", command="sendimg_url", img_url="https://x.test/a.png"))
    out = [d.s.next_send(d.now), d.s.next_send(d.now)]
    assert [o.entry_id for o in out] == ["2-0", "3-0"]


def test_interim_chat_is_coalesced_final_never_dropped():
    d = Driver()
    d.submit(chat("1-0", "He", final=False))
    d.submit(chat("2-0", "Hell", final=False))
    d.submit(chat("3-0", "Hello", final=False))
    d.submit(chat("4-0", "you said", final=False, role="user"))  # another role: kept
    d.submit(cmd("5-0", command="sendmsg", message="between"))
    d.submit(chat("6-0", "Hello w", final=False))
    d.submit(chat("7-0", "Hello world.", final=True))
    d.submit(chat("8-0", "Next", final=False))
    d.submit(chat("9-0", "Next one.", final=True))
    d.submit(chat("10-0", "Again.", final=True))
    d.run(until=1.0)
    sent = [(json.loads(o.text).get("text") or json.loads(o.text).get("message"), o.acks) for _, o in d.log]
    assert sent == [
        ("Hello", ["1-0", "2-0", "3-0"]),
        ("you said", ["4-0"]),
        ("between", ["5-0"]),
        ("Hello world.", ["6-0", "7-0"]),
        ("Next one.", ["8-0", "9-0"]),
        ("Again.", ["10-0"]),
    ]
    assert d.s.counts["coalesced"] == 4
    # Every interim that was replaced leaves a trace, naming what replaced it.
    superseded = [(f["entry_id"], f["superseded_by"]) for _, t, f in d.events if t == "command_superseded"]
    assert superseded == [("1-0", "2-0"), ("2-0", "3-0"), ("6-0", "7-0"), ("8-0", "9-0")]


def test_bounds_reject_with_queue_full():
    d = Driver(PlaybackConfig(max_held_s=3.0, max_entries=4))
    d.submit(audio("1-0", 2.0))
    with pytest.raises(CommandRejected) as err:
        d.submit(audio("2-0", 1.5))
    assert err.value.reason == "queue_full" and "3s" in err.value.detail
    for i in range(3):
        d.submit(audio(f"{i + 3}-0", 0.1))
    with pytest.raises(CommandRejected) as err:
        d.submit(audio("9-0", 0.1))
    assert err.value.reason == "queue_full" and "entries" in err.value.detail
    d.run(until=5.0)  # once played, room again
    d.submit(audio("10-0", 2.5))


def test_disconnect_reports_cut_utterances_and_acks_nothing_unsent():
    d = Driver()
    d.submit(audio("1-0", 5.0, uid="cut"))
    d.submit(chat("2-0", "pending", final=True))
    d.s.next_send(d.now)  # the chat goes first...
    d.run(until=1.0)
    acked = d.acks()
    d.s.abort(d.now)
    d.events += [(d.now, e.type, e.fields) for e in d.s.take_events()]
    assert "1-0" not in acked  # still pending in Redis: delivered again on reconnect
    kind, fields = d.events[-1][1:]
    assert kind == "playback_interrupted" and fields["reason"] == "disconnected"
    assert fields["played_ms"] == 1000
    assert d.s.next_send(d.now + 1) is None


def test_chunk_written_while_an_interrupt_arrives_is_not_counted():
    d = Driver()
    d.submit(audio("1-0", 1.0))
    out = d.s.next_send(0.0)  # taken: the socket is writing it...
    d.submit(interrupt("2-0"))  # ...when the interrupt arrives
    d.s.sent(out, 0.0)
    assert d.s.next_send(0.0).lane == "interrupt"
    assert d.s.next_send(0.0) is None and d.s.next_deadline() is None


def test_config_checks():
    with pytest.raises(ValueError):
        PlaybackConfig(chunk_ms=400, lead_ms=300)
