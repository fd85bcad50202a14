"""Bot tokens: signing, expiry, binding, rotation, extraction, and log scrubbing."""

import io
import logging

import pytest

from gateway.auth import AuthError, check_bot, mint, redact_query, token_from_request, verify
from gateway.logs import JsonFormatter, ScrubFilter, scrub


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
