"""greeter: posts a chat message when a bot is ready."""

from __future__ import annotations

from collections.abc import Sequence

from workers import cli
from workers.bot import Bot, Event
from workers.worker import Worker, WorkerSettings

DEFAULT_TEXT = "Hello! I'm here and listening."


def build(settings: WorkerSettings, text: str = DEFAULT_TEXT, *, handle_signals: bool = True) -> Worker:
    worker = Worker(settings, handle_signals=handle_signals)

    @worker.on_ready
    async def greet(bot: Bot, event: Event) -> None:
        await bot.chat(text)

    return worker


def main(argv: Sequence[str] | None = None) -> int:
    p = cli.parser("greeter", __doc__ or "")
    p.add_argument("--text", default=DEFAULT_TEXT)
    ns = cli.parse(p, argv)
    return cli.run(build(cli.settings(ns, "greeter"), ns.text), ns)
