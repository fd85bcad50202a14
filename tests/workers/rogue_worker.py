"""An SDK worker that ignores its lease's local validity: it dispatches what it read even
after its lease may have run out. The conformance kit must catch it (one owner at a time).

    python -m tests.workers.rogue_worker
"""

from __future__ import annotations

import math
import sys

from workers import runner
from workers.examples import greeter


class _NoLocalValidity(runner.BotRunner):
    """``valid_until`` always infinite: the bug a worker written from scratch may have."""

    @property  # type: ignore[override]
    def valid_until(self) -> float:
        return math.inf

    @valid_until.setter
    def valid_until(self, value: float) -> None:
        pass


# The Worker looks the runner class up in workers.runner each time it takes a bot.
runner.BotRunner = _NoLocalValidity  # type: ignore[misc]

if __name__ == "__main__":
    sys.exit(greeter.main(sys.argv[1:]))
