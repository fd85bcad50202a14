"""Typed settings, built once from flags and ``MEETSTREAM_*`` environment variables.

Every field is an option: ``--audio-maxlen`` on the command line, or
``MEETSTREAM_AUDIO_MAXLEN`` in the environment (a flag wins over the variable).
Units are in the names. ``python -m gateway.settings`` prints the README table.

The gateway owns the ``MEETSTREAM_`` namespace: a variable there that is neither
one of its settings nor another component's (:data:`FOREIGN_ENV_PREFIXES`,
:data:`FOREIGN_ENV`) stops it at start, so that a typo fails instead of being
ignored. Other components share the environment (a compose file, a pod spec).
"""

from __future__ import annotations

import argparse
import difflib
import os
import socket
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import MISSING, dataclass, field, fields
from typing import Any, Literal, get_args, get_type_hints

from gateway.auth import split_secrets
from gateway.exceptions import ConfigError

ENV_PREFIX = "MEETSTREAM_"
#: Names under these prefixes belong to other components; the gateway never reads them.
#: Workers (the SDK's MEETSTREAM_WORKER_*, and any worker's own) and the Pipecat bridge.
FOREIGN_ENV_PREFIXES = ("MEETSTREAM_WORKER_", "MEETSTREAM_PIPECAT_")
#: Names outside those prefixes that are read elsewhere than Settings (docs/DEPLOY.md).
FOREIGN_ENV = frozenset(
    {
        # the worker SDK (workers.worker.ENV_SETTINGS) and the Node.js worker
        "MEETSTREAM_BOT_NAME",
        "MEETSTREAM_LEASE_TTL_S",
        "MEETSTREAM_LEASE_RENEW_S",
        "MEETSTREAM_CLAIM_INTERVAL_S",
        "MEETSTREAM_CONFORMANCE",
        # the redis-server the embedded Redis and the tests start (gateway.embedded_redis)
        "MEETSTREAM_REDIS_SERVER_BIN",
        # tests/system: where the day's report is kept
        "MEETSTREAM_SYSTEM_REPORT",
    }
)
ClusterMode = Literal["auto", "yes", "no"]
LogFormat = Literal["json", "text"]
LogLevel = Literal["debug", "info", "warning", "error"]
EventLoop = Literal["auto", "asyncio", "uvloop"]


def _opt(default: Any, help: str, *, secret: bool = False) -> Any:
    return field(default=default, metadata={"help": help, "secret": secret})


def _default_gateway_id() -> str:
    return f"{socket.gethostname()}-{uuid.uuid4().hex[:8]}"


@dataclass(frozen=True)
class Settings:
    # Bot sockets
    host: str = _opt("0.0.0.0", "Address the bot WebSocket server binds")
    port: int = _opt(8765, "Port of the bot WebSocket server")
    ws_max_message_bytes: int = _opt(1 << 20, "Largest WebSocket message a bot may send")
    ws_ping_interval_s: float = _opt(20.0, "Keepalive ping interval (0 disables)")
    ws_ping_timeout_s: float = _opt(20.0, "Close a bot that does not answer a ping in this time")
    handshake_timeout_s: float = _opt(
        10.0, "Close a connection whose bot_id is still unknown after this time"
    )
    drain_timeout_s: float = _opt(
        300.0, "On SIGTERM, let connected bots finish for up to this long, then close with 1012"
    )
    # Admission and bounds per connection
    auth_secret: str = _opt(
        "", "HMAC secret(s) for bot tokens, comma-separated (first signs); empty disables auth", secret=True
    )
    control_max_message_bytes: int = _opt(
        64 << 10, "Largest control-channel message; larger ones are dropped"
    )
    max_frames_per_s: float = _opt(250.0, "Messages per second a connection may send; the excess is dropped")
    rate_burst_s: float = _opt(
        10.0, "Seconds of that rate a connection may send at once (a catch-up after a stall is not abuse)"
    )
    max_connections: int = _opt(20_000, "Bot connections per replica; beyond it new ones get HTTP 503")
    # Per bot: what one bot_id may take, however often it reconnects (docs/SECURITY.md)
    max_connections_per_bot: int = _opt(
        8, "Open connections per bot_id (per token on a bare path); beyond it new ones get HTTP 429"
    )
    bot_connects_per_min: float = _opt(
        60.0, "New connections a bot_id may open per minute, 20 at once; beyond it HTTP 429"
    )
    bot_max_bytes_per_s: int = _opt(
        1 << 20, "Bytes a bot may send per second (rate_burst_s of it at once); the excess is dropped"
    )
    ws_write_buffer_max_bytes: int = _opt(
        4 << 20, "Bytes written to a bot that it has not read (pongs piling up): past this it is closed"
    )
    audio_text_max_bytes: int = _opt(
        256 << 10,
        "Largest text message on the audio channel (handshake, legacy PCMChunk); larger are dropped",
    )
    audio_speaker_max_bytes: int = _opt(
        1024, "Longest speaker id or name in an audio frame; frames with longer ones are dropped"
    )
    idle_timeout_s: float = _opt(
        0.0, "Close a connection silent this long (0: off; pings already catch dead peers)"
    )
    send_timeout_s: float = _opt(10.0, "Close a bot that does not take a command within this time")
    overload_lag_s: float = _opt(
        0.25, "Event-loop lag that means overload: shed audio, report not-ready (0 disables)"
    )
    ws_close_timeout_s: float = _opt(
        5.0, "Wait this long for a bot to answer a close, then drop the TCP connection"
    )
    # Metrics and probes
    metrics_host: str = _opt("0.0.0.0", "Address of the metrics and probe HTTP server")
    metrics_port: int = _opt(9108, "Port of /metrics, /healthz and /readyz (0 disables)")
    # Redis
    redis_url: str = _opt(
        "", "Redis URL (redis://, rediss://); empty starts an embedded redis-server", secret=True
    )
    redis_cluster: ClusterMode = _opt("auto", "Redis Cluster mode: auto-detect, yes or no")
    redis_max_connections: int = _opt(16, "Pool size for writes (readers hold one each per shard)")
    key_prefix: str = _opt("meetstream", "Prefix of every Redis key")
    command_shards: int = _opt(16, "Hash-tag shards of command streams (same on every gateway)")
    audio_maxlen: int = _opt(
        600, "Approximate MAXLEN of a bot's audio stream, in frames (600: 12 s of one speaker at 20 ms)"
    )
    events_maxlen: int = _opt(10_000, "Approximate MAXLEN of a bot's event stream")
    global_events_maxlen: int = _opt(100_000, "Approximate MAXLEN of the global lifecycle stream")
    audio_stream_max_bytes: int = _opt(
        16 << 20, "Most bytes of one bot's audio stream: large frames trim it to fewer entries"
    )
    events_stream_max_bytes: int = _opt(
        8 << 20, "Most bytes of one bot's event stream: large entries trim it to fewer entries"
    )
    global_events_max_bytes: int = _opt(
        64 << 20,
        "Most bytes this replica keeps in the global lifecycle stream (large entries trim it shorter)",
    )
    global_event_data_max_bytes: int = _opt(
        4096, "Largest bot text copied into the global lifecycle stream (the bot's own stream has it whole)"
    )
    key_ttl_s: int = _opt(3600, "Expiry of a bot's keys once it has left (refreshed while it is here)")
    # Commands
    command_max_age_s: float = _opt(
        30.0, "Commands older than this when they could be sent are rejected as expired"
    )
    command_max_bytes: int = _opt(16 << 20, "Largest command entry accepted")
    command_block_ms: int = _opt(2000, "BLOCK of the command stream reads")
    command_read_count: int = _opt(64, "Entries read per stream and round trip")
    command_read_streams: int = _opt(
        16, "Most command streams one blocking read waits on; a shard with more bots gets more readers"
    )
    outbox_max_commands: int = _opt(256, "Commands held per bot before reading pauses (backpressure)")
    outbox_max_bytes: int = _opt(
        16 << 20, "Bytes of commands held per bot before reading its stream pauses (backpressure)"
    )
    commands_max_held_bytes: int = _opt(
        256 << 20, "Bytes of commands held for all bots before reading pauses for any bot adding more"
    )
    image_max_bytes: int = _opt(2 << 20, "Largest sendimg image (decoded bytes); larger ones are rejected")
    # Audio playback (see docs/PLAYBACK.md)
    playback_chunk_ms: int = _opt(100, "Audio is sent to bots in chunks of this length")
    playback_lead_ms: int = _opt(
        300, "Most audio queued at a bot ahead of playback (heard after an interrupt)"
    )
    playback_max_held_s: float = _opt(120.0, "Audio held per bot awaiting playback; more is rejected")
    playback_max_entries: int = _opt(1024, "sendaudio entries held per bot; more are rejected")
    # Publishing
    publish_buffer_bytes: int = _opt(
        64 << 20, "Audio and events held for Redis; beyond it the oldest audio is dropped"
    )
    publish_control_buffer_bytes: int = _opt(
        32 << 20, "Events and acks held for Redis; beyond it the oldest are dropped (counted)"
    )
    publish_batch_max: int = _opt(2000, "Most stream entries sent in one pipeline")
    publish_pipeline_depth: int = _opt(
        4, "Pipelines on the wire to Redis at once, before waiting for the oldest's replies"
    )
    publish_backpressure_bytes: int = _opt(
        8 << 20, "Unsent audio past which audio sockets stop being read until Redis catches up"
    )
    publish_interval_ms: float = _opt(
        2.0, "Least time between two pipelines: frames wait at most this long to share a round trip"
    )
    # Housekeeping (gateway/janitor.py)
    janitor_interval_s: float = _opt(
        300.0,
        "Seconds between housekeeping passes over command streams: orphans expire, consumers of gone "
        "gateways go (the first pass after a random delay up to this; 0 disables)",
    )
    janitor_max_keys: int = _opt(
        10_000, "Most command streams one housekeeping pass examines; the next pass resumes the scan there"
    )
    janitor_consumer_idle_s: float = _opt(
        3600.0, "Delete a command stream's gateway consumer idle this long with no pending entries"
    )
    # Logging and identity
    event_loop: EventLoop = _opt("auto", "asyncio event loop: uvloop when installed (auto), or force one")
    log_level: LogLevel = _opt("info", "Log level")
    log_format: LogFormat = _opt("json", "json (one object per line) or text (key=value)")
    gateway_id: str = _opt("", "This process's name in Redis consumer groups (default: hostname-random)")

    def __post_init__(self) -> None:
        problems = []
        for name in ("port", "metrics_port"):
            if not 0 <= getattr(self, name) <= 65535:
                problems.append(f"{name} must be 0-65535")
        for name in (
            "ws_max_message_bytes",
            "command_shards",
            "audio_maxlen",
            "events_maxlen",
            "global_events_maxlen",
            "key_ttl_s",
            "command_max_bytes",
            "command_block_ms",
            "command_read_count",
            "command_read_streams",
            "outbox_max_commands",
            "publish_buffer_bytes",
            "publish_batch_max",
            "publish_pipeline_depth",
            "redis_max_connections",
            "control_max_message_bytes",
            "max_frames_per_s",
            "rate_burst_s",
            "max_connections",
            "send_timeout_s",
            "publish_backpressure_bytes",
            "max_connections_per_bot",
            "bot_connects_per_min",
            "bot_max_bytes_per_s",
            "ws_write_buffer_max_bytes",
            "audio_speaker_max_bytes",
            "audio_text_max_bytes",
            "audio_stream_max_bytes",
            "events_stream_max_bytes",
            "global_event_data_max_bytes",
            "global_events_max_bytes",
            "outbox_max_bytes",
            "commands_max_held_bytes",
            "publish_control_buffer_bytes",
        ):
            if getattr(self, name) <= 0:
                problems.append(f"{name} must be positive")
        for name in ("image_max_bytes", "playback_chunk_ms", "playback_max_held_s", "playback_max_entries"):
            if getattr(self, name) <= 0:
                problems.append(f"{name} must be positive")
        if self.janitor_interval_s < 0:
            problems.append("janitor_interval_s must be 0 (off) or positive")
        for name in ("janitor_max_keys", "janitor_consumer_idle_s"):
            if getattr(self, name) <= 0:
                problems.append(f"{name} must be positive")
        if self.bot_max_bytes_per_s * self.rate_burst_s < self.ws_max_message_bytes:
            problems.append("bot_max_bytes_per_s x rate_burst_s must hold at least one ws_max_message_bytes")
        if self.playback_lead_ms < self.playback_chunk_ms:
            problems.append("playback_lead_ms must be at least playback_chunk_ms")
        if self.auth_secret and not split_secrets(self.auth_secret):
            # "$NEW,$OLD" with both unset: auth would be off without the AUTH DISABLED warning.
            problems.append(
                "auth_secret has no secret in it (only commas or spaces): "
                "set one, or leave it empty to disable auth"
            )
        if not 1 <= self.command_shards <= 1024:
            problems.append("command_shards must be 1-1024")
        if not self.key_prefix or any(c in self.key_prefix for c in "{} \t\r\n"):
            problems.append("key_prefix must be non-empty, without braces or spaces")
        for name, kind in get_type_hints(Settings).items():
            if getattr(kind, "__origin__", None) is Literal and getattr(self, name) not in get_args(kind):
                problems.append(f"{name} must be one of {', '.join(get_args(kind))}")
        if problems:
            raise ConfigError("; ".join(problems))
        if not self.gateway_id:
            object.__setattr__(self, "gateway_id", _default_gateway_id())

    def __repr__(self) -> str:
        shown = []
        for f in fields(self):
            value = getattr(self, f.name)
            if f.metadata.get("secret") and value:
                value = redact_url(value) if "url" in f.name else "***"
            shown.append(f"{f.name}={value!r}")
        return f"Settings({', '.join(shown)})"

    @classmethod
    def from_sources(
        cls, argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None
    ) -> Settings:
        """Build settings from flags over environment variables over defaults."""
        environ = os.environ if environ is None else environ
        parser = build_parser()
        ns = parser.parse_args(list(argv) if argv is not None else [])
        return cls.from_namespace(ns, environ)

    @classmethod
    def from_namespace(cls, ns: argparse.Namespace, environ: Mapping[str, str]) -> Settings:
        """Flags in ``ns`` over ``environ``; raises ConfigError on an unknown ``MEETSTREAM_*``."""
        check_env_names(environ)
        hints = get_type_hints(cls)
        values: dict[str, Any] = {}
        for f in fields(cls):
            flag_value = getattr(ns, f.name, None)
            env_value = environ.get(env_name(f.name))
            raw = flag_value if flag_value is not None else env_value
            if raw is None:
                continue
            try:
                values[f.name] = _convert(raw, hints[f.name])
            except ValueError as exc:
                raise ConfigError(f"{f.name}: cannot read {raw!r} as {_kind_name(hints[f.name])}") from exc
        return cls(**values)


def env_name(name: str) -> str:
    return ENV_PREFIX + name.upper()


def check_env_names(environ: Mapping[str, str]) -> None:
    """Refuse a ``MEETSTREAM_*`` name that no component reads: it is a typo (ConfigError)."""
    own = {env_name(f.name) for f in fields(Settings)}
    unknown = sorted(
        name
        for name in environ
        if name.startswith(ENV_PREFIX)
        and name not in own
        and name not in FOREIGN_ENV
        and not name.startswith(FOREIGN_ENV_PREFIXES)
    )
    if not unknown:
        return
    problems = []
    for name in unknown:
        close = difflib.get_close_matches(name, sorted(own | FOREIGN_ENV), n=1)
        problems.append(f"{name} (did you mean {close[0]}?)" if close else name)
    raise ConfigError(
        f"unknown environment variable{'s' if len(unknown) > 1 else ''} {', '.join(problems)}: "
        "not a gateway setting (python -m gateway.settings lists them)"
    )


def flag_name(name: str) -> str:
    return "--" + name.replace("_", "-")


def _base_type(kind: Any) -> type:
    return str if getattr(kind, "__origin__", None) is Literal else kind


def _kind_name(kind: Any) -> str:
    return _base_type(kind).__name__


def _convert(raw: Any, kind: Any) -> Any:
    base = _base_type(kind)
    if isinstance(raw, base):
        return raw
    if base is bool:
        return str(raw).lower() in ("1", "true", "yes", "on")
    return base(raw)


def add_settings_arguments(parser: argparse.ArgumentParser) -> None:
    """Add one flag per setting; defaults stay None so the environment can fill in."""
    hints = get_type_hints(Settings)
    for f in fields(Settings):
        kind = hints[f.name]
        choices = get_args(kind) if getattr(kind, "__origin__", None) is Literal else None
        parser.add_argument(
            flag_name(f.name),
            dest=f.name,
            type=_base_type(kind),
            choices=choices,
            default=None,
            metavar=None
            if choices
            else f.name.rsplit("_", 1)[-1].upper()
            if f.name.endswith(("_s", "_ms", "_bytes"))
            else "VALUE",
            help=f"{f.metadata['help']} (env {env_name(f.name)}; default {f.default!r})",
        )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="meetstream-gateway", add_help=True)
    add_settings_arguments(parser)
    return parser


def redact_url(url: str) -> str:
    """Hide the password of a URL, keeping enough to recognise it in a log."""
    if "@" not in url or "://" not in url:
        return url
    scheme, rest = url.split("://", 1)
    creds, host = rest.rsplit("@", 1)
    user = creds.split(":", 1)[0] if ":" in creds else ""
    return f"{scheme}://{user}:***@{host}" if user else f"{scheme}://***@{host}"


def markdown_table() -> str:
    """The README's settings table, generated so that it cannot drift."""
    rows = ["| flag | environment variable | default | meaning |", "| --- | --- | --- | --- |"]
    for f in fields(Settings):
        default = f.default if f.default is not MISSING else ""
        shown = "(generated)" if f.name == "gateway_id" else f"`{default}`" if default != "" else "(empty)"
        rows.append(f"| `{flag_name(f.name)}` | `{env_name(f.name)}` | {shown} | {f.metadata['help']} |")
    return "\n".join(rows)


def update_readme(path: str = "README.md") -> None:
    """Rewrite the README's settings table between its markers."""
    with open(path) as f:
        text = f.read()
    start = text.index("\n", text.index("<!-- settings:start")) + 1
    end = text.index("<!-- settings:end -->")
    with open(path, "w") as f:
        f.write(text[:start] + markdown_table() + "\n" + text[end:])


if __name__ == "__main__":
    import sys

    if "--update-readme" in sys.argv:
        update_readme()
    else:
        print(markdown_table())
