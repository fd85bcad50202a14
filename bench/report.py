"""Tables (Markdown) and the plot from a results file of :mod:`bench.run`.

.venv/bin/python -m bench.report bench/results/latest-full.json [--plot docs/benchmarks.png]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from bench.profile import is_boilerplate


def server_label(p: dict[str, Any]) -> str:
    """The server of a phase, with the CPU quota it ran under (``bench.run --cpu-quota``)."""
    quota = p.get("server_cpu_quota")
    return p["target"] if quota is None else f"{p['target']} ({quota:g} cores)"


def _f(v: Any, spec: str = ".0f") -> str:
    if v is None:
        return "-"
    if isinstance(v, float) and spec.endswith("%"):
        return format(v, spec)
    return format(v, spec)


def _kib(v: Any) -> str:
    return "-" if v is None else f"{v / 1024:.1f}"


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "|".join(" ---: " if i else " --- " for i in range(len(header))) + "|",
    ]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def limit_table(limit: list[dict[str, Any]]) -> str:
    rows = [
        [
            r["kind"],
            str(r["pcm_bytes"]),
            str(r["batch"]),
            _f(r["xadd_per_s"]),
            _f(r["client_cpu_us_per_xadd"], ".1f"),
            _f(r["redis_cpu_us_per_xadd"], ".1f"),
            _f(r["redis_xadd_usec_per_call"], ".1f"),
        ]
        for r in limit
    ]
    return table(
        [
            "client",
            "PCM bytes",
            "batch",
            "XADD/s",
            "client CPU µs/XADD",
            "Redis CPU µs/XADD",
            "Redis usec/call (commandstats)",
        ],
        rows,
    )


def pipeline_table(phases: list[dict[str, Any]]) -> str:
    """The gateway's writer per phase: how often it wrote, how much, and whether it paused."""
    rows = []
    for p in phases:
        pipe = p.get("gateway_pipeline")
        if p.get("failed") or not pipe:
            continue
        share = p.get("server_system_share")
        rows.append(
            [
                p["phase"],
                str(p["bots"]),
                _f(pipe["publish_roundtrips_per_s"]),
                _f(pipe["entries_per_roundtrip"], ".1f"),
                _f(pipe["publish_roundtrip_mean_ms"], ".2f"),
                _f(pipe["backpressure_pauses"]),
                _f(pipe["overload_shed"]),
                "-" if share is None else f"{share:.0%}",
            ]
        )
    return table(
        [
            "phase",
            "bots",
            "pipelines/s",
            "frames per pipeline",
            "pipeline round trip ms",
            "backpressure pauses",
            "frames shed (overload)",
            "kernel share of gateway CPU",
        ],
        rows,
    )


def wakeup_table(phases: list[dict[str, Any]]) -> str:
    """How often each server's event loop went to sleep and woke again, and what a wake-up cost.

    Below a few wake-ups a second the loop never ran out of work (saturated): a cost
    per wake-up means nothing there.
    """
    rows = []
    for p in phases:
        if p.get("failed") or "server_wakeups_per_s" not in p:
            continue
        busy = p["server_wakeups_per_s"] < 10
        rows.append(
            [
                p["phase"],
                server_label(p),
                str(p["bots"]),
                _f(p["redis_fps"]),
                _f(p["server_wakeups_per_s"]),
                _f(p.get("server_wakeups_per_frame"), ".2f"),
                "never idle" if busy else _f(p.get("server_cpu_us_per_wakeup"), ".1f"),
                _f(p.get("server_cpu_us_per_frame"), ".1f"),
            ]
        )
    return table(
        [
            "phase",
            "server",
            "bots",
            "in Redis f/s",
            "loop wake-ups/s",
            "wake-ups per frame",
            "server CPU µs per wake-up",
            "server CPU µs per frame",
        ],
        rows,
    )


def phase_table(phases: list[dict[str, Any]]) -> str:
    rows = []
    for p in phases:
        if p.get("failed"):
            rows.append(
                [p["phase"], server_label(p), str(p["bots"]), "FAILED: " + p.get("errors", "")[:80]]
                + [""] * 10
            )
            continue
        ratio = p.get("offered_ratio")
        rows.append(
            [
                p["phase"],
                server_label(p),
                str(p["bots"]),
                _f(p["intended_fps"]) if p["intended_fps"] else "flood",
                _f(p["offered_fps"]) + (f" ({ratio:.0%})" if ratio else ""),
                _f(p["send_lateness_ms"]["p99"], ".1f"),
                _f(p["redis_fps"]),
                f"{p['frames_lost']} ({p['lost_ratio']:.1%})" if p["lost_ratio"] else str(p["frames_lost"]),
                _f(p["server_cores"], ".2f"),
                _f(p["server_cpu_us_per_frame"], ".1f"),
                _f(p["frames_per_cpu_s"]),
                # Only where the server kept up: a saturated server's bots/core is not a capacity.
                _f(p["bots"] / p["server_cores"])
                if p["mode"] == "realtime" and p["server_cores"] and p["kept_up"]
                else "-",
                _f(p["redis_cpu_us_per_frame"], ".1f"),
                _f(p["loadgen_cores"], ".2f") + " / " + _f(p["machine_busy_cores"], ".2f"),
                "yes" if p["kept_up"] else "**no**",
            ]
        )
    return table(
        [
            "phase",
            "server",
            "bots",
            "intended f/s",
            "offered f/s",
            "send late p99 ms",
            "in Redis f/s",
            "lost",
            "server cores",
            "server CPU µs/frame",
            "frames/CPU-s",
            "bots/core (bots ÷ server cores)",
            "Redis CPU µs/frame",
            "loadgen / machine cores",
            "kept up",
        ],
        rows,
    )


def latency_table(phases: list[dict[str, Any]]) -> str:
    rows = []
    for p in phases:
        if p.get("failed"):
            continue
        c, t = p["command_latency_ms"], p["ingest_latency_ms"]
        rows.append(
            [
                p["phase"],
                server_label(p),
                str(p["bots"]),
                f"{p['commands_received']}/{p['commands_written']}",
                _f(c["p50"], ".2f"),
                _f(c["p99"], ".2f"),
                _f(c["max"], ".1f"),
                _f(t["p50"], ".1f"),
                _f(t["p99"], ".1f"),
                _f(t["max"], ".1f"),
                _kib(p["rss_per_bot_connected_bytes"]),
                _kib(p["rss_per_bot_streaming_bytes"]),
            ]
        )
    return table(
        [
            "phase",
            "server",
            "bots",
            "commands received/written",
            "cmd p50 ms",
            "cmd p99 ms",
            "cmd max ms",
            "audio→Redis p50 ms",
            "p99 ms",
            "max ms",
            "RSS/bot connected KiB",
            "RSS/bot streaming KiB",
        ],
        rows,
    )


def overload_table(phases: list[dict[str, Any]]) -> str:
    rows = []
    for p in phases:
        if p.get("failed"):
            continue
        closed = (
            ", ".join(
                f"{ch} {code}x{n}" for ch, codes in p["closed_by_server"].items() for code, n in codes.items()
            )
            or "none"
        )
        dropped = ", ".join(f"{k} {v:.0f}" for k, v in (p.get("gateway_dropped") or {}).items()) or "-"
        rows.append(
            [
                p["phase"],
                server_label(p),
                str(p["bots"]),
                str(p["frames_sent"]),
                str(p["frames_blocked_at_bot"]),
                "-" if p.get("loadgen_behind_s") is None else f"{p['loadgen_behind_s']:.1f}",
                str(p["frames_on_closed_socket"]),
                _f(p["frames_in_redis"]),
                str(p["frames_lost"]),
                closed,
                dropped,
                str(p.get("gateway_error_logs", "-")),
            ]
        )
    return table(
        [
            "phase",
            "server",
            "bots",
            "frames written by bots",
            "not written (socket full)",
            "generator behind, most (s of audio held by a bot)",
            "not written (closed)",
            "frames in Redis",
            "lost after the bot wrote them",
            "connections closed by the server",
            "gateway drops (counted)",
            "gateway error log lines",
        ],
        rows,
    )


def ratio_table(phases: list[dict[str, Any]]) -> str:
    by: dict[tuple[str, int], dict[str, dict[str, Any]]] = {}
    for p in phases:
        if not p.get("failed"):
            by.setdefault((p["phase"], p["bots"]), {})[p["target"]] = p
    rows = []
    for (name, bots), pair in by.items():
        g, r = pair.get("gateway"), pair.get("reference")
        if not g or not r:
            continue

        def ratio(key: str, sub: str | None = None, g=g, r=r) -> str:  # type: ignore[no-untyped-def]
            a, b = (g[key][sub], r[key][sub]) if sub else (g[key], r[key])
            return "-" if not a or not b else f"{a / b:.2f}x"

        rows.append(
            [
                name,
                str(bots),
                ratio("frames_per_cpu_s"),
                ratio("redis_fps"),
                ratio("redis_cpu_us_per_frame"),
                ratio("command_latency_ms", "p99"),
                ratio("rss_per_bot_streaming_bytes"),
            ]
        )
    return table(
        [
            "phase",
            "bots",
            "frames/CPU-s (gateway ÷ ref)",
            "frames into Redis/s",
            "Redis CPU/frame",
            "cmd p99",
            "RSS/bot",
        ],
        rows,
    )


def commands_table(phases: list[dict[str, Any]]) -> str:
    """Commands with no audio: what one costs each server, and how fast it arrives."""
    reference = {p["bots"]: p for p in phases if p["target"] == "reference" and not p.get("failed")}
    rows = []
    for p in phases:
        if p.get("failed"):
            continue
        ref = reference.get(p["bots"])
        ratio = "-"
        if (
            p["target"] == "gateway"
            and ref
            and p["server_cpu_us_per_command"]
            and ref["server_cpu_us_per_command"]
        ):
            ratio = f"{ref['server_cpu_us_per_command'] / p['server_cpu_us_per_command']:.2f}x"
        c = p["command_latency_ms"]
        rows.append(
            [
                server_label(p),
                str(p["bots"]),
                _f(p["commands_written"] / p["window_s"] if p["window_s"] else None),
                f"{p['commands_received']}/{p['commands_written']}",
                _f(p["server_cores"], ".3f"),
                _f(p["server_cpu_us_per_command"], ".1f"),
                _f(p["server_wakeups_per_command"], ".2f"),
                ratio,
                _f(c["p50"], ".2f"),
                _f(c["p99"], ".2f"),
                _f(c["max"], ".1f"),
            ]
        )
    return table(
        [
            "server",
            "bots",
            "commands/s",
            "received/written",
            "server cores",
            "server CPU µs per command",
            "wake-ups per command",
            "commands per CPU-s, gateway ÷ ref",
            "p50 ms",
            "p99 ms",
            "max ms",
        ],
        rows,
    )


def profile_section(phases: list[dict[str, Any]], top: int = 15) -> str:
    out = []
    for p in phases:
        prof = p.get("profile")
        if not prof:
            continue
        head = f"#### py-spy: {p['target']}, {p['phase']}, {p['bots']} bots"
        if not prof.get("ok"):
            out.append(f"{head}\n\nnot available: {prof.get('command')}")
            continue
        us = p.get("server_cpu_us_per_frame") or 0.0
        rows = [
            [r["function"].replace("|", "\\|"), f"{r['share']:.1%}", f"{r['share'] * us:.1f}"]
            for r in prof["self"][:top]
        ]
        incl = [
            [r["function"].replace("|", "\\|"), f"{r['share']:.1%}", f"{r['share'] * us:.1f}"]
            for r in [r for r in prof["inclusive"] if not is_boilerplate(r["function"])][:top]
        ]
        files = [
            [r["file"], f"{r['share']:.1%}", f"{r['share'] * us:.1f}"] for r in prof["by_file_self"][:12]
        ]
        out.append(
            f"{head} ({prof['samples']} samples, {us:.1f} µs CPU per frame written to Redis)\n\n"
            f"Self time (innermost frame):\n\n{table(['function', 'share', 'µs/frame'], rows)}\n\n"
            f"Inclusive (anywhere on the stack):\n\n{table(['function', 'share', 'µs/frame'], incl)}\n\n"
            f"Self time by file:\n\n{table(['file', 'share', 'µs/frame'], files)}"
        )
    return "\n\n".join(out)


def render(result: dict[str, Any]) -> str:
    meta = result["meta"]
    lb, la = meta.get("load_before", {}), meta.get("load_after", {})

    def loads(d: dict[str, Any]) -> str:
        return " / ".join(f"{d.get(k, 0):.2f}" for k in ("loadavg_1m", "loadavg_5m", "loadavg_15m"))

    dirty = " (gateway/ with uncommitted changes)" if meta.get("gateway_dirty") else ""
    parts = [
        f"Config `{meta['config']}`, {meta['started']} - {meta.get('finished', '?')},"
        f" commit {meta.get('commit')}{dirty}, Python {meta['python']}, Redis {meta.get('redis_version')},"
        f" {meta['cpus']} CPUs. Load average before {loads(lb)}, after {loads(la)}.",
    ]
    if pinned := meta.get("pinned"):
        parts[0] += (
            f" The server under test ran on CPU {pinned['server']}; Redis, the load generator and"
            f" the command writer on CPU {pinned['harness']}."
        )
    if result.get("limit"):
        parts.append(
            "### The physical limit: the same XADD from redis-benchmark and redis-py\n\n"
            + limit_table(result["limit"])
        )
    phases = [p for p in result["phases"] if p["mode"] != "commands"]
    commands = [p for p in result["phases"] if p["mode"] == "commands"]
    parts.append("### Throughput and CPU\n\n" + phase_table(phases))
    if any(p.get("gateway_pipeline") for p in phases):
        parts.append("### The gateway's writer (window of each phase)\n\n" + pipeline_table(phases))
    if any(p.get("server_wakeups_per_s") for p in phases):
        parts.append("### Event-loop wake-ups (window of each phase)\n\n" + wakeup_table(phases))
    parts.append("### Ratios, gateway ÷ reference bridge\n\n" + ratio_table(phases))
    parts.append("### Command latency, audio latency, memory\n\n" + latency_table(phases))
    parts.append("### Where frames went (overload)\n\n" + overload_table(phases))
    if commands:
        parts.append(
            "### Commands alone (no audio; CPU includes the idle server's own timers)\n\n"
            + commands_table(commands)
        )
    prof = profile_section(phases)
    if prof:
        parts.append("### Profiles\n\n" + prof)
    return "\n\n".join(parts) + "\n"


def plot(result: dict[str, Any], path: Path, phase: str = "realtime-100ms") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(15, 4.2))
    styles = {"gateway": ("tab:blue", "o"), "reference": ("tab:red", "s")}
    for target, (color, marker) in styles.items():
        rows = sorted(
            (
                p
                for p in result["phases"]
                if p["phase"] == phase and p["target"] == target and not p.get("failed")
            ),
            key=lambda p: p["bots"],
        )
        if not rows:
            continue
        bots = [p["bots"] for p in rows]
        label = "gateway" if target == "gateway" else "reference bridge"
        ax1.plot(
            bots,
            [p["command_latency_ms"]["p99"] for p in rows],
            marker=marker,
            color=color,
            label=f"{label} p99",
        )
        ax1.plot(
            bots,
            [p["command_latency_ms"]["p50"] for p in rows],
            marker=marker,
            color=color,
            linestyle="--",
            alpha=0.6,
            label=f"{label} p50",
        )
        ax2.plot(bots, [p["server_cores"] for p in rows], marker=marker, color=color, label=label)
        ax3.plot(
            bots,
            [p["redis_fps"] / p["intended_fps"] if p["intended_fps"] else 0 for p in rows],
            marker=marker,
            color=color,
            label=label,
        )
    ax1.set(
        xlabel="real-time bots (100 ms frames)",
        ylabel="command latency, ms (worker XADD → bot)",
        title="Command delivery latency",
        yscale="log",
    )
    ax2.set(
        xlabel="real-time bots (100 ms frames)",
        ylabel="server CPU, cores (process CPU time / wall)",
        title="Server CPU",
    )
    ax3.set(
        xlabel="real-time bots (100 ms frames)",
        ylabel="frames into Redis ÷ frames intended",
        title="Keeping up (1.0 = all audio, on time)",
    )
    for ax in (ax1, ax2, ax3):
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    meta = result["meta"]
    fig.suptitle(
        f"gateway vs reference bridge, one Redis, {meta['cpus']} cores, "
        + ("server on a core of its own" if meta.get("pinned") else "all shared")
        + f" ({meta['started']})",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description="Render bench results")
    parser.add_argument("results", type=Path)
    parser.add_argument("--plot", type=Path, help="write the PNG here")
    parser.add_argument("--out", type=Path, help="write the Markdown here (default: stdout)")
    args = parser.parse_args()
    result = json.loads(args.results.read_text())
    text = render(result)
    if args.out:
        args.out.write_text(text)
    else:
        print(text)
    if args.plot:
        plot(result, args.plot)


if __name__ == "__main__":
    main()
