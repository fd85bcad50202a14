"""The control channel's outbox sleeps until a deadline without spinning on
uvloop, whose clock and timers tick in whole milliseconds."""

from __future__ import annotations

import asyncio

import pytest

from gateway.commands import validate_command
from gateway.outbox import Outbox


@pytest.mark.parametrize("ahead_s", [0.0002, 0.0012, 0.0019, 0.0207])
def test_waiting_for_a_deadline_wakes_a_few_times_not_hundreds(ahead_s: float) -> None:
    """Paced audio waits for deadlines that fall between clock ticks. A timer for
    less than a tick fired at once, and the send loop went round and round until
    the clock moved (92 wake-ups for one deadline 1.2 ms away)."""
    uvloop = pytest.importorskip("uvloop")

    async def main() -> tuple[int, float]:
        outbox = Outbox(limit=10)
        deadline = outbox.clock() + ahead_s
        wakeups = 0
        while outbox.clock() < deadline and wakeups < 1000:  # as _send_commands does
            await outbox.wait(deadline)
            wakeups += 1
        return wakeups, outbox.clock() - deadline

    wakeups, late_s = uvloop.run(main())
    assert wakeups <= 3, f"{wakeups} wake-ups for one deadline {ahead_s * 1000} ms away"
    assert late_s >= 0


def test_a_command_still_wakes_the_outbox_long_before_its_deadline() -> None:
    async def main() -> str:
        outbox = Outbox(limit=10, bot_id="b1")
        waiter = asyncio.ensure_future(outbox.wait(outbox.clock() + 30))
        await asyncio.sleep(0.01)
        command = validate_command({"command": "sendmsg", "message": "hi"}, "b1")
        command.entry_id = "1-0"
        outbox.put(command)
        await asyncio.wait_for(waiter, 5)
        out = outbox.scheduler.next_send(outbox.clock())
        assert out is not None
        return out.text

    assert '"message":"hi"' in asyncio.run(main())


def test_settle_wakes_the_sender_only_if_something_is_left() -> None:
    """The reader writes due commands itself and then settles the outbox: a sender
    woken for nothing is a wasted task switch per command, a sender not woken for a
    command left behind (the socket was busy) would strand it until the next one."""

    def command(n: int):  # type: ignore[no-untyped-def]
        c = validate_command({"command": "sendmsg", "message": str(n)}, "b1")
        c.entry_id = f"{n}-0"
        return c

    async def main() -> None:
        outbox = Outbox(limit=10, bot_id="b1")
        waiter = asyncio.ensure_future(outbox.wait(None))
        await asyncio.sleep(0.01)
        outbox.put(command(1), wake=False)
        assert outbox.scheduler.next_send(outbox.clock()) is not None  # written by the caller
        outbox.settle()
        await asyncio.sleep(0.01)
        assert not waiter.done()  # nothing left: the sender sleeps on
        outbox.put(command(2), wake=False)  # the caller could not write this one
        outbox.settle()
        await asyncio.wait_for(waiter, 5)
        assert outbox.scheduler.next_send(outbox.clock()) is not None

    asyncio.run(main())
