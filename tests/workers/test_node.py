"""The Node.js worker (``workers/node``), written from docs/PROTOCOL.md alone, against the
real gateway, real Redis and a simulated bot: the proof that the contract is language-neutral."""

from __future__ import annotations

import asyncio
import json
import os
import urllib.error
import urllib.request
from collections import Counter

import helm_python as helm
import pytest
import yaml
from prometheus_client import CollectorRegistry
from redis.asyncio.cluster import RedisCluster

from gateway.embedded_redis import free_port
from gateway.testing.bot import SimulatedBot, Speaker
from tests.conftest import running_gateway, ws_url
from tests.deploy.conftest import ALL_ON_VALUES, CHART, NAMESPACE, RELEASE, RenderedChart
from tests.deploy.promql import grouping_labels, metric_names, series_labels
from tests.workers.conftest import needs_node, scrape_metrics
from workers.constants import STOP_REASONS
from workers.metrics import WorkerMetrics

pytestmark = needs_node


async def _line(proc: asyncio.subprocess.Process, timeout_s: float) -> dict:
    assert proc.stdout is not None
    raw = await asyncio.wait_for(proc.stdout.readline(), timeout_s)
    assert raw, "the node worker exited"
    return json.loads(raw)


async def test_node_worker_greets_and_counts(gateway, redis_url, node_worker_dir):
    """1. start the Node worker; 2. a bot joins: it is greeted (JSON ``sendmsg``);
    3. the bot streams 1 s from two speakers: the worker posts its counts (MessagePack ``sendchat``);
    4. the bot leaves: the worker reports 20 frames and both speakers."""
    proc = await asyncio.create_subprocess_exec(
        "node",
        "worker.js",
        "--max-bots",
        "1",
        "--report-every-s",
        "0.3",
        cwd=node_worker_dir,
        stdout=asyncio.subprocess.PIPE,
        env={
            "PATH": os.environ["PATH"],
            "MEETSTREAM_REDIS_URL": redis_url,
            "MEETSTREAM_WORKER_GROUP": "node",
        },
    )
    try:
        assert (await _line(proc, 20))["ready"] is True
        bot = SimulatedBot(ws_url(gateway), "bot_node")
        await bot.connect()
        greeting = await bot.next_command(timeout=10)
        assert greeting["command"] == "sendmsg" and "Node.js" in greeting["message"]
        await bot.stream_speech([Speaker("s1", "Ada"), Speaker("s2", "Grace", 330)], 1.0, realtime=False)
        deadline = asyncio.get_running_loop().time() + 10
        while not any(
            "20 audio frames from 2 speaker" in c.get("text", "") for c in bot.commands("sendchat")
        ):
            assert asyncio.get_running_loop().time() < deadline, f"no count in chat: {bot.commands()}"
            await asyncio.sleep(0.1)
        await bot.close()
        report = await _line(proc, 15)
        assert report == {"bot_id": "bot_node", "frames": 20, "speakers": ["Ada", "Grace"]}
        assert await asyncio.wait_for(proc.wait(), 10) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


# -- metrics: the series the chart's alerts and dashboard query, from a Node worker ----------

#: The series a worker in any language must export for the chart's worker alerts to cover
#: it (docs/WORKERS.md, Metrics, In any language): exactly the names the alert rules query.
ALERT_SERIES = {
    "meetstream_worker_bots_owned",
    "meetstream_worker_bots_known",
    "meetstream_worker_stream_lag_entries",
    "meetstream_worker_audio_seq_gaps_total",
    "meetstream_worker_handler_failures_total",
    "meetstream_worker_bots_stopped_total",
}
# Labels Prometheus adds to every scraped series (ServiceMonitor targets), beside the worker's own.
TARGET_LABELS = {"namespace", "pod", "job", "instance", "service", "container", "endpoint"}
DASHBOARD = CHART / "dashboards" / "meetstream-gateway.json"


def _worker_alert_exprs() -> list[str]:
    """The expressions of the chart's ``meetstream-workers`` rule group, rendered by Helm."""
    with helm.Chart.load(CHART) as chart:
        rendered = RenderedChart(
            chart.render(
                yaml.safe_load(ALL_ON_VALUES.read_text()), name=RELEASE, namespace=NAMESPACE, is_install=True
            )
        )
    return [rule["expr"] for rule in rendered.rule_group("meetstream-workers")["rules"]]


def _worker_dashboard_exprs() -> list[str]:
    exprs: list[str] = []

    def panels(items: list[dict]) -> None:
        for panel in items:
            exprs.extend(t["expr"] for t in panel.get("targets", []) if "meetstream_worker_" in t["expr"])
            panels(panel.get("panels", []))

    panels(json.loads(DASHBOARD.read_text())["panels"])
    return exprs


def _needed(exprs: list[str]) -> dict[str, set[str]]:
    """Metric name -> the worker's own labels the expressions match or group on."""
    needed: dict[str, set[str]] = {}
    for expr in exprs:
        matched = series_labels(expr)
        grouped = grouping_labels(expr) - TARGET_LABELS
        for name in metric_names(expr):
            needed.setdefault(name, set()).update(grouped, matched.get(name, set()) - TARGET_LABELS)
    return needed


def _status(port: int, path: str) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
            return r.status
    except urllib.error.HTTPError as exc:
        return exc.code


def _sdk_series() -> dict[str, set[str]]:
    """Sample name -> label names, of the Python SDK's metrics (workers/metrics.py)."""
    registry = CollectorRegistry()
    WorkerMetrics("g", STOP_REASONS, registry)
    series: dict[str, set[str]] = {}
    for family in registry.collect():
        for s in family.samples:
            if not s.name.endswith("_created"):
                series.setdefault(s.name, set()).update(s.labels)
    return series


def _names(m: dict[tuple[str, tuple[tuple[str, str], ...]], float]) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for name, labels in m:
        out.setdefault(name, set()).update(k for k, _ in labels)
    return out


async def _start_node(
    node_worker_dir, redis_url: str, port: int, group: str, *args: str, **env: str
) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        "node",
        "worker.js",
        *args,
        cwd=node_worker_dir,
        stdout=asyncio.subprocess.PIPE,
        env={
            "PATH": os.environ["PATH"],
            "MEETSTREAM_REDIS_URL": redis_url,
            "MEETSTREAM_WORKER_GROUP": group,
            "MEETSTREAM_WORKER_METRICS_PORT": str(port),
            "MEETSTREAM_WORKER_METRICS_HOST": "127.0.0.1",
            **env,
        },
    )


async def _stop(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is None:
        proc.kill()
        await proc.wait()


def test_the_alert_contract_is_what_the_chart_alerts_on():
    """The contract's required series are exactly the metric names the chart's worker alerts
    query (a new alert on another series must be added to the contract, and to docs/WORKERS.md);
    the dashboard's worker panels use only series the SDK exports."""
    alerts = _needed(_worker_alert_exprs())
    assert set(alerts) == ALERT_SERIES
    sdk = _sdk_series()
    for name, labels in {**_needed(_worker_dashboard_exprs()), **alerts}.items():
        assert name in sdk, name
        assert labels <= sdk[name], (name, labels)


async def test_node_worker_exports_the_sdk_metrics_and_they_move(gateway, redis_url, node_worker_dir):
    """1. the Node worker with a metrics port, a handler slower than the audio (10 ms a frame,
    reads of 16); 2. two bots join: /metrics shows both owned and known, one member;
    3. one bot writes 200 frames at once: entries handled and handler time grow to 200, the
    lag (audio entries behind the head, by seq) is seen above 0 and back at 0, no gap;
    4. the other bot leaves: stopped (session_ended), one owned; 5. every series the chart's
    alerts and dashboard query is there with their labels, with the SDK's names and labels;
    /readyz 200, then SIGTERM: exit 0."""
    port = free_port()
    proc = await _start_node(
        node_worker_dir,
        redis_url,
        port,
        "node-metrics",
        "--lag-sample-s",
        "0.1",
        "--read-count",
        "16",
        "--audio-delay-ms",
        "10",
        "--report-every-s",
        "60",
    )
    g = (("group", "node-metrics"),)
    audio = (*g, ("stream", "audio"))

    async def scrape() -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        return await asyncio.to_thread(scrape_metrics, port)

    async def until(check, what: str, timeout_s: float = 15.0):
        deadline = asyncio.get_running_loop().time() + timeout_s
        while True:
            m = await scrape()
            if check(m):
                return m
            assert asyncio.get_running_loop().time() < deadline, f"timed out waiting for {what}: {m}"
            await asyncio.sleep(0.1)

    try:
        assert (await _line(proc, 20))["metrics_port"] == port
        async with (
            SimulatedBot(ws_url(gateway), "bot_m1", record_sent=False) as talker,
            SimulatedBot(ws_url(gateway), "bot_m2", record_sent=False) as leaver,
        ):
            m = await until(lambda m: m[("meetstream_worker_bots_owned", g)] == 2, "both bots owned")
            assert m[("meetstream_worker_bots_known", g)] == 2
            assert m[("meetstream_worker_group_members", g)] == 1
            assert m[("meetstream_worker_bots_started_total", g)] == 2
            await talker.stream_speech([Speaker("s1", "Ada")], 20.0, realtime=False)  # 200 frames at once
            lags: list[float] = []
            deadline = asyncio.get_running_loop().time() + 30
            while (m := await scrape())[("meetstream_worker_entries_handled_total", audio)] < 200:
                lags.append(m[("meetstream_worker_stream_lag_entries", audio)])
                assert asyncio.get_running_loop().time() < deadline, f"frames not handled: {m}"
                await asyncio.sleep(0.1)
            assert m[("meetstream_worker_entries_handled_total", audio)] == 200
            assert max(lags) > 0, f"the lag never showed: {lags}"
            m = await until(
                lambda m: m[("meetstream_worker_stream_lag_entries", audio)] == 0, "the lag back at 0"
            )
            assert m[("meetstream_worker_handler_seconds_count", audio)] == 200
            assert m[("meetstream_worker_handler_seconds_sum", audio)] > 0
            assert m[("meetstream_worker_entries_handled_total", (*g, ("stream", "events")))] > 0
            assert m[("meetstream_worker_audio_seq_gaps_total", g)] == 0
            assert m[("meetstream_worker_handler_failures_total", (*g, ("outcome", "error")))] == 0
            await leaver.close()
            m = await until(
                lambda m: m[("meetstream_worker_bots_stopped_total", (*g, ("reason", "session_ended")))] == 1,
                "the bot that left let go",
            )
            assert m[("meetstream_worker_bots_owned", g)] == 1
            exported = _names(m)
            for name, labels in {
                **_needed(_worker_dashboard_exprs()),
                **_needed(_worker_alert_exprs()),
            }.items():
                assert name in exported, f"the Node worker does not export {name}"
                assert labels <= exported[name], (name, labels, exported[name])
            assert exported == _sdk_series(), "the Node worker's series differ from the SDK's"
            assert all("bot_id" not in labels for labels in exported.values())
            assert await asyncio.to_thread(_status, port, "/readyz") == 200
            assert await asyncio.to_thread(_status, port, "/healthz") == 200
        proc.terminate()
        assert await asyncio.wait_for(proc.wait(), 20) == 0
    finally:
        await _stop(proc)


async def test_node_worker_serves_probes_before_redis_and_readyz_fails_once_stopping(node_worker_dir):
    """With Redis unreachable: 1. /metrics has every series from the first scrape (0), /healthz
    and /readyz answer 200, an unknown path 404; 2. SIGTERM: /readyz answers 503."""
    port = free_port()
    # Cluster mode named, not detected: the worker starts its group at once (and waits for Redis).
    proc = await _start_node(
        node_worker_dir,
        f"redis://127.0.0.1:{free_port()}/0",
        port,
        "node-probes",
        MEETSTREAM_REDIS_CLUSTER="no",
    )
    try:
        deadline = asyncio.get_running_loop().time() + 20
        while True:
            try:
                m = await asyncio.to_thread(scrape_metrics, port)
                break
            except OSError:
                assert asyncio.get_running_loop().time() < deadline, "no metrics server"
                await asyncio.sleep(0.1)
        assert _names(m) == _sdk_series()
        assert set(m.values()) == {0}
        assert await asyncio.to_thread(_status, port, "/healthz") == 200
        assert await asyncio.to_thread(_status, port, "/readyz") == 200
        assert await asyncio.to_thread(_status, port, "/no-such-path") == 404
        proc.terminate()
        deadline = asyncio.get_running_loop().time() + 10
        while await asyncio.to_thread(_status, port, "/readyz") != 503:
            assert asyncio.get_running_loop().time() < deadline, "/readyz still 200 after SIGTERM"
            await asyncio.sleep(0.05)
        assert await asyncio.to_thread(_status, port, "/healthz") == 200
    finally:
        await _stop(proc)


# -- Redis Cluster -------------------------------------------------------------------------


@pytest.mark.cluster
async def test_node_worker_on_a_redis_cluster(cluster, node_worker_dir):
    """1. a gateway and the Node worker on a 3-node Redis Cluster (detected: INFO cluster), with
    a metrics port; 2. six bots whose keys are on all three nodes join: each is greeted (a
    command through its {cNN} stream); 3. each streams 1 s from two speakers: the counts come
    back in the chat; 4. they leave: six reports of 20 frames and both speakers, each bot
    started and stopped in the journal, no Redis error, exit 0."""
    cluster.flushall()
    port = free_port()
    client = RedisCluster.from_url(cluster.url)
    proc = None
    try:
        async with running_gateway(cluster.url) as gw:
            assert gw.backend.is_cluster
            await client.initialize()
            by_node: dict[str, list[str]] = {}  # two bots on each node
            for i in range(200):
                bot_id = f"nbot-{i}"
                on_node = by_node.setdefault(client.get_node_from_key(gw.keyspace.bot(bot_id).audio).name, [])
                if len(on_node) < 2:
                    on_node.append(bot_id)
                if sum(map(len, by_node.values())) == 6:
                    break
            names = [b for ids in by_node.values() for b in ids]
            assert len(by_node) == 3 and len(names) == 6
            proc = await _start_node(
                node_worker_dir,
                cluster.url,
                port,
                "node-cluster",
                "--max-bots",
                "6",
                "--report-every-s",
                "0.3",
                MEETSTREAM_LEASE_TTL_S="2",
                MEETSTREAM_LEASE_RENEW_S="0.4",
                MEETSTREAM_CLAIM_INTERVAL_S="0.2",
            )
            assert (await _line(proc, 30))["ready"] is True
            bots = [SimulatedBot(ws_url(gw), b, record_sent=False) for b in names]
            for bot in bots:
                await bot.connect()
            for bot in bots:  # the greeting (its counts may come first: "0 audio frames")
                deadline = asyncio.get_running_loop().time() + 15
                while not any("Node.js" in c["message"] for c in bot.commands("sendmsg")):
                    assert asyncio.get_running_loop().time() < deadline, f"{bot.bot_id}: {bot.commands()}"
                    await asyncio.sleep(0.1)
            for bot in bots:
                await bot.stream_speech(
                    [Speaker("s1", "Ada"), Speaker("s2", "Grace", 330)], 1.0, realtime=False
                )
            for bot in bots:
                deadline = asyncio.get_running_loop().time() + 15
                while not any(
                    "20 audio frames from 2 speaker" in c.get("text", "") for c in bot.commands("sendchat")
                ):
                    assert asyncio.get_running_loop().time() < deadline, f"{bot.bot_id}: {bot.commands()}"
                    await asyncio.sleep(0.1)
            m = await asyncio.to_thread(scrape_metrics, port)
            g = (("group", "node-cluster"),)
            assert m[("meetstream_worker_bots_owned", g)] == 6
            assert m[("meetstream_worker_entries_handled_total", (*g, ("stream", "audio")))] == 6 * 20
            assert m[("meetstream_worker_redis_errors_total", g)] == 0
            for bot in bots:
                await bot.close()
            reports = [await _line(proc, 20) for _ in bots]
            assert sorted(r["bot_id"] for r in reports) == sorted(names)
            assert all(r["frames"] == 20 and r["speakers"] == ["Ada", "Grace"] for r in reports)
            assert await asyncio.wait_for(proc.wait(), 20) == 0
            journal = await client.xrange(f"{gw.keyspace.prefix}:workers:node-cluster:journal")
            kinds = Counter(f[b"type"].decode() for _, f in journal)
            assert kinds["hello"] == 1 and kinds["start"] == 6 and kinds["stop"] == 6 and kinds["bye"] == 1
            stops = {
                f[b"bot_id"].decode(): f[b"reason"].decode() for _, f in journal if f[b"type"] == b"stop"
            }
            assert stops == dict.fromkeys(names, "session_ended")
    finally:
        if proc is not None:
            await _stop(proc)
        await client.aclose()
