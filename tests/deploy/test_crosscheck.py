"""The chart, the compose file and the dashboard against the code they deploy:
settings the gateway reads, the ports and paths it serves, the metrics it exports.

The running-gateway tests start a real gateway (tests/conftest.py) on free ports."""

from __future__ import annotations

import asyncio
import json
import re
import urllib.error
import urllib.request
from dataclasses import fields
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from gateway.app import Gateway
from gateway.embedded_redis import free_port
from gateway.settings import Settings, env_name
from tests.conftest import running_gateway
from tests.deploy.conftest import CHART, ROOT, RenderedChart
from tests.deploy.promql import grouping_labels, metric_names, series_labels
from workers import Worker, WorkerSettings

SETTINGS_ENV = {env_name(f.name) for f in fields(Settings)}
DASHBOARD = CHART / "dashboards" / "meetstream-gateway.json"
COMPOSE = ROOT / "deploy" / "compose.yaml"
# Labels Prometheus adds to every scraped series (ServiceMonitor targets), beside the gateway's own.
TARGET_LABELS = {"namespace", "pod", "job", "instance", "service", "container", "endpoint"}


def gateway_env(rendered: RenderedChart) -> list[dict[str, Any]]:
    return rendered.gateway_container()["env"]


def resolve_env(env: list[dict[str, Any]]) -> dict[str, str]:
    """What the kubelet would hand the process, with stand-ins for secrets and the pod name."""
    resolved = {}
    for entry in env:
        if "value" in entry:
            resolved[entry["name"]] = entry["value"]
        elif "secretKeyRef" in entry["valueFrom"]:
            resolved[entry["name"]] = "redis://redis:6379/0" if "REDIS_URL" in entry["name"] else "s3cret"
        else:
            assert entry["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
            resolved[entry["name"]] = "ms-meetstream-gateway-5d9f7-abcde"
    return resolved


# -- environment ----------------------------------------------------------------------


def test_every_env_var_of_the_gateway_is_a_setting(each_render: RenderedChart) -> None:
    names = [e["name"] for e in gateway_env(each_render)]
    assert len(names) == len(set(names)), "an env var is set twice"
    unknown = set(names) - SETTINGS_ENV
    assert not unknown, f"the chart sets variables the gateway does not read: {sorted(unknown)}"


def test_auth_secret_is_wired_to_the_setting(all_on_render: RenderedChart) -> None:
    assert "MEETSTREAM_AUTH_SECRET" in SETTINGS_ENV, "gateway.settings has no auth_secret yet"
    assert "MEETSTREAM_AUTH_SECRET" in {e["name"] for e in gateway_env(all_on_render)}


def test_chart_env_builds_the_intended_settings(
    each_render: RenderedChart, all_on_values: dict[str, Any]
) -> None:
    container = each_render.gateway_container()
    settings = Settings.from_sources([], resolve_env(container["env"]))
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert settings.port == ports["websocket"]
    assert settings.metrics_port == ports["metrics"]
    assert settings.gateway_id == "ms-meetstream-gateway-5d9f7-abcde"
    assert settings.redis_url  # never the embedded redis-server in Kubernetes
    grace = each_render.gateway()["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert settings.drain_timeout_s < grace
    if settings.key_prefix != "meetstream":  # the all-on render
        g = all_on_values["gateway"]
        assert settings.drain_timeout_s == g["drainTimeoutSeconds"]
        assert settings.log_format == g["logFormat"] and settings.log_level == g["logLevel"]
        for name, value in g["settings"].items():
            assert str(getattr(settings, name)) == str(value) or getattr(settings, name) == value, name


def test_compose_env_are_settings_and_the_bot_reaches_the_gateway() -> None:
    compose = yaml.safe_load(COMPOSE.read_text())
    services = compose["services"]
    assert set(services) >= {"redis", "gateway", "greeter", "bot"}
    assert set(services["gateway"]["environment"]) <= SETTINGS_ENV
    port = Settings().port
    assert services["bot"]["entrypoint"] == ["python", "-m", "gateway.testing.bot"]
    command = services["bot"]["command"]
    assert command[command.index("--url") + 1] == f"ws://gateway:{port}"
    assert command[command.index("--bot-id") + 1] == "demo"
    # "${PUBLISH_ADDR:-127.0.0.1}:${GATEWAY_PORT:-8765}:8765": the container side is the gateway's port.
    assert str(port) in [p.rsplit(":", 1)[-1] for p in services["gateway"]["ports"]]
    assert [*services["greeter"]["entrypoint"], *services["greeter"]["command"]] == [
        "python",
        "-m",
        "workers",
        "greeter",
    ]


def _workers_source() -> str:
    return "\n".join(p.read_text() for p in sorted((ROOT / "workers").rglob("*.py")))


def test_worker_env_vars_are_read_by_the_workers(all_on_render: RenderedChart) -> None:
    source = _workers_source()
    if "MEETSTREAM_WORKER_GROUP" not in source:
        pytest.skip("the worker SDK is not in this tree yet")
    read = set(re.findall(r"[\"'](MEETSTREAM_[A-Z0-9_]+)[\"']", source))
    for deployment in all_on_render.of_kind("Deployment"):
        if deployment is all_on_render.gateway():
            continue
        (container,) = deployment["spec"]["template"]["spec"]["containers"]
        names = {e["name"] for e in container["env"]}
        assert names <= read, f"{deployment['metadata']['name']}: {sorted(names - read)} not read by workers/"
    from workers.__main__ import EXAMPLES

    workers = {d["metadata"]["name"].rsplit("-", 1)[1] for d in all_on_render.of_kind("Deployment")}
    assert set(EXAMPLES) <= workers


# -- probes, against a running gateway -------------------------------------------------------


async def _get(port: int, path: str) -> int:
    def fetch() -> int:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
                return response.status
        except urllib.error.HTTPError as exc:
            return exc.code

    return await asyncio.to_thread(fetch)


async def test_probe_paths_are_served_on_the_metrics_port(
    redis_url: str, default_render: RenderedChart
) -> None:
    """1. render the chart; 2. start a gateway; 3. GET each probe's path on the port the probe
    names (resolved to the settings the chart gives); 4. drain: readiness fails, liveness holds."""
    container = default_render.gateway_container()
    settings = Settings.from_sources([], resolve_env(container["env"]))
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    probes = {k: container[k]["httpGet"] for k in ("startupProbe", "livenessProbe", "readinessProbe")}
    assert {ports[p["port"]] for p in probes.values()} == {settings.metrics_port}
    async with running_gateway(redis_url) as gw:
        port = gw.probes.port  # the gateway's metrics server, on a free port in tests
        for name, probe in probes.items():
            assert await _get(port, probe["path"]) == 200, name
        assert await _get(port, "/no-such-probe") == 404  # the server does tell paths apart
        await gw.drain(timeout_s=0)
        assert await _get(port, probes["readinessProbe"]["path"]) == 503
        assert await _get(port, probes["livenessProbe"]["path"]) == 200


# -- metrics named in the dashboard, the alerts and the HPA -------------------------------


def _dashboard_expressions() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = []

    def panels(items: list[dict[str, Any]]) -> None:
        for panel in items:
            exprs.extend(t["expr"] for t in panel.get("targets", []))
            panels(panel.get("panels", []))

    panels(dashboard["panels"])
    for var in dashboard["templating"]["list"]:
        query = var.get("query")
        if isinstance(query, dict):
            query = query["query"]
        match = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", query or "")
        if match:
            exprs.append(match.group(1))
    return exprs


def _scrape_port(port: int) -> dict[str, set[str]]:
    """Sample name -> label names, from ``/metrics`` on a local port."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    samples: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, set()).update(sample.labels)
    return samples


def _scrape(gw: Gateway) -> dict[str, set[str]]:
    """Sample name -> label names, from the gateway's own /metrics."""
    return _scrape_port(gw.probes.port)


@pytest.fixture
async def gateway_exported(redis_url: str) -> dict[str, set[str]]:
    async with running_gateway(redis_url) as gw:
        return await asyncio.to_thread(_scrape, gw)


@pytest.fixture
async def worker_exported(redis_url: str) -> dict[str, set[str]]:
    """What an SDK worker serves on its metrics port (as the chart's workers do)."""
    port = free_port()
    worker = Worker(
        WorkerSettings(redis_url=redis_url, group="deploy", metrics_port=port, metrics_host="127.0.0.1"),
        handle_signals=False,
    )
    await worker.start()
    try:
        return await asyncio.to_thread(_scrape_port, port)
    finally:
        await worker.stop()


@pytest.fixture
def exported(
    gateway_exported: dict[str, set[str]], worker_exported: dict[str, set[str]]
) -> dict[str, set[str]]:
    """Every series the dashboard and the alerts may name: the gateway's and the workers'."""
    assert not set(gateway_exported) & set(worker_exported)
    return {**gateway_exported, **worker_exported}


def test_dashboard_has_every_panel_it_promises() -> None:
    titles = {p["title"] for p in json.loads(DASHBOARD.read_text())["panels"]}
    exprs = " ".join(_dashboard_expressions())
    for needed in (
        "bots_connected",
        "audio_frames_received_total",
        "stream_entries_published_total",
        "frames_dropped_total",
        "commands_delivered_total",
        "commands_rejected_total",
        "command_delivery_seconds_bucket",
        "redis_roundtrip_seconds_bucket",
    ):
        assert f"meetstream_gateway_{needed}" in exprs, needed
    assert "Drops by reason" in titles
    for needed in (
        "bots_owned",
        "bots_known",
        "entries_handled_total",
        "handler_seconds_bucket",
        "stream_lag_entries",
        "stream_lag_seconds",
        "audio_seq_gaps_total",
        "takeovers_total",
        "own_voice_frames_skipped_total",
    ):
        assert f"meetstream_worker_{needed}" in exprs, needed


def _check_expressions(exprs: list[str], exported: dict[str, set[str]]) -> None:
    assert exprs
    for expr in exprs:
        names = metric_names(expr)
        assert names, f"no metric in {expr!r}"
        missing = names - set(exported)
        assert not missing, f"{expr!r} names {sorted(missing)}, not on the gateway's or a worker's /metrics"
        known = set().union(*(exported[n] for n in names)) | TARGET_LABELS | {"le"}
        used = grouping_labels(expr).union(*series_labels(expr).values())
        assert used <= known, f"{expr!r} uses labels {sorted(used - known)} that its metrics lack"


def test_dashboard_metrics_exist_on_a_running_gateway(exported: dict[str, set[str]]) -> None:
    _check_expressions(_dashboard_expressions(), exported)


def test_alert_and_hpa_metrics_exist_on_a_running_gateway(
    all_on_render: RenderedChart, exported: dict[str, set[str]]
) -> None:
    group = all_on_render.rule_group("meetstream-gateway")
    _check_expressions([rule["expr"] for rule in group["rules"]], exported)
    hpa = all_on_render.one("HorizontalPodAutoscaler")
    custom = {m["pods"]["metric"]["name"] for m in hpa["spec"]["metrics"] if m["type"] == "Pods"}
    assert custom and custom <= set(exported)


def test_worker_alert_metrics_exist_on_a_running_worker(
    all_on_render: RenderedChart, worker_exported: dict[str, set[str]]
) -> None:
    group = all_on_render.rule_group("meetstream-workers")
    _check_expressions([rule["expr"] for rule in group["rules"]], worker_exported)


def test_worker_metrics_have_bounded_labels(worker_exported: dict[str, set[str]]) -> None:
    """No bot_id, conn or instance id as a label: bots and connections are unbounded."""
    labels = set().union(*worker_exported.values())
    assert labels <= {"group", "stream", "reason", "outcome", "le"}, labels
    assert all(name.startswith("meetstream_worker_") for name in worker_exported)


@pytest.mark.parametrize(
    "expr",
    [
        "sum(rate(meetstream_gateway_frames_droped_total[5m]))",  # misspelt
        "sum by (reasn) (rate(meetstream_gateway_frames_dropped_total[5m]))",  # no such label
        "histogram_quantile(0.99, rate(meetstream_gateway_bots_connected_bucket[5m]))",  # not a histogram
        'rate(meetstream_gateway_redis_errors_total{operation="ping"}[5m])',  # label is "op"
        "max(meetstream_worker_stream_lag_entry{stream='audio'})",  # misspelt
        "max by (bot_id) (meetstream_worker_stream_lag_entries)",  # no bot_id label, ever
        'sum(rate(meetstream_worker_handler_failures_total{kind="error"}[5m]))',  # label is "outcome"
    ],
)
def test_the_metric_check_refuses_wrong_expressions(expr: str, exported: dict[str, set[str]]) -> None:
    with pytest.raises(AssertionError):
        _check_expressions([expr], exported)
