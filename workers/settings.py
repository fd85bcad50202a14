"""A worker instance's settings: one frozen dataclass, units in the names, built from the environment.

``WorkerSettings.from_env()`` reads the ``MEETSTREAM_*`` variables of
:data:`ENV_SETTINGS` (``docs/WORKERS.md``); arguments win over variables.
"""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from gateway.settings import redact_url
from workers.constants import DEFAULT_GROUP, DEFAULT_PREFIX, check_group

#: Settings ``from_env`` reads, by field name.
ENV_SETTINGS = {
    "redis_url": "MEETSTREAM_REDIS_URL",
    "redis_cluster": "MEETSTREAM_REDIS_CLUSTER",  # the gateway's name: one value for both
    "key_prefix": "MEETSTREAM_KEY_PREFIX",
    "group": "MEETSTREAM_WORKER_GROUP",
    "bot_name": "MEETSTREAM_BOT_NAME",
    "instance_id": "MEETSTREAM_WORKER_INSTANCE",
    "lease_ttl_s": "MEETSTREAM_LEASE_TTL_S",
    "lease_renew_s": "MEETSTREAM_LEASE_RENEW_S",
    "claim_interval_s": "MEETSTREAM_CLAIM_INTERVAL_S",
    "read_interval_ms": "MEETSTREAM_WORKER_READ_INTERVAL_MS",
    "metrics_host": "MEETSTREAM_WORKER_METRICS_HOST",
    "metrics_port": "MEETSTREAM_WORKER_METRICS_PORT",
    "conformance": "MEETSTREAM_CONFORMANCE",
}


@dataclass(frozen=True)
class WorkerSettings:
    """Everything a worker instance needs; units in the names.

    ``from_env`` reads ``MEETSTREAM_REDIS_URL``, ``MEETSTREAM_KEY_PREFIX``,
    ``MEETSTREAM_WORKER_GROUP`` and ``MEETSTREAM_BOT_NAME``.
    """

    redis_url: str = "redis://127.0.0.1:6379/0"
    redis_cluster: str = "auto"  # auto | yes | no
    key_prefix: str = DEFAULT_PREFIX
    group: str = DEFAULT_GROUP
    instance_id: str = ""  # consumer name in the group; default host-pid-random
    #: The bot's display name in the meeting: its own voice comes back under it.
    bot_name: str | None = None
    exclude_own_voice: bool = True
    lease_ttl_s: float = 5.0
    lease_renew_s: float = 1.0
    claim_interval_s: float = 0.5
    #: Above its fair share, an instance hands one bot back per this many seconds (0: never).
    balance_step_s: float = 0.5
    max_bots: int = 1000
    read_count: int = 64
    read_block_ms: int = 1000
    #: Least time between two reads of one bot's streams while it is not behind (0: read
    #: again at once). A read costs about as much CPU as handling a handful of frames: a
    #: recorder that can wait this long handles several frames per read, for a fraction of
    #: the CPU (docs/BENCHMARKS.md, "Worker SDK per-frame cost"); a bot that is behind is
    #: read back to back whatever this says.
    read_interval_ms: int = 0
    handler_timeout_s: float | None = 60.0
    #: On SIGTERM: wait this long for handlers to finish (below Kubernetes' 30 s grace period).
    graceful_timeout_s: float = 20.0
    bootstrap_lookback_s: float = 3600.0
    command_maxlen: int = 1000
    say_chunk_s: float = 2.0
    #: ``/metrics`` and ``/healthz`` on this port (0: no server); Prometheus scrapes it.
    metrics_port: int = 0
    metrics_host: str = "0.0.0.0"
    #: Seconds between two measurements of how far owned bots' streams are ahead of us.
    lag_sample_s: float = 5.0
    #: The conformance kit's mode (``python -m workers.conformance``): journal every
    #: frame handled and answer ``{"type": "ping", "id": ...}`` messages with ``pong:ID``.
    conformance: bool = False

    def __post_init__(self) -> None:
        check_group(self.group)
        if not self.instance_id:
            object.__setattr__(
                self, "instance_id", f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
            )
        if self.lease_renew_s * 2 >= self.lease_ttl_s:
            raise ValueError("lease_renew_s must be under half of lease_ttl_s")
        if self.claim_interval_s <= 0:
            raise ValueError("claim_interval_s must be positive")

    def __repr__(self) -> str:
        shown = ", ".join(
            f"{f.name}={redact_url(v) if f.name == 'redis_url' else v!r}"
            for f in fields(self)
            if (v := getattr(self, f.name)) is not None
        )
        return f"WorkerSettings({shown})"

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> WorkerSettings:
        """Settings from ``MEETSTREAM_*`` variables (:data:`ENV_SETTINGS`); ``overrides`` win.

        A lease TTL given without a renewal period, too short for the default one,
        renews at a fifth of it.
        """
        env = os.environ if environ is None else environ
        kinds = {f.name: f.type for f in fields(cls)}
        values: dict[str, Any] = {}
        for name, var in ENV_SETTINGS.items():
            raw = env.get(var)
            if not raw:
                continue
            kind = kinds[name]
            if kind == "bool":
                values[name] = raw.strip().lower() in ("1", "true", "yes", "on")
            elif kind == "float":
                values[name] = float(raw)
            elif kind == "int":
                values[name] = int(raw)
            else:
                values[name] = raw
        values.update({k: v for k, v in overrides.items() if v is not None})
        ttl = values.get("lease_ttl_s")
        if ttl is not None and "lease_renew_s" not in values and cls.lease_renew_s * 2 >= ttl:
            values["lease_renew_s"] = ttl / 5
        return cls(**values)
