"""Metric names out of PromQL, without a PromQL library.

Enough of the grammar to find every series selector in our dashboard and alert
expressions: strings, label matchers, range and subquery brackets, and the
grouping clauses are blanked out; what is left is function names (followed by
``(``), keywords, numbers, durations, Grafana variables and metric names.
Anything that is none of the first kinds is taken for a metric name, so a
typo in a name cannot slip through as "not a metric".
"""

from __future__ import annotations

import re

KEYWORDS = frozenset(
    {
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
        "bool",
        "and",
        "or",
        "unless",
        "offset",
        "atan2",
        "inf",
        "nan",
    }
)
# Aggregation operators and functions appear before "(" (or before "by (...) (").
AGGREGATIONS = frozenset(
    {
        "sum",
        "min",
        "max",
        "avg",
        "group",
        "stddev",
        "stdvar",
        "count",
        "count_values",
        "bottomk",
        "topk",
        "quantile",
        "limitk",
        "limit_ratio",
    }
)

_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_BRACES = re.compile(r"\{[^{}]*\}")
_BRACKETS = re.compile(r"\[[^\[\]]*\]")
_GROUPING = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)")
_GRAFANA_VAR = re.compile(r"\$\{?\w+\}?")
_IDENT = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*")
_NUMBER_OR_DURATION = re.compile(r"(?<![A-Za-z0-9_:.])\d[\d.eE+-]*(ms|s|m|h|d|w|y)?(?![A-Za-z0-9_:])")


def metric_names(expr: str) -> set[str]:
    """The metric names an expression selects."""
    text = _STRING.sub(" ", expr)
    text = _GRAFANA_VAR.sub(" ", text)
    text = _BRACES.sub(" ", text)
    text = _BRACKETS.sub(" ", text)
    text = _GROUPING.sub(r" \1 ", text)
    text = _NUMBER_OR_DURATION.sub(" ", text)
    names = set()
    for match in _IDENT.finditer(text):
        word = match.group()
        rest = text[match.end() :].lstrip()
        if word.lower() in KEYWORDS:
            continue
        if rest.startswith("(") or word in AGGREGATIONS:
            continue  # a function call or an aggregation
        names.add(word)
    return names


def series_labels(expr: str) -> dict[str, set[str]]:
    """For each ``name{matchers}`` in the expression, the label names it matches on."""
    text = _STRING.sub('""', expr)
    found: dict[str, set[str]] = {}
    for match in re.finditer(r"([A-Za-z_:][A-Za-z0-9_:]*)\s*\{([^{}]*)\}", text):
        labels = {m.group(1) for m in re.finditer(r"([A-Za-z_][A-Za-z0-9_]*)\s*(=~|!~|!=|=)", match.group(2))}
        found.setdefault(match.group(1), set()).update(labels)
    return found


def grouping_labels(expr: str) -> set[str]:
    """Label names in ``by (...)`` and ``without (...)`` clauses."""
    labels: set[str] = set()
    for match in re.finditer(r"\b(?:by|without)\s*\(([^()]*)\)", expr):
        labels.update(part.strip() for part in match.group(1).split(",") if part.strip())
    return labels
