"""``python -m workers NAME [flags]``: run an example worker (greeter, recorder, bargein, announcer)."""

from __future__ import annotations

import importlib
import sys

EXAMPLES = ("greeter", "recorder", "bargein", "announcer")


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] not in EXAMPLES:
        print(f"usage: python -m workers {{{','.join(EXAMPLES)}}} [--help]", file=sys.stderr)
        return 2
    module = importlib.import_module(f"workers.examples.{args[0]}")
    return int(module.main(args[1:]) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
