"""The overload policy, tick by tick."""

from prometheus_client import CollectorRegistry

from gateway.metrics import Metrics
from gateway.overload import MAX_RATIO, LoadShedder


def test_shed_ratio_rises_with_lag_and_falls_back():
    shedder = LoadShedder(0.25, Metrics(CollectorRegistry()))
    shedder.update(0.01)
    assert shedder.ratio == 0 and not shedder.overloaded
    for _ in range(4):
        shedder.update(0.4)
    assert shedder.overloaded and abs(shedder.ratio - 0.2) < 1e-9
    shedder.update(0.2)  # between half the threshold and the threshold: hold
    assert abs(shedder.ratio - 0.2) < 1e-9
    for _ in range(100):
        shedder.update(0.4)
    assert shedder.ratio == MAX_RATIO  # never all: a trickle shows the bot is alive
    for _ in range(100):
        shedder.update(0.01)
    assert shedder.ratio == 0 and not shedder.overloaded
    registry = shedder.metrics.registry
    assert registry.get_sample_value("meetstream_gateway_overload_shed_ratio") == 0
    assert registry.get_sample_value("meetstream_gateway_event_loop_lag_seconds") == 0.01
