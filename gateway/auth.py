"""Bot connection tokens: HMAC-signed, expiring, optionally bound to one bot (pure; no I/O).

A Meetstream ``websocket_url`` can carry nothing but its URL, so the token rides
in the query string (``wss://host/{bot_id}/audio?token=...``); an
``Authorization: Bearer`` header is accepted too. Format::

    v1.<base64url(JSON claims)>.<base64url(HMAC-SHA256(secret, "v1." + claims))>

claims: ``exp`` (Unix seconds, required), ``bot`` (a bot_id, optional), ``iat``.
Several secrets may be configured (comma-separated) for rotation: the first
signs, any verifies. Signatures are compared in constant time.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
import time
from dataclasses import dataclass
from urllib.parse import parse_qs, urlsplit

from gateway.exceptions import GatewayError

VERSION = "v1"
#: Why a connection was refused; a closed set, used as a metric label.
AUTH_FAILURES = ("missing", "malformed", "bad_signature", "expired", "wrong_bot")
_BASE64URL = re.compile(r"[A-Za-z0-9_-]+")


class AuthError(GatewayError):
    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(reason, detail)
        self.reason = reason
        self.detail = detail

    @property
    def status(self) -> int:
        """401 for no valid credentials, 403 for a valid token used for another bot."""
        return 403 if self.reason == "wrong_bot" else 401

    def __str__(self) -> str:
        return f"{self.reason}: {self.detail}"


@dataclass(frozen=True, slots=True)
class Claims:
    exp: int
    bot: str | None = None
    iat: int = 0


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _sign(secret: str, signed: str) -> bytes:
    return hmac.new(secret.encode(), signed.encode(), hashlib.sha256).digest()


def split_secrets(value: str) -> list[str]:
    """The secrets of a comma-separated setting; empty items are skipped (``"$NEW,$OLD"``
    with ``$OLD`` retired is ``"new,"``). Settings refuse a value with none in it."""
    return [s.strip() for s in value.split(",") if s.strip()]


def mint(secret: str, ttl_s: int, bot_id: str | None = None, now: float | None = None) -> str:
    """A token valid for ``ttl_s`` seconds, for one bot or (``bot_id=None``) any."""
    now = time.time() if now is None else now
    claims: dict[str, object] = {"exp": int(now + ttl_s), "iat": int(now)}
    if bot_id is not None:
        claims["bot"] = bot_id
    body = _b64(json.dumps(claims, separators=(",", ":"), sort_keys=True).encode())
    signed = f"{VERSION}.{body}"
    return f"{signed}.{_b64(_sign(secret, signed))}"


def verify(secrets: list[str], token: str, now: float | None = None) -> Claims:
    """Check signature and expiry; the caller checks the bot binding with :func:`check_bot`.

    The signature is checked before the claims are decoded: a token nobody signed
    costs its shape check and the HMACs, never a JSON parse (deeply nested claims
    made that an HTTP 500 per request).
    """
    parts = token.split(".")
    if len(parts) != 3 or parts[0] != VERSION or not all(map(_BASE64URL.fullmatch, parts[1:])):
        raise AuthError("malformed", "token is not v1.<claims>.<signature> in base64url")
    signed = f"{parts[0]}.{parts[1]}"
    try:
        signature = _unb64(parts[2])
    except ValueError as exc:  # a length no base64 has
        raise AuthError("malformed", "token signature does not decode") from exc
    # Compare against every secret, always: no early exit that times which one matched.
    matched = False
    for secret in secrets:
        matched |= hmac.compare_digest(_sign(secret, signed), signature)
    if not matched:
        raise AuthError("bad_signature", "token signature does not match")
    claims = _decode_claims(parts[1])
    now = time.time() if now is None else now
    if claims.exp < now:
        raise AuthError("expired", "token has expired")
    return claims


def _decode_claims(body: str) -> Claims:
    """Signed claims, checked all the same: a bug in whatever minted them is a refusal, not a 500."""
    try:
        claims = json.loads(_unb64(body))
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        raise AuthError("malformed", "token claims do not decode") from exc
    if not isinstance(claims, dict):
        raise AuthError("malformed", "token claims are not an object")
    exp, bot, iat = claims.get("exp"), claims.get("bot"), claims.get("iat", 0)
    if type(exp) is not int or type(iat) is not int:  # bool is an int subclass: not a time
        raise AuthError("malformed", "token claims lack an integer exp, or iat is not an integer")
    if bot is not None and not isinstance(bot, str):
        raise AuthError("malformed", "token bot claim is not a string")
    return Claims(exp, bot, iat)


def check_bot(claims: Claims, bot_id: str | None) -> None:
    """A token bound to a bot serves only that bot (checked again once a bare path's handshake names it)."""
    if claims.bot is not None and bot_id is not None and claims.bot != bot_id:
        raise AuthError("wrong_bot", "token is bound to another bot")


def token_from_request(path: str, authorization: str | None) -> str:
    """The token from ``?token=`` or ``Authorization: Bearer``; raises ``missing``."""
    query = parse_qs(urlsplit(path).query)
    values = query.get("token")
    if values and values[0]:
        return values[0]
    if authorization:
        scheme, _, value = authorization.partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            return value.strip()
    raise AuthError("missing", "no token in the query string or Authorization header")


def redact_query(path: str) -> str:
    """A request path safe to log: the query string (where tokens live) is cut off."""
    return path.split("?", 1)[0]
