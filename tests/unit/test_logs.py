"""Log records stay one printable line whatever an unauthenticated client put into them (issue 20)."""

from __future__ import annotations

import json
import logging

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.logs import JsonFormatter, KeyValueFormatter

# Everything that can end a line for some reader (str.splitlines, JavaScript, log shippers),
# every C0 and C1 control and DEL, lone surrogates (not UTF-8), a bidi override.
HOSTILE = "".join(map(chr, range(0x20))) + "\x7f" + "".join(map(chr, range(0x80, 0xA0)))
HOSTILE += "\u2028\u2029\udc00\ud83d\u202e"  # low then high surrogate: two lone ones, not a pair


def _record(msg: str = "bad request", **extra: object) -> logging.LogRecord:
    record = logging.LogRecord("gateway.test", logging.WARNING, __file__, 1, msg, None, None)
    for key, value in extra.items():
        setattr(record, key, value)
    return record


def _one_printable_line(line: str) -> None:
    assert line.isprintable(), [c for c in line if not c.isprintable()]
    assert len(line.splitlines()) == 1
    line.encode("utf-8")


def test_text_format_escapes_control_bytes_in_values_and_keys():
    line = KeyValueFormatter().format(_record(f"GET /{HOSTILE}", path=f"/a{HOSTILE}", **{f"k{HOSTILE}": 1}))
    _one_printable_line(line)
    assert "\\n" in line and "\\u001b" in line and "\\u0085" in line and "\\ud83d" in line


def test_text_format_leaves_printable_text_alone():
    line = KeyValueFormatter().format(_record("bot ready", bot_id="bot_1", speaker="Zoë Ørsted 山田", n=3))
    assert "bot_id=bot_1" in line and 'speaker="Zoë Ørsted 山田"' in line and "n=3" in line
    assert 'msg="bot ready"' in line


def test_text_format_quoted_values_read_back_as_json_strings():
    value = f'say "hi" = {HOSTILE} \\ done'
    line = KeyValueFormatter().format(_record("x", v=value))
    quoted = line.split(" v=", 1)[1]
    assert json.loads(quoted) == value


def test_json_format_is_one_ascii_safe_line_that_reads_back():
    line = JsonFormatter().format(_record(f"GET /{HOSTILE}", path=f"/a{HOSTILE}"))
    _one_printable_line(line)
    record = json.loads(line)
    assert record["msg"] == f"GET /{HOSTILE}" and record["path"] == f"/a{HOSTILE}"
    assert "Zoë" in JsonFormatter().format(_record("Zoë"))  # printable text is not escaped


@pytest.mark.parametrize("formatter", [KeyValueFormatter(), JsonFormatter()], ids=["text", "json"])
def test_exception_tracebacks_stay_on_one_line(formatter):
    try:
        raise ValueError(f"boom\n{HOSTILE}")
    except ValueError:
        record = _record("failed")
        import sys

        record.exc_info = sys.exc_info()
    _one_printable_line(formatter.format(record))


@given(st.text(st.characters(codec=None) | st.sampled_from(list(HOSTILE))), st.text(max_size=5))
def test_any_text_is_one_printable_line(value, key):
    for formatter in (KeyValueFormatter(), JsonFormatter()):
        line = formatter.format(_record(value, **{f"x{key}": value}))
        _one_printable_line(line)


def test_a_redis_error_in_a_log_line_keeps_what_redis_said():
    """redis-py 8 shows its errors as 'server:ResponseError', without the reply: a log of
    'redis node did not take a write' could not say whether it was CLUSTERDOWN or LOADING."""
    from redis.exceptions import ConnectionError as RedisConnectionError
    from redis.exceptions import ResponseError

    from gateway.logs import error_text

    exc = ResponseError("CLUSTERDOWN The cluster is down")
    assert "CLUSTERDOWN" not in repr(exc)  # why error_text exists
    assert error_text(exc) == "ResponseError: CLUSTERDOWN The cluster is down"
    assert error_text(RedisConnectionError()) == "ConnectionError"
    assert error_text(None) == ""
    assert len(error_text(ResponseError("x" * 1000))) == 300
