"""The Helm chart, rendered by real Helm with default values and with every
option on: lint, the Kubernetes API schema of every object, and the
properties the gateway relies on (drain, probes, security, secrets)."""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import helm_python as helm
import jsonschema
import kubernetes_validate
import pytest
import yaml

from gateway.protocol import parse_path
from gateway.settings import Settings
from tests.deploy.conftest import ALL_ON_VALUES, CHART, NAMESPACE, RELEASE, RenderedChart

SCHEMAS = Path(__file__).parent / "schemas"
# The oldest Kubernetes the chart supports (Chart.yaml kubeVersion) and the newest schemas we have.
KUBE_VERSIONS = ("1.27.0", kubernetes_validate.utils.latest_version())
WORKERS = ("greeter", "recorder", "bargein", "announcer")


def merged(chart: helm.Chart, values: dict[str, Any] | None) -> dict[str, Any]:
    return chart.merge_values(values)


def env_of(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in container.get("env", [])}


def pod_specs(rendered: RenderedChart) -> Iterator[tuple[str, dict[str, Any]]]:
    for deployment in rendered.of_kind("Deployment"):
        yield deployment["metadata"]["name"], deployment["spec"]["template"]["spec"]


# -- Helm itself -------------------------------------------------------------------


@pytest.mark.parametrize("values_file", [None, ALL_ON_VALUES], ids=["default", "all-on"])
def test_helm_lint_is_clean(values_file: Path | None) -> None:
    values = yaml.safe_load(values_file.read_text()) if values_file else None
    report = helm.lint(CHART, values, strict=True, namespace=NAMESPACE)
    problems = [m for m in report["messages"] if m["severity"] >= 2]  # warnings and errors
    assert report["total_charts_linted"] == 1
    assert not report["errors"] and not problems, report


def test_default_render_has_the_core_objects_only(default_render: RenderedChart) -> None:
    kinds = sorted(o["kind"] for o in default_render.objects)
    assert kinds == ["Deployment", "PodDisruptionBudget", "Secret", "Service", "ServiceAccount"]


def test_all_on_values_turn_every_option_on(
    all_on_values: dict[str, Any], all_on_render: RenderedChart
) -> None:
    def enabled_flags(node: Any, path: str = "") -> Iterator[tuple[str, Any]]:
        if isinstance(node, dict):
            for key, value in node.items():
                if key in ("enabled", "create", "websocketAnnotations"):
                    yield f"{path}.{key}", value
                yield from enabled_flags(value, f"{path}.{key}")

    chart_defaults = yaml.safe_load((CHART / "values.yaml").read_text())
    flags_in_chart = {p for p, _ in enabled_flags(chart_defaults)}
    flags_on = {p for p, v in enabled_flags(all_on_values) if v is True}
    assert flags_in_chart <= flags_on, f"options left off in all-on-values: {flags_in_chart - flags_on}"
    assert all_on_values["autoscaling"]["targetBotsPerPod"] > 0
    assert all_on_values["auth"]["secret"] and all_on_values["redis"]["existingSecret"]
    kinds = {o["kind"] for o in all_on_render.objects}
    assert kinds == {
        "Deployment",
        "Service",
        "Secret",
        "ServiceAccount",
        "Ingress",
        "HorizontalPodAutoscaler",
        "PodDisruptionBudget",
        "ServiceMonitor",
        "PrometheusRule",
        "ConfigMap",
    }
    assert len(all_on_render.of_kind("Deployment")) == 1 + len(WORKERS)


# -- every object against the API schema of its kind ------------------------------------


def _closed(schema: Any) -> Any:
    """A CRD's structural schema with unknown fields refused, as `kubectl --validate=strict` does."""
    if isinstance(schema, dict):
        schema = {k: _closed(v) for k, v in schema.items()}
        if (
            "properties" in schema
            and "additionalProperties" not in schema
            and not schema.get("x-kubernetes-preserve-unknown-fields")
        ):
            schema["additionalProperties"] = False
        return schema
    if isinstance(schema, list):
        return [_closed(v) for v in schema]
    return schema


def validate_object(obj: dict[str, Any], kube_version: str) -> None:
    group = obj["apiVersion"].split("/")[0]
    if group == "monitoring.coreos.com":
        # Prometheus Operator CRDs are not in Kubernetes' schema: their own openAPIV3Schema
        # (vendored from prometheus-operator v0.93.0, example/prometheus-operator-crd/).
        path = SCHEMAS / f"{obj['kind'].lower()}-monitoring-{obj['apiVersion'].split('/')[1]}.json"
        jsonschema.Draft7Validator(_closed(json.loads(path.read_text()))).validate(obj)
    else:
        kubernetes_validate.validate(obj, kube_version, strict=True)


@pytest.mark.parametrize("kube_version", KUBE_VERSIONS)
def test_every_object_matches_the_kubernetes_schema(each_render: RenderedChart, kube_version: str) -> None:
    assert each_render.objects
    for obj in each_render.objects:
        try:
            validate_object(obj, kube_version)
        except (jsonschema.ValidationError, kubernetes_validate.ValidationError) as exc:
            pytest.fail(
                f"{obj['kind']}/{obj['metadata']['name']} at {list(exc.absolute_path)}: {exc.message}"
            )


def test_the_validator_refuses_a_wrong_object(
    default_render: RenderedChart, all_on_render: RenderedChart
) -> None:
    """The schemas bite: a misspelt field fails, in core kinds and in the CRDs."""
    deployment = json.loads(json.dumps(default_render.gateway()))
    deployment["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        validate_object(deployment, KUBE_VERSIONS[-1])
    monitor = json.loads(json.dumps(all_on_render.one("ServiceMonitor", f"{RELEASE}-meetstream-gateway")))
    monitor["spec"]["endpoints"][0]["intervall"] = "30s"
    with pytest.raises(jsonschema.ValidationError):
        validate_object(monitor, KUBE_VERSIONS[-1])


# -- values.schema.json ------------------------------------------------------------------


def test_schema_covers_every_value_and_refuses_unknown_ones(chart: helm.Chart) -> None:
    schema = json.loads((CHART / "values.schema.json").read_text())
    values = yaml.safe_load((CHART / "values.yaml").read_text())

    def walk(value: Any, node: dict[str, Any], path: str) -> None:
        assert node.get("description") or path == "", f"{path}: no description in the schema"
        if "properties" in node:
            assert node.get("additionalProperties") is False, f"{path}: schema accepts unknown keys"
            assert set(node.get("required", [])) == set(node["properties"]), f"{path}: not every key required"
            assert isinstance(value, dict), path
            assert set(value) == set(node["properties"]), f"{path}: values and schema differ"
            for key, sub in value.items():
                walk(sub, node["properties"][key], f"{path}.{key}")
        else:
            # A leaf, or a free-form Kubernetes object (resources, affinity...): its type is still checked.
            jsonschema.Draft7Validator(node).validate(value)

    walk(values, schema, "")


@pytest.mark.parametrize(
    "values",
    [
        {"gateway": {"drainTimeoutSecond": 300}},
        {"gateway": {"drainTimeoutSeconds": "300"}},
        {"gateway": {"settings": {"redis_url": "redis://x"}}},  # secrets only through Secrets
        {"gateway": {"settings": {"drain_timeout_s": 10}}},  # one source for the drain time
        {"redis": {"url": "http://redis:6379"}},
        {"ingress": {"proxyTimeoutSeconds": 30}},
        {"workers": {"greeter": {"enabled": "yes"}}},
    ],
)
def test_schema_refuses_bad_values(chart: helm.Chart, values: dict[str, Any]) -> None:
    with pytest.raises(helm.HelmValuesError):
        chart.render(values, name=RELEASE, namespace=NAMESPACE)


def test_render_without_redis_fails_with_a_clear_message(chart: helm.Chart) -> None:
    with pytest.raises(helm.HelmError, match=r"redis\.url or redis\.existingSecret is required"):
        chart.render({"redis": {"url": ""}}, name=RELEASE, namespace=NAMESPACE)


# -- drain, probes, security ---------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides", [None, {"gateway": {"drainTimeoutSeconds": 7200, "preStopSleepSeconds": 0}}]
)
def test_grace_period_covers_prestop_drain_and_shutdown(
    chart: helm.Chart,
    render: Callable[..., RenderedChart],
    all_on_values: dict[str, Any],
    overrides: dict[str, Any] | None,
) -> None:
    for values in [overrides] if overrides else [None, all_on_values]:
        rendered = render(values)
        g = merged(chart, values)["gateway"]
        spec = rendered.gateway()["spec"]["template"]["spec"]
        container = rendered.gateway_container()
        env = env_of(container)
        assert float(env["MEETSTREAM_DRAIN_TIMEOUT_S"]["value"]) == g["drainTimeoutSeconds"]
        assert container["lifecycle"]["preStop"]["exec"]["command"] == [
            "sleep",
            str(g["preStopSleepSeconds"]),
        ]
        # The kubelet's clock starts before preStop: the sleep and the whole drain must fit,
        # and then the socket close (15 s) and the Redis flush (10 s) of gateway.app.
        grace = spec["terminationGracePeriodSeconds"]
        assert grace == g["preStopSleepSeconds"] + g["drainTimeoutSeconds"] + g["shutdownMarginSeconds"]
        assert grace >= g["preStopSleepSeconds"] + g["drainTimeoutSeconds"] + 25


def test_rolling_update_surges_before_draining(default_render: RenderedChart) -> None:
    strategy = default_render.gateway()["spec"]["strategy"]
    assert strategy["rollingUpdate"] == {"maxSurge": 1, "maxUnavailable": 0}


def test_probes_use_the_metrics_port(each_render: RenderedChart) -> None:
    container = each_render.gateway_container()
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    for probe, path in (
        ("livenessProbe", "/healthz"),
        ("readinessProbe", "/readyz"),
        ("startupProbe", "/healthz"),
    ):
        get = container[probe]["httpGet"]
        assert get["path"] == path and get["port"] == "metrics", probe
    assert int(env_of(container)["MEETSTREAM_METRICS_PORT"]["value"]) == ports["metrics"]
    assert int(env_of(container)["MEETSTREAM_PORT"]["value"]) == ports["websocket"]


def test_every_pod_is_restricted(each_render: RenderedChart) -> None:
    for name, spec in pod_specs(each_render):
        pod = spec["securityContext"]
        assert pod["runAsNonRoot"] is True and pod["runAsUser"] != 0, name
        assert pod["seccompProfile"] == {"type": "RuntimeDefault"}, name
        assert spec["automountServiceAccountToken"] is False, name
        tmp = {v["name"] for v in spec["volumes"] if "emptyDir" in v}
        for container in spec["containers"]:
            sc = container["securityContext"]
            assert sc["runAsNonRoot"] is True, name
            assert sc["readOnlyRootFilesystem"] is True, name
            assert sc["allowPrivilegeEscalation"] is False, name
            assert sc["capabilities"]["drop"] == ["ALL"] and "add" not in sc["capabilities"], name
            assert sc["seccompProfile"] == {"type": "RuntimeDefault"}, name
            assert {m["name"] for m in container["volumeMounts"] if m["mountPath"] == "/tmp"} & tmp, name
            assert container["resources"]["requests"]["cpu"] and container["resources"]["limits"]["memory"], (
                name
            )


def test_topology_spread_selects_the_gateway_pods(each_render: RenderedChart) -> None:
    deployment = each_render.gateway()
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    spread = deployment["spec"]["template"]["spec"]["topologySpreadConstraints"]
    assert {c["topologyKey"] for c in spread} == {"topology.kubernetes.io/zone", "kubernetes.io/hostname"}
    for constraint in spread:
        assert constraint["labelSelector"]["matchLabels"].items() <= labels.items()


def test_selectors_match_the_pods(each_render: RenderedChart) -> None:
    pods = each_render.gateway()["spec"]["template"]["metadata"]["labels"]
    for deployment in each_render.of_kind("Deployment"):
        assert deployment["spec"]["selector"]["matchLabels"].items() <= (
            deployment["spec"]["template"]["metadata"]["labels"].items()
        )
    assert each_render.gateway_service()["spec"]["selector"].items() <= pods.items()
    assert each_render.one("PodDisruptionBudget")["spec"]["selector"]["matchLabels"].items() <= pods.items()
    # Workers must not be picked up by the gateway's Service, PDB or spread.
    for deployment in each_render.of_kind("Deployment"):
        if deployment is not each_render.gateway():
            worker_labels = deployment["spec"]["template"]["metadata"]["labels"]
            assert not each_render.gateway_service()["spec"]["selector"].items() <= worker_labels.items()


# -- secrets ------------------------------------------------------------------------


def _secret_refs(rendered: RenderedChart, var: str) -> list[dict[str, Any]]:
    refs = []
    for _, spec in pod_specs(rendered):
        for container in spec["containers"]:
            entry = env_of(container).get(var)
            if entry is not None:
                assert "value" not in entry, f"{var} in plain env"
                refs.append(entry["valueFrom"]["secretKeyRef"])
    return refs


def _secret_data(rendered: RenderedChart, name: str, key: str) -> str:
    secret = rendered.one("Secret", name)
    return base64.b64decode(secret["data"][key]).decode()


def test_redis_url_comes_from_the_chart_secret(chart: helm.Chart, default_render: RenderedChart) -> None:
    url = merged(chart, None)["redis"]["url"]
    (ref,) = _secret_refs(default_render, "MEETSTREAM_REDIS_URL")
    assert _secret_data(default_render, ref["name"], ref["key"]) == url
    outside = [o for o in default_render.objects if o["kind"] != "Secret"]
    assert url not in json.dumps(outside)
    assert not _secret_refs(default_render, "MEETSTREAM_AUTH_SECRET")


def test_existing_secrets_are_used_as_given(
    all_on_render: RenderedChart, all_on_values: dict[str, Any]
) -> None:
    refs = _secret_refs(all_on_render, "MEETSTREAM_REDIS_URL")
    assert len(refs) == 1 + len(WORKERS)
    assert all(r == {"name": "redis-credentials", "key": "url"} for r in refs)
    (own,) = all_on_render.of_kind("Secret")
    assert "redis-url" not in own["data"]
    (auth,) = _secret_refs(all_on_render, "MEETSTREAM_AUTH_SECRET")
    assert _secret_data(all_on_render, auth["name"], auth["key"]) == all_on_values["auth"]["secret"]
    assert all_on_values["auth"]["secret"] not in json.dumps(
        [o for o in all_on_render.objects if o["kind"] != "Secret"]
    )


def test_existing_auth_secret_and_no_chart_secret(render: Callable[..., RenderedChart]) -> None:
    rendered = render(
        {
            "redis": {"existingSecret": "r", "existingSecretKey": "u"},
            "auth": {"existingSecret": "a", "existingSecretKey": "k"},
        }
    )
    assert not rendered.of_kind("Secret")
    assert _secret_refs(rendered, "MEETSTREAM_AUTH_SECRET") == [{"name": "a", "key": "k"}]


def test_pods_roll_when_the_secret_changes(render: Callable[..., RenderedChart]) -> None:
    first = render({"redis": {"url": "redis://a:6379/0"}}).gateway()["spec"]["template"]["metadata"]
    second = render({"redis": {"url": "redis://b:6379/0"}}).gateway()["spec"]["template"]["metadata"]
    assert first["annotations"]["checksum/secret"] != second["annotations"]["checksum/secret"]


# -- optional objects -----------------------------------------------------------------


def test_ingress_keeps_websockets_open(all_on_render: RenderedChart, all_on_values: dict[str, Any]) -> None:
    ingress = all_on_render.one("Ingress")
    notes = ingress["metadata"]["annotations"]
    timeout = str(all_on_values["ingress"]["proxyTimeoutSeconds"])
    assert notes["nginx.ingress.kubernetes.io/proxy-read-timeout"] == timeout
    assert notes["nginx.ingress.kubernetes.io/proxy-send-timeout"] == timeout
    assert int(timeout) >= 3600
    assert notes["cert-manager.io/cluster-issuer"] == "letsencrypt"  # the user's annotations kept
    (rule,) = ingress["spec"]["rules"]
    (path,) = rule["http"]["paths"]
    assert path["backend"]["service"] == {
        "name": all_on_render.gateway_service()["metadata"]["name"],
        "port": {"name": "websocket"},
    }
    assert ingress["spec"]["tls"][0]["hosts"] == [rule["host"]]


def test_hpa_scales_on_cpu_and_optionally_on_bots(
    render: Callable[..., RenderedChart], all_on_render: RenderedChart
) -> None:
    cpu_only = render({"autoscaling": {"enabled": True}})
    (metric,) = cpu_only.one("HorizontalPodAutoscaler")["spec"]["metrics"]
    assert metric["resource"]["name"] == "cpu"
    assert "replicas" not in cpu_only.gateway()["spec"]
    hpa = all_on_render.one("HorizontalPodAutoscaler")
    pods = [m["pods"] for m in hpa["spec"]["metrics"] if m["type"] == "Pods"]
    assert pods == [
        {
            "metric": {"name": "meetstream_gateway_bots_connected"},
            "target": {"type": "AverageValue", "averageValue": "200"},
        }
    ]
    assert hpa["spec"]["scaleTargetRef"]["name"] == all_on_render.gateway()["metadata"]["name"]


def test_service_monitor_scrapes_the_metrics_port(all_on_render: RenderedChart) -> None:
    service = all_on_render.gateway_service()
    monitor = all_on_render.one("ServiceMonitor", f"{RELEASE}-meetstream-gateway")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    (endpoint,) = monitor["spec"]["endpoints"]
    (port,) = [p for p in service["spec"]["ports"] if p["name"] == endpoint["port"]]
    assert port["targetPort"] == "metrics" and endpoint["path"] == "/metrics"
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"


def test_alerts_cover_what_the_issue_asks(all_on_render: RenderedChart) -> None:
    group = all_on_render.rule_group("meetstream-gateway")
    alerts = {r["alert"]: r for r in group["rules"]}
    assert set(alerts) == {
        "MeetstreamGatewayRedisUnreachable",
        "MeetstreamGatewayFramesDropped",
        "MeetstreamGatewayCommandsRejected",
        "MeetstreamGatewayCommandsSlow",
        "MeetstreamGatewayNoReadyReplicas",
    }
    for rule in alerts.values():
        assert rule["labels"]["severity"] in ("warning", "critical")
        assert rule["annotations"]["summary"]
        # Each alert selects this release's series only.
        assert f'job="{RELEASE}-meetstream-gateway",namespace="{NAMESPACE}"' in rule["expr"]


def test_dashboard_configmap_is_the_dashboard_file(all_on_render: RenderedChart) -> None:
    (config_map,) = all_on_render.of_kind("ConfigMap")
    shipped = json.loads(config_map["data"]["meetstream-gateway.json"])
    assert shipped == json.loads((CHART / "dashboards" / "meetstream-gateway.json").read_text())
    assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"


def test_workers_run_from_the_gateway_image(
    all_on_render: RenderedChart, all_on_values: dict[str, Any]
) -> None:
    image = all_on_render.gateway_container()["image"]
    for name in WORKERS:
        deployment = all_on_render.one("Deployment", f"{RELEASE}-meetstream-gateway-{name}")
        (container,) = deployment["spec"]["template"]["spec"]["containers"]
        assert container["image"] == image
        assert [*container["command"], *container["args"]] == ["python", "-m", "workers", name]
        assert deployment["spec"]["replicas"] == all_on_values["workers"][name]["replicas"]
        env = env_of(container)
        assert env["MEETSTREAM_WORKER_GROUP"]["value"] == all_on_values["workers"]["group"]
        assert env["MEETSTREAM_KEY_PREFIX"]["value"] == all_on_values["gateway"]["keyPrefix"]


# -- NOTES.txt -------------------------------------------------------------------------


def test_notes_give_the_websocket_urls(default_render: RenderedChart, all_on_render: RenderedChart) -> None:
    host = all_on_render.one("Ingress")["spec"]["rules"][0]["host"]
    for rendered, base in ((all_on_render, f"wss://{host}"), (default_render, "wss://HOST")):
        urls = dict(re.findall(r"(\w+)\.websocket_url:\s+(\S+)", rendered.notes))
        assert urls == {
            "live_audio_required": f"{base}/{{bot_id}}/audio",
            "socket_connection_url": f"{base}/{{bot_id}}/control",
        }, rendered.notes
        for channel, url in zip(("audio", "control"), urls.values(), strict=True):
            route = parse_path(url.removeprefix(base).replace("{bot_id}", "bot_123"))
            assert (route.channel, route.bot_id) == (channel, "bot_123")
    assert "?token=" in all_on_render.notes
    assert "unauthenticated" in default_render.notes or "any bot_id" in default_render.notes


# -- worker monitoring ---------------------------------------------------------------------


def _workers_service(rendered: RenderedChart) -> dict[str, Any]:
    return rendered.one("Service", f"{RELEASE}-meetstream-gateway-workers")


def test_worker_metrics_port_is_served_and_selected(all_on_render: RenderedChart) -> None:
    """Every worker pod exposes the port its MEETSTREAM_WORKER_METRICS_PORT names; the headless
    workers Service selects every worker pod and no gateway pod, on that port."""
    service = _workers_service(all_on_render)
    assert service["spec"]["clusterIP"] == "None"
    (port,) = service["spec"]["ports"]
    gateway_pods = all_on_render.gateway()["spec"]["template"]["metadata"]["labels"]
    assert not service["spec"]["selector"].items() <= gateway_pods.items()
    for name in WORKERS:
        deployment = all_on_render.one("Deployment", f"{RELEASE}-meetstream-gateway-{name}")
        pod = deployment["spec"]["template"]
        assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items(), name
        (container,) = pod["spec"]["containers"]
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert port["targetPort"] == "metrics" and port["port"] == ports["metrics"]
        assert int(env_of(container)["MEETSTREAM_WORKER_METRICS_PORT"]["value"]) == ports["metrics"]
        probe = container["livenessProbe"]
        assert probe["httpGet"] == {"path": "/healthz", "port": "metrics"}, name
        assert probe["periodSeconds"] * probe["failureThreshold"] >= 30  # not on one slow handler


def test_each_service_monitor_scrapes_its_own_service(all_on_render: RenderedChart) -> None:
    gateway_service, workers_service = all_on_render.gateway_service(), _workers_service(all_on_render)
    gateway_monitor = all_on_render.one("ServiceMonitor", f"{RELEASE}-meetstream-gateway")
    workers_monitor = all_on_render.one("ServiceMonitor", f"{RELEASE}-meetstream-gateway-workers")

    def selects(monitor: dict[str, Any], service: dict[str, Any]) -> bool:
        return monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()

    assert selects(workers_monitor, workers_service) and not selects(workers_monitor, gateway_service)
    assert selects(gateway_monitor, gateway_service) and not selects(gateway_monitor, workers_service)
    (endpoint,) = workers_monitor["spec"]["endpoints"]
    assert endpoint["port"] == workers_service["spec"]["ports"][0]["name"] and endpoint["path"] == "/metrics"
    assert workers_monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"


def test_no_worker_monitoring_without_workers(render: Callable[..., RenderedChart]) -> None:
    values = {"metrics": {"serviceMonitor": {"enabled": True}, "prometheusRule": {"enabled": True}}}
    rendered = render(values)
    assert [s["metadata"]["name"] for s in rendered.of_kind("Service")] == [f"{RELEASE}-meetstream-gateway"]
    assert len(rendered.of_kind("ServiceMonitor")) == 1
    (rule,) = rendered.of_kind("PrometheusRule")
    assert [g["name"] for g in rule["spec"]["groups"]] == ["meetstream-gateway"]
    # Your own SDK workers, scraped your way: the alerts alone, on your selector.
    values["metrics"]["prometheusRule"]["workers"] = {"selector": 'job="my-workers"'}
    group = render(values).rule_group("meetstream-workers")
    assert all('job="my-workers"' in r["expr"] for r in group["rules"])


def test_worker_alerts_fire_before_the_gateway_trims_unread_audio(
    render: Callable[..., RenderedChart], all_on_render: RenderedChart, all_on_values: dict[str, Any]
) -> None:
    """The lag alert compares the group's distance to a stream head, in entries, with the
    gateway's audio MAXLEN: at half of it, or when its trend passes all of it within 5 minutes."""
    alerts = {r["alert"]: r for r in all_on_render.rule_group("meetstream-workers")["rules"]}
    assert set(alerts) == {
        "MeetstreamWorkersFallingBehind",
        "MeetstreamWorkersLostAudio",
        "MeetstreamWorkerBotsUnowned",
        "MeetstreamWorkerHandlerFailures",
        "MeetstreamWorkerLeasesLost",
        "MeetstreamWorkersAbsent",
    }
    for rule in alerts.values():
        assert rule["labels"]["severity"] in ("warning", "critical")
        assert rule["annotations"]["summary"]
        assert f'job="{RELEASE}-meetstream-gateway-workers",namespace="{NAMESPACE}"' in rule["expr"]
    maxlen = all_on_values["gateway"]["settings"]["audio_maxlen"]
    lag = alerts["MeetstreamWorkersFallingBehind"]
    assert lag["labels"]["severity"] == "critical"
    assert f"> {maxlen // 2})" in lag["expr"] and f"[5m], 300)) > {maxlen})" in lag["expr"]
    assert "meetstream_worker_stream_lag_entries{" in lag["expr"] and 'stream="audio"' in lag["expr"]
    # Without a setting the gateway's own default applies.
    rendered = render(
        {"metrics": {"prometheusRule": {"enabled": True}}, "workers": {"greeter": {"enabled": True}}}
    )
    default = {r["alert"]: r for r in rendered.rule_group("meetstream-workers")["rules"]}
    assert f"> {Settings().audio_maxlen})" in default["MeetstreamWorkersFallingBehind"]["expr"]
