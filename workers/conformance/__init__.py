"""The conformance kit: does a worker, in any language, share bots in a group as the contract says?

::

    python -m workers.conformance --worker "node workers/node/worker.js"
    python -m workers.conformance --worker "python -m workers greeter" --worker "node workers/node/worker.js"

One command runs a gateway (on a redis-server of its own), simulated bots and
N instances of the worker command(s), crashes, pauses and stops instances, and
checks from outside: bots already connected at start are found; one owner at
a time; takeover within ``lease_ttl_s + claim_interval_s`` after ``kill -9``
and after a pause; a clean hand-back on SIGTERM; no frame skipped; every
command delivered; every bot let go when its meeting ends.

What a worker under test must do is in ``docs/WORKERS.md`` ("The conformance
kit"): take its settings from ``MEETSTREAM_*`` variables, write the group's
journal, and in conformance mode record each frame it handles and answer pings.
"""

from workers.conformance.kit import DEFAULT_WORKER, KitConfig, Report, run, run_sync

__all__ = ["DEFAULT_WORKER", "KitConfig", "Report", "run", "run_sync"]
