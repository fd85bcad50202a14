"""recorder: one WAV file per speaker per meeting (48 kHz mono PCM16), closed when the bot leaves.

Files go to ``OUT/BOT_ID/SPEAKER.wav``; a later meeting of the same bot, or a
takeover by another instance mid-meeting, starts ``SPEAKER.2.wav`` and so on
rather than overwrite (a takeover may repeat up to one read batch of audio at
the seam; see docs/WORKERS.md).
"""

from __future__ import annotations

import re
import wave
from collections.abc import Sequence
from pathlib import Path

from workers import cli
from workers.audio import AudioFrame
from workers.bot import Bot, Event
from workers.worker import Worker, WorkerSettings

_UNSAFE = re.compile(r"[^A-Za-z0-9_.@-]+")


def _safe(name: str) -> str:
    return _UNSAFE.sub("_", name).strip("._") or "unnamed"


class Recorder:
    """The open WAV files of the bots this instance owns."""

    def __init__(self, out_dir: Path) -> None:
        self.out_dir = out_dir
        self.files: dict[str, dict[str, wave.Wave_write]] = {}
        self.closed: list[Path] = []

    def _open(self, bot_id: str, speaker: str) -> wave.Wave_write:
        folder = self.out_dir / _safe(bot_id)
        folder.mkdir(parents=True, exist_ok=True)
        path, n = folder / f"{speaker}.wav", 1
        while path.exists():
            n += 1
            path = folder / f"{speaker}.{n}.wav"
        wf = wave.open(str(path), "wb")  # noqa: SIM115 (kept open across frames; closed in close())
        wf.setnchannels(1)
        wf.setsampwidth(2)
        wf.setframerate(48_000)
        return wf

    def write(self, frame: AudioFrame) -> None:
        speaker = _safe(
            frame.speaker_name if not frame.speaker_id else f"{frame.speaker_name}_{frame.speaker_id}"
        )
        files = self.files.setdefault(frame.bot_id, {})
        wf = files.get(speaker)
        if wf is None:
            wf = files[speaker] = self._open(frame.bot_id, speaker)
        # The header is patched on every write, so a killed process leaves a playable file.
        wf.writeframes(frame.pcm)

    def close(self, bot_id: str) -> None:
        for wf in self.files.pop(bot_id, {}).values():
            name = getattr(wf._file, "name", None)  # type: ignore[attr-defined]
            wf.close()
            if name:
                self.closed.append(Path(name))


def build(
    settings: WorkerSettings, out_dir: str | Path = "recordings", *, handle_signals: bool = True
) -> Worker:
    worker = Worker(settings, handle_signals=handle_signals)
    recorder = Recorder(Path(out_dir))
    worker.recorder = recorder  # type: ignore[attr-defined]

    @worker.on_audio
    async def record(bot: Bot, frame: AudioFrame) -> None:
        if frame.sample_rate != 48_000:
            return  # the contract says 48 kHz; anything else would corrupt the file
        recorder.write(frame)

    @worker.on_session_ended
    async def ended(bot: Bot, event: Event) -> None:
        recorder.close(bot.bot_id)

    @worker.on_bot_stop
    async def let_go(bot: Bot, reason: str) -> None:
        recorder.close(bot.bot_id)

    return worker


def main(argv: Sequence[str] | None = None) -> int:
    p = cli.parser("recorder", __doc__ or "")
    p.add_argument("--out", default="recordings", help="directory of the WAV files")
    ns = cli.parse(p, argv)
    return cli.run(build(cli.settings(ns, "recorder"), ns.out), ns)
