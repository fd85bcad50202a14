"""``meetstream-gateway``: run the gateway, or print a bot's key names.

meetstream-gateway [run] [--flags]     serve bots (the default)
meetstream-gateway keys BOT_ID         the Redis keys of a bot, as JSON
meetstream-gateway token [--bot-id B]  mint a bot connection token (needs MEETSTREAM_AUTH_SECRET)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

from gateway import __version__
from gateway.auth import mint, split_secrets
from gateway.exceptions import ConfigError, GatewayError
from gateway.keys import KeySpace
from gateway.logs import configure_logging
from gateway.protocol import validate_bot_id
from gateway.settings import Settings, add_settings_arguments


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="meetstream-gateway", description="Meetstream bot sockets bridged to Redis Streams."
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="cmd")
    run = sub.add_parser("run", help="serve bots (the default)")
    add_settings_arguments(run)
    keys = sub.add_parser("keys", help="print the Redis key names of a bot")
    keys.add_argument("bot_id")
    keys.add_argument("--key-prefix", default=None, help="(env MEETSTREAM_KEY_PREFIX)")
    keys.add_argument("--command-shards", type=int, default=None, help="(env MEETSTREAM_COMMAND_SHARDS)")
    token = sub.add_parser("token", help="mint a token for bot connections (?token=... in the websocket_url)")
    token.add_argument("--bot-id", default=None, help="bind the token to one bot (recommended)")
    token.add_argument("--ttl-s", type=int, default=86_400, help="validity in seconds (default one day)")
    token.add_argument("--auth-secret", default=None, help="(env MEETSTREAM_AUTH_SECRET; prefer the env var)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {"run", "keys", "token"}
    if not argv or (argv[0] not in commands and argv[0] not in ("-h", "--help", "--version")):
        argv = ["run", *argv]
    ns = build_parser().parse_args(argv)
    try:
        if ns.cmd == "keys":
            return _keys(ns)
        if ns.cmd == "token":
            return _token(ns)
        settings = Settings.from_namespace(ns, os.environ)
    except (ConfigError, GatewayError, ValueError) as exc:
        print(f"meetstream-gateway: {exc}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level, settings.log_format)
    from gateway.app import Gateway  # late: keeps `keys` free of the server's imports

    try:
        run = _event_loop_runner(settings.event_loop)
        run(Gateway(settings).run())
    except GatewayError as exc:
        print(f"meetstream-gateway: {exc}", file=sys.stderr)
        return 1
    return 0


def _event_loop_runner(choice: str) -> Callable[[Coroutine[Any, Any, None]], None]:
    """uvloop when asked for or available: a few percent less CPU per frame."""
    if choice == "asyncio":
        return asyncio.run
    try:
        import uvloop
    except ImportError as exc:
        if choice == "uvloop":
            raise ConfigError("event_loop=uvloop, but uvloop is not installed (pip install uvloop)") from exc
        return asyncio.run
    return uvloop.run


def _token(ns: argparse.Namespace) -> int:
    secrets = split_secrets(ns.auth_secret or os.environ.get("MEETSTREAM_AUTH_SECRET", ""))
    if not secrets:
        raise ConfigError("no secret: set MEETSTREAM_AUTH_SECRET (the gateway's --auth-secret)")
    if ns.ttl_s <= 0:
        raise ConfigError("--ttl-s must be positive")
    bot_id = validate_bot_id(ns.bot_id) if ns.bot_id is not None else None
    print(mint(secrets[0], ns.ttl_s, bot_id))
    return 0


def _keys(ns: argparse.Namespace) -> int:
    prefix = ns.key_prefix or os.environ.get("MEETSTREAM_KEY_PREFIX", "meetstream")
    shards = ns.command_shards or int(os.environ.get("MEETSTREAM_COMMAND_SHARDS", "16"))
    space = KeySpace(prefix, shards)
    keys = space.bot(validate_bot_id(ns.bot_id))
    print(
        json.dumps(
            {
                "bot_id": keys.bot_id,
                **keys.as_fields(),
                "global_events_key": space.global_events,
                "shard": keys.shard,
            },
            indent=2,
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
