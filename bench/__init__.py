"""Benchmarks: the gateway against a plain bridge, on a real redis-server.

    loadgen.py           many simulated bots per process, raw pre-masked frames (cheap to send)
    commander.py         a worker writing commands at a set rate, and a tap timing audio into Redis
    reference_bridge.py  the vendor's FastAPI example, extended to Redis the plain way
    redis_limit.py       the physical limit: redis-py XADD, pipelined and not
    procstat.py          CPU and RSS of a process, Redis INFO deltas
    profile.py           py-spy under load, folded into top functions
    run.py               the one command: scenarios -> bench/results/*.json
    report.py            tables for docs/BENCHMARKS.md and the plot, from the JSON
    interrupt_latency.py playback: interrupt latency and pacing (docs/PLAYBACK.md)

Run ``python -m bench.run --quick`` (about a minute) or ``python -m bench.run`` (the figures in
docs/BENCHMARKS.md).
"""
