"""The gateway's Prometheus metrics, defined once.

Names follow ``meetstream_gateway_<subsystem>_<name>_<unit>``. Labels come only
from small closed sets (channel, command, reason, op), pre-initialised so that
every series exists from the first scrape. There is no bot_id label anywhere:
bots are unbounded, and a label per bot would be a cardinality leak.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

from gateway import __version__
from gateway.auth import AUTH_FAILURES
from gateway.close_codes import CloseReason
from gateway.commands import COMMANDS, REJECT_REASONS
from gateway.protocol import CHANNELS, FRAME_ERRORS

NS = "meetstream_gateway"

#: Why audio or a bot message was dropped; a closed set.
DROP_REASONS = (
    *FRAME_ERRORS,
    "bad_legacy",
    "bad_json",
    "not_object",
    "binary_on_control",
    "before_handshake",
    "buffer_full",
    "redis_error",
    "rate_limited",
    "too_large",
    "overload",
    # A speaker id or name longer than --audio-speaker-max-bytes.
    "header_too_large",
    # A bot over its byte budget (--bot-max-bytes-per-s).
    "bot_budget",
)
PUBLISH_KINDS = ("audio", "event")
REDIS_OPS = ("publish", "read_commands", "ack", "claim", "expire", "ping")
CLOSE_REASONS = tuple(CloseReason)  # the reason label of connections_closed_total
#: Why a connection was refused before the WebSocket upgrade.
REFUSE_REASONS = (
    "bad_path",
    "draining",
    "over_capacity",
    "overloaded",
    # More open connections for one bot (or token) than --max-connections-per-bot.
    "bot_connections",
    # A bot_id that reconnects faster than --bot-connects-per-min allows.
    "reconnect_rate",
    *AUTH_FAILURES,
)
#: Where inside one bot's handling an unexpected error struck (the bot is closed with 1011).
FAILURE_STAGES = ("receive", "deliver", "send", "unbind")

#: Per-bot playback buffers whose bound can be hit (see gateway.playback).
PLAYBACK_BOUNDS = ("held_seconds", "entries", "commands", "command_bytes", "process_bytes")
PLAYBACK_END_REASONS = ("finished", "interrupt", "disconnected")
_LATENESS_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 1.0)

_LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class AudioInCounters(Collector):
    """Frames and PCM bytes received, as two counters kept in plain integers."""

    def __init__(self) -> None:
        self.frames = 0
        self.bytes = 0

    def collect(self) -> Iterator[CounterMetricFamily]:
        yield CounterMetricFamily(
            f"{NS}_audio_frames_received", "Audio frames received from bots", value=self.frames
        )
        yield CounterMetricFamily(
            f"{NS}_audio_received_bytes", "Audio PCM bytes received from bots", value=self.bytes
        )


class Metrics:
    """All metrics of one gateway, registered in ``registry`` (tests pass a fresh one)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        # meetstream_gateway_build_info{version}: which release each replica runs, mid-rollout.
        Info(f"{NS}_build", "The gateway's version", registry=r).info({"version": __version__})
        self.connections = Gauge(
            f"{NS}_connections", "Open bot WebSocket connections", ["channel"], registry=r
        )
        self.connections_opened = Counter(
            f"{NS}_connections_opened_total", "Bot connections accepted", ["channel"], registry=r
        )
        self.connections_closed = Counter(
            f"{NS}_connections_closed_total",
            "Bot connections ended, by why",
            ["channel", "reason"],
            registry=r,
        )
        self.connections_refused = Counter(
            f"{NS}_connections_refused_total",
            "Connections refused before the WebSocket upgrade (HTTP 4xx/503), by reason",
            ["reason"],
            registry=r,
        )
        self.bots = Gauge(f"{NS}_bots_connected", "Bots with at least one open channel", registry=r)
        # Counted for every frame: plain integers, read at scrape time (a Counter's
        # lock costs more than the rest of the bookkeeping of a frame).
        self.audio_in = AudioInCounters()
        r.register(self.audio_in)
        self.messages_received = Counter(
            f"{NS}_messages_received_total", "Text messages received from bots", ["channel"], registry=r
        )
        self.published = Counter(
            f"{NS}_stream_entries_published_total",
            "Entries written to Redis streams",
            ["kind"],
            registry=r,
        )
        self.bytes_published = Counter(
            f"{NS}_audio_published_bytes_total",
            "Audio written to Redis, in bytes of whole XADD commands (PCM, speaker, fields)",
            registry=r,
        )
        self.dropped = Counter(
            f"{NS}_frames_dropped_total",
            "Audio frames or bot messages dropped, by reason",
            ["reason"],
            registry=r,
        )
        self.publish_buffer_bytes = Gauge(
            f"{NS}_publish_buffer_bytes",
            "Bytes held for Redis, not yet written (audio, events, acks; parked for a Cluster node)",
            registry=r,
        )
        self.commands_delivered = Counter(
            f"{NS}_commands_delivered_total", "Commands sent to bots", ["command"], registry=r
        )
        self.acks_refused = Counter(
            f"{NS}_command_acks_refused_total",
            "Acks not applied because another connection took the bot over (the command is redelivered)",
            registry=r,
        )
        self.commands_rejected = Counter(
            f"{NS}_commands_rejected_total",
            "Commands refused, by reason",
            ["command", "reason"],
            registry=r,
        )
        self.command_delivery = Histogram(
            f"{NS}_command_delivery_seconds",
            "From the worker's XADD (entry id time) to the send to the bot",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.redis_latency = Histogram(
            f"{NS}_redis_roundtrip_seconds",
            "Round trip of Redis operations",
            ["op"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.redis_errors = Counter(
            f"{NS}_redis_errors_total", "Redis operations that failed", ["op"], registry=r
        )
        self.redis_up = Gauge(f"{NS}_redis_up", "1 when the last Redis round trip succeeded", registry=r)
        self.backpressure = Counter(
            f"{NS}_publish_backpressure_total",
            "Times audio sockets stopped being read because Redis writes fell behind",
            registry=r,
        )
        self.loop_lag = Gauge(
            f"{NS}_event_loop_lag_seconds", "How late the event loop ran a 50 ms timer, last tick", registry=r
        )
        self.gc_pause = Histogram(
            f"{NS}_gc_pause_seconds",
            "Python's cyclic garbage collections, by generation: the loop stops for each",
            ["generation"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        for generation in ("0", "1", "2"):
            self.gc_pause.labels(generation)
        self.shed_ratio = Gauge(
            f"{NS}_overload_shed_ratio",
            "Share of incoming audio shed because the process is overloaded",
            registry=r,
        )
        self.ready = Gauge(f"{NS}_ready", "1 when ready for new bots (Redis up, not draining)", registry=r)
        self.log_suppressed = Counter(
            f"{NS}_log_lines_suppressed_total", "Log lines dropped by rate limiting", registry=r
        )
        self.playback_audio_sent = Counter(
            f"{NS}_playback_audio_sent_seconds_total", "Audio sent to bots, seconds of playback", registry=r
        )
        self.playback_audio_held = Gauge(
            f"{NS}_playback_audio_held_seconds",
            "Audio accepted from workers and not yet sent, all bots",
            registry=r,
        )
        self.playback_audio_cut = Counter(
            f"{NS}_playback_audio_cut_seconds_total",
            "Audio of utterances that did not play out, by why (interrupt or disconnected)",
            ["reason"],
            registry=r,
        )
        self.playback_utterances = Counter(
            f"{NS}_playback_utterances_total", "Utterances ended, by how", ["reason"], registry=r
        )
        self.playback_underruns = Counter(
            f"{NS}_playback_underruns_total",
            "Chunks sent after the modelled bot queue ran dry inside an utterance (audible gaps)",
            registry=r,
        )
        self.playback_lateness = Histogram(
            f"{NS}_playback_chunk_lateness_seconds",
            "How long after it was due an audio chunk was taken for sending (pacing jitter)",
            buckets=_LATENESS_BUCKETS,
            registry=r,
        )
        self.playback_bound_hits = Counter(
            f"{NS}_playback_bound_hits_total",
            "Times a per-bot buffer was full: sendaudio rejected, or command reading paused",
            ["bound"],
            registry=r,
        )
        self.bot_failures = Counter(
            f"{NS}_bot_failures_total",
            "Unexpected errors inside one bot's handling (a bug: logged with a traceback; "
            "the bot is closed with 1011 and its session detached)",
            ["stage"],
            registry=r,
        )
        self.commands_held_bytes = Gauge(
            f"{NS}_commands_held_bytes",
            "Commands and audio accepted from workers and not yet sent, all bots (bounded by "
            "--commands-max-held-bytes: past it, reading pauses for bots that add more)",
            registry=r,
        )
        self.chat_coalesced = Counter(
            f"{NS}_chat_interims_coalesced_total",
            "Interim sendchat updates replaced by a newer one unsent",
            registry=r,
        )
        # Housekeeping (gateway/janitor.py): leftovers no bot's gateway cleans up.
        self.janitor_passes = Counter(
            f"{NS}_janitor_passes_total", "Housekeeping passes over command streams run", registry=r
        )
        self.janitor_errors = Counter(
            f"{NS}_janitor_errors_total",
            "Housekeeping passes cut short by a Redis error (the next pass goes on from there)",
            registry=r,
        )
        self.janitor_streams_checked = Counter(
            f"{NS}_janitor_streams_checked_total", "Command streams a housekeeping pass examined", registry=r
        )
        self.janitor_expiries_set = Counter(
            f"{NS}_janitor_expiries_set_total",
            "Command streams found without an expiry and given key_ttl_s (bots that never connected)",
            registry=r,
        )
        self.janitor_consumers_deleted = Counter(
            f"{NS}_janitor_consumers_deleted_total",
            "Idle consumers with nothing pending deleted from command streams (gateways that are gone)",
            registry=r,
        )
        self._preinit()

    def _preinit(self) -> None:
        for stage in FAILURE_STAGES:
            self.bot_failures.labels(stage)
        for bound in PLAYBACK_BOUNDS:
            self.playback_bound_hits.labels(bound)
        for reason in PLAYBACK_END_REASONS:
            self.playback_utterances.labels(reason)
            if reason != "finished":
                self.playback_audio_cut.labels(reason)
        for ch in CHANNELS:
            self.connections.labels(ch)
            self.connections_opened.labels(ch)
            self.messages_received.labels(ch)
            for reason in CLOSE_REASONS:
                self.connections_closed.labels(ch, reason)
        for reason in DROP_REASONS:
            self.dropped.labels(reason)
        for reason in REFUSE_REASONS:
            self.connections_refused.labels(reason)
        for kind in PUBLISH_KINDS:
            self.published.labels(kind)
        for cmd in (*COMMANDS, "unknown"):
            self.commands_delivered.labels(cmd)
            for reason in REJECT_REASONS:
                self.commands_rejected.labels(cmd, reason)
        for op in REDIS_OPS:
            self.redis_latency.labels(op)
            self.redis_errors.labels(op)


def watch_gc(pause: Histogram) -> Callable[[], None]:
    """Time every cyclic collection into ``pause``; returns the function that stops it.

    A full collection walks every live container object and stops the event loop
    while it does (tens of ms with hundreds of bots, docs/ARCHITECTURE.md): the one
    latency spike no other metric explains.
    """
    started = [0.0]
    observers = {str(g): pause.labels(str(g)) for g in range(3)}

    def callback(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            started[0] = time.perf_counter()
        else:
            observers[str(info["generation"])].observe(time.perf_counter() - started[0])

    gc.callbacks.append(callback)
    return lambda: gc.callbacks.remove(callback)
