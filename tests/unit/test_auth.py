"""Bot tokens: signing, expiry, binding, rotation, extraction, and log scrubbing."""

import base64
import hashlib
import hmac
import io
import json
import logging

import pytest

from gateway.auth import AuthError, check_bot, mint, redact_query, token_from_request, verify
from gateway.exceptions import ConfigError
from gateway.logs import JsonFormatter, ScrubFilter, scrub
from gateway.settings import Settings


def test_round_trip_and_binding():
    token = mint("s1", 60, "bot_1", now=1000)
    claims = verify(["s1"], token, now=1030)
    assert (claims.bot, claims.exp, claims.iat) == ("bot_1", 1060, 1000)
    check_bot(claims, "bot_1")
    check_bot(claims, None)  # bare path: checked again at the handshake
    with pytest.raises(AuthError) as err:
        check_bot(claims, "bot_2")
    assert (err.value.reason, err.value.status) == ("wrong_bot", 403)
    check_bot(verify(["s1"], mint("s1", 60, now=1000), now=1001), "any_bot")


@pytest.mark.parametrize(
    ("token", "secrets", "now", "reason"),
    [
        (mint("s1", 60, now=1000), ["s1"], 1061, "expired"),
        (mint("s1", 60, now=1000), ["other"], 1001, "bad_signature"),
        (mint("s1", 60, now=1000)[:-2] + "xx", ["s1"], 1001, "bad_signature"),
        ("v1.abc", ["s1"], 1001, "malformed"),
        ("v2.a.b", ["s1"], 1001, "malformed"),
        ("v1.!!!.???", ["s1"], 1001, "malformed"),
    ],
)
def test_refusals(token, secrets, now, reason):
    with pytest.raises(AuthError) as err:
        verify(secrets, token, now=now)
    assert err.value.reason == reason
    assert err.value.status == 401


def test_tampered_claims_fail_the_signature():
    head, _body, sig = mint("s1", 60, "bot_1", now=1000).split(".")
    forged = mint("attacker", 10**9, "bot_1", now=1000).split(".")[1]
    with pytest.raises(AuthError, match="bad_signature"):
        verify(["s1"], f"{head}.{forged}.{sig}", now=1001)


def test_rotation_any_configured_secret_verifies():
    old = mint("old", 60, now=1000)
    assert verify(["new", "old"], old, now=1001).exp == 1060


def test_token_sources():
    assert token_from_request("/b/audio?token=abc&x=1", None) == "abc"
    assert token_from_request("/b/audio", "Bearer xyz") == "xyz"
    with pytest.raises(AuthError, match="missing"):
        token_from_request("/b/audio?token=", "Basic Zm9v")
    assert redact_query("/b/audio?token=abc") == "/b/audio"


def test_scrubbed_from_any_log_line():
    token = mint("s1", 60, "bot_1")
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(ScrubFilter())
    logger = logging.getLogger("test.scrub")
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        logger.debug("> GET /bot_1/audio?token=%s HTTP/1.1", token)
        logger.info("request", extra={"url": f"wss://h/bot_1/control?token={token}"})
        logger.info("header Authorization: Bearer %s", token)
    finally:
        logger.removeHandler(handler)
    text = out.getvalue()
    assert token not in text
    assert text.count("[redacted]") == 3
    assert scrub("no secrets here") == "no secrets here"


# -- Hostile tokens and secrets (issue 20) ----------------------------------------------------


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _signed(secret: str, claims: bytes) -> str:
    """A token over any claim bytes, signed as mint() signs."""
    signed = f"v1.{_b64(claims)}"
    sig = hmac.new(secret.encode(), signed.encode(), hashlib.sha256).digest()
    return f"{signed}.{_b64(sig)}"


DEEP = b"[" * 100_000 + b"]" * 100_000


def test_unsigned_claims_are_not_decoded():
    """Deep claims under a forged signature gave HTTP 500 and a traceback per request."""
    forged = f"v1.{_b64(DEEP)}.{_b64(b'x' * 32)}"
    with pytest.raises(AuthError) as err:
        verify(["s1"], forged, now=1001)
    assert err.value.reason == "bad_signature"


def test_unsigned_token_costs_only_the_hmac(monkeypatch):
    import gateway.auth

    def no_decoding(*args, **kwargs):
        raise AssertionError("claims decoded before the signature was checked")

    monkeypatch.setattr(gateway.auth.json, "loads", no_decoding)
    head, body, _sig = mint("attacker", 60, now=1000).split(".")
    with pytest.raises(AuthError, match="bad_signature"):
        verify(["s1"], f"{head}.{body}.{_b64(b'y' * 32)}", now=1001)


@pytest.mark.parametrize(
    "claims",
    [
        DEEP,
        b'{"exp": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
        b"\xff\xfe not utf-8",
        b'{"exp": 2000, "iat": "yesterday"}',
        b'{"exp": 2000, "iat": [1]}',
        b'{"exp": 2000, "iat": 1e999}',
        b'{"exp": true}',
        b'{"exp": NaN}',
        b"[1, 2]",
    ],
    ids=["deep", "deep_exp", "not_utf8", "iat_text", "iat_list", "iat_inf", "exp_bool", "exp_nan", "list"],
)
def test_signed_claims_that_do_not_decode_are_malformed(claims):
    """Only a holder of the secret can get here, but a bug in a minter is no reason for a 500."""
    with pytest.raises(AuthError) as err:
        verify(["s1"], _signed("s1", claims), now=1001)
    assert err.value.reason == "malformed"
    assert err.value.status == 401


@pytest.mark.parametrize(
    "token",
    ["v1.abc\udcff.def", "v1.a\u00e9b.cd", "v1.a b.cd", "v1.ab.c+d", "v1.ab.cd="],
    ids=["surrogate", "non_ascii", "space", "not_base64url", "padding"],
)
def test_tokens_outside_the_base64url_alphabet_are_malformed(token):
    with pytest.raises(AuthError) as err:
        verify(["s1"], token, now=1001)
    assert err.value.reason == "malformed"


def test_signed_claims_still_verify():
    claims = json.dumps({"exp": 2000, "bot": "b1", "iat": 1000}).encode()
    assert verify(["s1"], _signed("s1", claims), now=1001).bot == "b1"


@pytest.mark.parametrize("secret", [" , ", ",", "  ", ",,,", " ,\t, "])
def test_a_secret_of_only_commas_or_spaces_refuses_to_start(secret):
    """A "$NEW,$OLD" with both unset would otherwise disable auth without the AUTH DISABLED warning."""
    with pytest.raises(ConfigError, match="auth_secret has no secret in it"):
        Settings(auth_secret=secret)
    with pytest.raises(ConfigError, match="auth_secret has no secret in it"):
        Settings.from_sources([], {"MEETSTREAM_AUTH_SECRET": secret})


@pytest.mark.parametrize("secret", ["", "new", "new,", ",old", "new,,old", " new , old "])
def test_empty_items_beside_a_secret_are_ignored(secret):
    """Rotation leaves "$NEW," once $OLD is retired: still signed, still checked; "" disables auth."""
    assert Settings(auth_secret=secret).auth_secret == secret
