"""Fixtures of the deploy tests: the chart rendered by real Helm (its Go
library, loaded by helm-python-sdk), parsed strictly, once per session."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import helm_python as helm
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "meetstream-gateway"
ALL_ON_VALUES = CHART / "ci" / "all-on-values.yaml"
RELEASE = "ms"
NAMESPACE = "bots"

Rendered = dict[str, Any]


class _StrictLoader(yaml.SafeLoader):
    """A YAML loader that refuses duplicate keys (PyYAML keeps the last one silently;
    the API server would reject or, worse, pick one)."""


def _no_duplicates(loader: _StrictLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    keys = [loader.construct_object(k, deep=True) for k, _ in node.value]
    dupes = {k for k in keys if keys.count(k) > 1}
    if dupes:
        raise yaml.constructor.ConstructorError(
            None, None, f"duplicate keys {sorted(dupes)}", node.start_mark
        )
    return loader.construct_mapping(node, deep=True)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _no_duplicates)


def load_yaml_documents(text: str) -> list[Any]:
    return [doc for doc in yaml.load_all(text, Loader=_StrictLoader) if doc is not None]


class RenderedChart:
    """The objects and NOTES of one render, with look-ups by kind and name."""

    def __init__(self, manifests: dict[str, str]) -> None:
        self.manifests = manifests
        self.notes = ""
        self.objects: list[Rendered] = []
        for path, text in sorted(manifests.items()):
            if path.endswith("NOTES.txt"):
                self.notes = text
                continue
            self.objects.extend(load_yaml_documents(text))

    def of_kind(self, kind: str) -> list[Rendered]:
        return [o for o in self.objects if o["kind"] == kind]

    def one(self, kind: str, name: str | None = None) -> Rendered:
        found = [o for o in self.of_kind(kind) if name is None or o["metadata"]["name"] == name]
        assert len(found) == 1, (
            f"expected one {kind} {name or ''}, found {[o['metadata']['name'] for o in found]}"
        )
        return found[0]

    def gateway(self) -> Rendered:
        return self.one("Deployment", f"{RELEASE}-meetstream-gateway")

    def gateway_container(self) -> Rendered:
        (container,) = self.gateway()["spec"]["template"]["spec"]["containers"]
        return container

    def gateway_service(self) -> Rendered:
        return self.one("Service", f"{RELEASE}-meetstream-gateway")

    def rule_group(self, name: str) -> Rendered:
        (rule,) = self.of_kind("PrometheusRule")
        (group,) = [g for g in rule["spec"]["groups"] if g["name"] == name]
        return group


@pytest.fixture(scope="session")
def chart() -> Iterator[helm.Chart]:
    with helm.Chart.load(CHART) as loaded:
        yield loaded


@pytest.fixture(scope="session")
def render(chart: helm.Chart) -> Callable[..., RenderedChart]:
    def _render(values: dict[str, Any] | None = None) -> RenderedChart:
        return RenderedChart(chart.render(values, name=RELEASE, namespace=NAMESPACE, is_install=True))

    return _render


@pytest.fixture(scope="session")
def all_on_values() -> dict[str, Any]:
    return yaml.safe_load(ALL_ON_VALUES.read_text())


@pytest.fixture(scope="session")
def default_render(render: Callable[..., RenderedChart]) -> RenderedChart:
    return render()


@pytest.fixture(scope="session")
def all_on_render(render: Callable[..., RenderedChart], all_on_values: dict[str, Any]) -> RenderedChart:
    return render(all_on_values)


@pytest.fixture(scope="session", params=["default", "all-on"])
def each_render(
    request: pytest.FixtureRequest, default_render: RenderedChart, all_on_render: RenderedChart
) -> RenderedChart:
    return default_render if request.param == "default" else all_on_render
