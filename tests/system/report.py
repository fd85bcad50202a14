"""The day's report: the ledger as JSON, a markdown summary, and a timeline plot
(frames/s, commands/s, latency, ready replicas, with a mark at every fault)."""

from __future__ import annotations

import json
import subprocess
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from tests.system.ledger import Ledger


def build_commit() -> str:
    """``git describe --always --dirty`` of the tree (dirty: uncommitted changes ran too)."""
    try:
        out = subprocess.run(
            ["git", "describe", "--always", "--dirty"],
            capture_output=True,
            text=True,
            timeout=10,
            cwd=Path(__file__).resolve().parent,
        )
        return out.stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3f}" if value < 10 else f"{value:.1f}"
    return str(value)


def _lat(summary: dict[str, Any] | None) -> str:
    if not summary or not summary.get("n"):
        return "-"
    return f"{_fmt(summary['p50'])} / {_fmt(summary['p99'])} (max {_fmt(summary['max'])}, n={summary['n']})"


def timeline(ledger: Ledger) -> dict[str, Any]:
    """Per-second series from the raw records, seconds from the start of the day."""
    d = ledger.d
    t0 = d.t0
    span = int(d.plan.seconds) + 10
    sent = np.zeros(span)
    stored = np.zeros(span)
    written = np.zeros(span)
    delivered = np.zeros(span)
    frame_lat: dict[int, list[float]] = defaultdict(list)
    cmd_lat: dict[int, list[float]] = defaultdict(list)

    def sec(t: float) -> int:
        return min(span - 1, max(0, int(t - t0)))

    for bot, rec in d.bots.items():
        cols = d.audit_frames.get(bot, {"idx": [], "ms": []})
        first_ms: dict[int, int] = {}
        for idx, ms in zip(cols["idx"], cols["ms"], strict=True):
            first_ms.setdefault(idx, ms)
            stored[sec(ms / 1000)] += 1
        for idx, (t, link) in enumerate(zip(rec["frame_t"], rec["frame_link"], strict=True)):
            if link >= 0:
                sent[sec(t)] += 1
                if idx in first_ms:
                    frame_lat[sec(t)].append(first_ms[idx] / 1000 - t)
        for t, kind, _tag, chunk, _link in rec["received"]:
            if kind != "audio" or chunk == 0:
                delivered[sec(t)] += 1
    entries: dict[tuple[str, str], float] = {}
    for lines in d.worker_lines.values():
        for f in lines:
            if f[0] == "C":
                ms = int(f[5].partition("-")[0])
                written[sec(ms / 1000)] += 1
                entries[(f[2], f"{f[3]}:{f[4]}")] = ms / 1000
    for bot, rec in d.bots.items():
        for t, kind, tag, chunk, _link in rec["received"]:
            key = (bot, f"{'say' if kind == 'audio' else kind}:{tag}")
            if key in entries and (kind != "audio" or chunk == 0):
                cmd_lat[sec(t)].append(t - entries.pop(key))
    ready = np.zeros(span)
    for rep in d.replicas.values():
        # The last probe's answer holds until the next one (probes come about once a second,
        # less often under load): a second without a probe is not a second not ready.
        probes = sorted(rep["probes"])
        gone = rep.get("exited_at") or rep.get("terminated_at") or float("inf")
        i, state = 0, False
        for s in range(span):
            end = t0 + s + 1
            while i < len(probes) and probes[i][0] < end:
                state = probes[i][1]
                i += 1
            if i and end <= gone + 1:
                ready[s] += 1 if state else 0

    def q(series: dict[int, list[float]], p: float) -> list[float | None]:
        return [float(np.percentile(series[s], p)) if series.get(s) else None for s in range(span)]

    return {
        "t": list(range(span)),
        "frames_sent": sent.tolist(),
        "frames_stored": stored.tolist(),
        "commands_written": written.tolist(),
        "commands_delivered": delivered.tolist(),
        "frame_p50": q(frame_lat, 50),
        "frame_p99": q(frame_lat, 99),
        "command_p50": q(cmd_lat, 50),
        "command_p99": q(cmd_lat, 99),
        "ready_replicas": ready.tolist(),
    }


def plot(ledger: Ledger, series: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = series["t"]
    fig, axes = plt.subplots(4, 1, figsize=(13, 11), sharex=True)
    ax = axes[0]
    ax.plot(t, series["frames_sent"], label="frames sent by bots /s", lw=1.2)
    ax.plot(t, series["frames_stored"], label="frames stored in Redis /s", lw=1.2)
    ax.set_ylabel("frames/s")
    ax.legend(loc="lower left", fontsize=8)
    ax = axes[1]
    ax.plot(t, series["commands_written"], label="commands written /s", lw=1.2)
    ax.plot(t, series["commands_delivered"], label="commands received by bots /s", lw=1.2)
    ax.set_ylabel("commands/s")
    ax.legend(loc="upper left", fontsize=8)
    ax = axes[2]
    for key, label in (
        ("frame_p50", "frame bot→Redis p50"),
        ("frame_p99", "frame bot→Redis p99"),
        ("command_p50", "command XADD→bot p50"),
        ("command_p99", "command XADD→bot p99"),
    ):
        values = [v if v is not None and v > 0 else np.nan for v in series[key]]
        ax.plot(t, values, label=label, lw=1.0)
    ax.set_yscale("log")
    ax.set_ylabel("latency (s)")
    ax.legend(loc="upper left", fontsize=8)
    ax = axes[3]
    ax.step(t, series["ready_replicas"], where="post", label="gateway replicas answering /readyz 200")
    ax.set_ylabel("ready replicas")
    ax.set_xlabel("seconds into the day")
    ax.set_ylim(-0.2, 4.5)
    ax.legend(loc="lower left", fontsize=8)
    for f in ledger.report["faults"]:
        for a in axes:
            a.axvline(f["at"], color="red", alpha=0.35, lw=1)
        axes[0].annotate(
            f["name"],
            (f["at"], 1.0),
            xycoords=("data", "axes fraction"),
            rotation=60,
            fontsize=7,
            color="darkred",
            va="bottom",
        )
    run = ledger.report["run"]
    fig.suptitle(
        f"A day in a box: {run['meetings']} meetings, {run['seconds']:.0f} s,"
        f" {len(ledger.problems)} problems",
        y=0.995,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def markdown(ledger: Ledger, png_name: str) -> str:
    r = ledger.report
    run = r["run"]
    frames, commands, workers = r["frames"], r["commands"], r["workers"]
    lines = [
        f"# A day of production in a box: {run['meetings']} meetings, {run['seconds']:.0f} s",
        "",
        f"Build `{run.get('commit', 'unknown')}`, {run.get('date', '')};"
        f" wall time {_fmt(run.get('wall_s'))} s;"
        f" gateway settings `{' '.join(run['settings'].get('gateway_args', []))}`.",
        "",
        f"**{len(ledger.problems)} problems** (losses, repeats or waits that no documented bound explains).",
        "",
        f"![timeline]({png_name})",
        "",
        "## Faults and healing",
        "",
        "| fault | at (s) | what healing looked like |",
        "| --- | --- | --- |",
    ]
    for f in r["faults"]:
        heal = r["healing"].get(f["name"], {})
        lines.append(f"| {f['name']} | {_fmt(f['at'])} | `{json.dumps(heal, default=str)[:400]}` |")
    t = frames["total"]
    lines += [
        "",
        "## Frames",
        "",
        f"Captured {t.get('captured', 0)}, sent {t.get('sent', 0)} (not sent, no audio connection:"
        f" {t.get('not_sent', 0)}), stored {t.get('stored', 0)}, stored twice {t.get('duplicates', 0)}.",
        "",
        "Explained losses: "
        + (", ".join(f"{k} {v}" for k, v in frames["explained_losses"].items()) or "none"),
        f"; **unexplained: {frames['unexplained_losses']}**.",
        "",
        "| replica | state | sent to it | received | published | stored from it | dropped (counted) |"
        " not ready (at s, for s) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for rid, g in r["gateways"].items():
        dropped = ", ".join(f"{k} {int(v)}" for k, v in g["dropped"].items()) or "0"
        extra = (
            f" (sent after its last scrape: {g['frames_sent_after_last_scrape']})"
            if "frames_sent_after_last_scrape" in g
            else ""
        )
        lines.append(
            f"| {rid} | {g['state']}{extra} | {g['frames_sent_to_it']} | {int(g['frames_received'])} |"
            f" {int(g['frames_published'])} | {g['frames_stored_from_it']} | {dropped} |"
            f" {', '.join(f'{at:.1f} for {d:.1f}' for at, d, _ in g.get('not_ready', [])) or '-'} |"
        )
    ct = commands["total"]
    lines += [
        "",
        "## Commands",
        "",
        "Written "
        + str(ct.get("written", 0))
        + ", delivered "
        + str(ct.get("delivered", 0))
        + "; "
        + ", ".join(f"{k} {v}" for k, v in sorted(ct.items()) if k not in ("written", "delivered")),
        "",
        "By kind: " + "; ".join(f"{k}: {dict(v)}" for k, v in commands["by_kind"].items()),
        "",
        f"Utterances: {commands['utterances']}; barge-in to interrupt at the bot: "
        f"{_lat(commands['barge_in_to_interrupt_s'])} s (p50 / p99).",
        "",
        f"Bot messages (bot → Redis → worker): {r['bot_messages']}",
        "",
        "## Workers",
        "",
        f"Ownership overlaps: {len(workers['ownership_overlaps'])};"
        f" frames in Redis never handled: {workers['frames_in_redis_not_handled']};"
        f" frames handled twice: {workers['frames_handled_twice']}.",
        "",
        "## Latency by phase (p50 / p99, seconds)",
        "",
        "| phase | frame bot→Redis | command XADD→bot | interrupt XADD→bot | frame Redis→worker |",
        "| --- | --- | --- | --- | --- |",
    ]
    for phase, _, _ in ledger.d.plan.phases():
        lines.append(
            f"| {phase} | {_lat(frames['arrival_latency_s_by_phase'].get(phase))} |"
            f" {_lat(commands['delivery_latency_s_by_phase'].get(phase))} |"
            f" {_lat(commands['interrupt_latency_s_by_phase'].get(phase))} |"
            f" {_lat(workers['handling_lag_s_by_phase'].get(phase))} |"
        )
    lines += [
        "",
        "## Alerts (the chart's rules on the day's scrapes)",
        "",
        "| alert | condition first true (s) | held (s) | for (s) | fires |",
        "| --- | --- | --- | --- | --- |",
    ]
    for a in r.get("alerts", []):
        if "note" in a:
            lines.append(f"| {a['alert']} | {a['dropped']:.0f} frames in all | | | no ({a['note']}) |")
        else:
            lines.append(
                f"| {a['alert']} | {_fmt(a['condition_first_true_s'])} | {a['condition_held_s']} |"
                f" {a['for_s']} | {'**yes**' if a['fires'] else 'no'} |"
            )
    lines += ["", "## Problems", ""]
    if not ledger.problems:
        lines.append("None.")
    for p in ledger.problems:
        lines.append(
            f"- {p['what']}: `{json.dumps({k: v for k, v in p.items() if k != 'what'}, default=str)[:600]}`"
        )
    cpu: dict[str, float] = {}
    for name, seconds in r["harness"].get("cpu_s", {}).items():
        kind = name.split()[0]
        cpu[kind] = cpu.get(kind, 0.0) + seconds
    harness = {k: v for k, v in r["harness"].items() if k != "cpu_s"}
    lines += [
        "",
        "## The box",
        "",
        "CPU seconds by kind of process (the harness shares the cores with the system under test): "
        + ", ".join(f"{k} {v:.0f}" for k, v in sorted(cpu.items(), key=lambda kv: -kv[1])),
        "",
        f"Harness: {json.dumps(harness, default=str)}",
        "",
    ]
    return "\n".join(lines)


def write_report(ledger: Ledger, prefix: Path) -> None:
    """``prefix``.json, .md and .png."""
    prefix.parent.mkdir(parents=True, exist_ok=True)
    ledger.report["run"]["commit"] = ledger.d.settings.get("commit") or build_commit()
    ledger.report["run"]["date"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(ledger.d.t0))
    series = timeline(ledger)
    report = {k: v for k, v in ledger.report.items() if k != "frames"}
    report["frames"] = {k: v for k, v in ledger.report["frames"].items() if k != "per_bot"}
    report["frames_per_bot"] = ledger.report["frames"]["per_bot"]
    report["timeline"] = series
    prefix.with_suffix(".json").write_text(json.dumps(report, indent=1, default=str))
    png = prefix.with_suffix(".png")
    plot(ledger, series, png)
    prefix.with_suffix(".md").write_text(markdown(ledger, png.name))
