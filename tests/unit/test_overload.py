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


def test_backpressure_resumes_audio_sockets_starting_from_a_different_bot_each_time():
    """The event loop reads ready sockets in the order they were resumed, and under
    sustained backpressure a window between two pauses lasts only a few reads. Resumed
    always in the same order, the first bots were read every time and the last ones
    starved (a 20 ms flood bot went unread for 15 s; five runs with rotation: no bot
    unread for even 3 s). Here: a window of 16 reads, 50 bots, 20 windows."""
    import asyncio
    from types import SimpleNamespace

    from gateway.bot_server import BotServer
    from gateway.keys import KeySpace
    from gateway.sessions import BotConnection
    from gateway.settings import Settings

    order: list[int] = []

    class Transport:
        def __init__(self, n: int) -> None:
            self.n = n

        def pause_reading(self) -> None:
            pass

        def resume_reading(self) -> None:
            order.append(self.n)

    async def main() -> list[set[int]]:
        keyspace = KeySpace()
        publisher = SimpleNamespace(on_backlog=None, may_pause=None)
        server = BotServer(Settings(), keyspace, Metrics(CollectorRegistry()), SimpleNamespace(), publisher)  # type: ignore[arg-type]
        for n in range(50):
            conn = BotConnection(SimpleNamespace(transport=Transport(n)), "audio")  # type: ignore[arg-type]
            server.registry.attach(keyspace.bot(f"bot{n}"), conn)
        served = []
        for _ in range(20):
            server._pause_audio(True)
            order.clear()
            server._pause_audio(False)
            assert sorted(order) == list(range(50))  # every socket, once
            served.append(set(order[:16]))
        return served

    served = asyncio.run(main())
    assert set().union(*served) == set(range(50)), "some bots were never near the front"
