"""A worker instance's Prometheus metrics, defined once (served by ``metrics_port``).

Names follow ``meetstream_worker_<name>_<unit>``. Every metric carries the
worker ``group`` (one value per process); the other labels come from small
closed sets (``stream``, ``reason``, ``outcome``), pre-initialised so
that every series exists from the first scrape. No bot_id label: bots are
unbounded. What the gateway's trimming can take from a group that falls behind
shows in ``meetstream_worker_stream_lag_entries{stream="audio"}`` before it
happens, and in ``meetstream_worker_audio_seq_gaps_total`` after.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

NS = "meetstream_worker"
STREAMS = ("audio", "events")
HANDLER_OUTCOMES = ("error", "timeout")
#: Handler time per entry: from a millisecond to the default handler timeout.
HANDLER_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class WorkerMetrics:
    """The metrics of one :class:`~workers.worker.Worker`, in its own registry."""

    def __init__(self, group: str, stop_reasons: tuple[str, ...], registry: CollectorRegistry) -> None:
        self.registry = registry
        g = ["group"]

        def gauge(name: str, doc: str, *labels: str) -> Gauge:
            return Gauge(f"{NS}_{name}", doc, [*g, *labels], registry=registry)

        def counter(name: str, doc: str, *labels: str) -> Counter:
            return Counter(f"{NS}_{name}", doc, [*g, *labels], registry=registry)

        self.bots_owned = gauge("bots_owned", "Bots this instance owns now").labels(group)
        self.bots_known = gauge(
            "bots_known", "Live bots of the group (its registry) as this instance last read it"
        ).labels(group)
        self.members = gauge(
            "group_members", "Live instances of the group as this instance last saw them"
        ).labels(group)
        self.bots_started = counter("bots_started_total", "Bots this instance took").labels(group)
        self.takeovers = counter(
            "takeovers_total",
            "Bots this instance took that an instance of the group had handled before "
            "(after a crash, a hand-back, a rebalance or a reconnect)",
        ).labels(group)
        stopped = counter("bots_stopped_total", "Bots this instance let go, by why", "reason")
        self.bots_stopped = {r: stopped.labels(group, r) for r in stop_reasons}
        self.bots_shed = counter("bots_handed_over_total", "Bots handed back to balance the group").labels(
            group
        )
        handled = counter("entries_handled_total", "Stream entries dispatched to handlers", "stream")
        self.entries = {s: handled.labels(group, s) for s in STREAMS}
        self.entries_claimed = counter(
            "entries_claimed_total",
            "Entries a previous owner read and did not acknowledge, taken over (they may repeat)",
        ).labels(group)
        seconds = Histogram(
            f"{NS}_handler_seconds",
            "Time all handlers took for one entry",
            [*g, "stream"],
            buckets=HANDLER_BUCKETS,
            registry=registry,
        )
        self.handler_seconds = {s: seconds.labels(group, s) for s in STREAMS}
        failures = counter("handler_failures_total", "Handlers that raised or timed out", "outcome")
        self.handler_failures = {o: failures.labels(group, o) for o in HANDLER_OUTCOMES}
        lag_entries = gauge(
            "stream_lag_entries",
            "Most entries between what this instance handled and the head of an owned bot's stream "
            "(audio only: counted by seq); past the gateway's audio MAXLEN, unread audio is trimmed",
            "stream",
        )
        self.lag_entries = lag_entries.labels(group, "audio")
        lag_seconds = gauge(
            "stream_lag_seconds",
            "Most time between the last entry this instance handled and the head of an owned bot's stream",
            "stream",
        )
        self.lag_seconds = {s: lag_seconds.labels(group, s) for s in STREAMS}
        self.seq_gaps = counter(
            "audio_seq_gaps_total",
            "Audio frames missing under one connection before this instance read them "
            "(trimmed by the gateway's MAXLEN, or lost upstream)",
        ).labels(group)
        self.seq_repeats = counter(
            "audio_seq_repeats_total", "Audio frames seen again (handled twice after a takeover)"
        ).labels(group)
        self.own_voice_skipped = counter(
            "own_voice_frames_skipped_total", "Frames of the bot's own voice not passed to on_audio"
        ).labels(group)
        self.max_bots_hit = counter(
            "max_bots_hit_total", "Claim rounds that left free bots because max_bots was reached"
        ).labels(group)
        self.redis_errors = counter(
            "redis_errors_total", "Redis operations that failed (retried, or the bot was let go)"
        ).labels(group)
