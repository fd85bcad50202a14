"""Flags shared by the example workers (env: ``MEETSTREAM_REDIS_URL``,
``MEETSTREAM_KEY_PREFIX``, ``MEETSTREAM_WORKER_GROUP``, ``MEETSTREAM_BOT_NAME``)."""

from __future__ import annotations

import argparse
import asyncio
import os
from collections.abc import Sequence

from gateway.logs import configure_logging
from workers.worker import Worker, WorkerSettings


def parser(prog: str, description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"python -m workers {prog}", description=description)
    p.add_argument("--redis-url", help="(env MEETSTREAM_REDIS_URL; default redis://127.0.0.1:6379/0)")
    p.add_argument("--key-prefix", help="(env MEETSTREAM_KEY_PREFIX; default meetstream)")
    p.add_argument("--group", help=f"worker group (env MEETSTREAM_WORKER_GROUP; default {prog})")
    p.add_argument(
        "--bot-name", help="the bot's display name, to leave out its own voice (env MEETSTREAM_BOT_NAME)"
    )
    p.add_argument("--lease-ttl-s", type=float, help="seconds before a dead instance's bots move (default 5)")
    p.add_argument(
        "--metrics-port",
        type=int,
        help="serve /metrics and /healthz on this port (env MEETSTREAM_WORKER_METRICS_PORT; default off)",
    )
    p.add_argument(
        "--read-interval-ms",
        type=int,
        help="least ms between two reads of a bot that is not behind: less CPU per frame, that much "
        "more latency (env MEETSTREAM_WORKER_READ_INTERVAL_MS; default 0)",
    )
    p.add_argument("--log-level", default=os.environ.get("MEETSTREAM_LOG_LEVEL", "info"))
    p.add_argument(
        "--log-format", default=os.environ.get("MEETSTREAM_LOG_FORMAT", "text"), choices=("json", "text")
    )
    return p


def settings(ns: argparse.Namespace, default_group: str) -> WorkerSettings:
    env = dict(os.environ)
    env.setdefault("MEETSTREAM_WORKER_GROUP", default_group)
    overrides = dict(
        redis_url=ns.redis_url,
        key_prefix=ns.key_prefix,
        group=ns.group,
        bot_name=ns.bot_name,
        metrics_port=getattr(ns, "metrics_port", None),
        read_interval_ms=getattr(ns, "read_interval_ms", None),
    )
    if ns.lease_ttl_s:
        overrides.update(lease_ttl_s=ns.lease_ttl_s, lease_renew_s=ns.lease_ttl_s / 5)
    return WorkerSettings.from_env(env, **overrides)


def run(worker: Worker, ns: argparse.Namespace) -> int:
    configure_logging(ns.log_level, ns.log_format)
    asyncio.run(worker.run())
    return 0


def parse(p: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    return p.parse_args(list(argv) if argv is not None else None)
