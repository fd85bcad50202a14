"""The recorder example plus a log of every frame handled, for the failover test.

    python -m tests.workers.seq_worker --out DIR [worker flags]

Each line of ``DIR/INSTANCE.jsonl`` is written through to the OS before the
frame is acknowledged, so a ``kill -9`` loses none of them.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from workers import cli
from workers.audio import AudioFrame
from workers.bot import Bot
from workers.examples import recorder


def main(argv: list[str] | None = None) -> int:
    p = cli.parser("seq_worker", __doc__ or "")
    p.add_argument("--out", required=True)
    ns = cli.parse(p, argv)
    settings = cli.settings(ns, "seq")
    worker = recorder.build(settings, Path(ns.out) / "wav")
    log = open(Path(ns.out) / f"{settings.instance_id}.jsonl", "a", buffering=1)  # noqa: SIM115

    @worker.on_audio
    async def note(bot: Bot, frame: AudioFrame) -> None:
        log.write(json.dumps({"bot": bot.bot_id, "conn": frame.conn, "seq": frame.seq}) + "\n")

    @worker.on_bot_start
    async def started(bot: Bot) -> None:
        log.write(json.dumps({"bot": bot.bot_id, "start": True}) + "\n")

    print(f"instance {settings.instance_id}", flush=True)
    return cli.run(worker, ns)


if __name__ == "__main__":
    sys.exit(main())
