"""A real 3-node Redis Cluster on loopback, for tests and benchmarks."""

from __future__ import annotations

import subprocess
import time

import redis

from gateway.embedded_redis import RedisServer, find_redis_binary


class RedisClusterProcesses:
    """``nodes`` masters (no replicas) on 127.0.0.1, slots spread by ``redis-cli --cluster create``."""

    def __init__(self, nodes: int = 3) -> None:
        self.servers = [RedisServer(cluster=True) for _ in range(nodes)]

    @property
    def url(self) -> str:
        return self.servers[0].url.rsplit("/", 1)[0]

    def start(self, timeout_s: float = 30.0) -> RedisClusterProcesses:
        try:
            for server in self.servers:
                server.start()
            addrs = [f"127.0.0.1:{s.port}" for s in self.servers]
            subprocess.run(
                [
                    find_redis_binary("redis-cli"),
                    "--cluster",
                    "create",
                    *addrs,
                    "--cluster-replicas",
                    "0",
                    "--cluster-yes",
                ],
                check=True,
                capture_output=True,
                timeout=timeout_s,
            )
            self._wait_ok(timeout_s)
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ok(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            states = []
            for server in self.servers:
                client = redis.Redis(port=server.port)
                try:
                    states.append(client.cluster("info").get("cluster_state"))
                finally:
                    client.close()
            if all(state == "ok" for state in states):
                return
            time.sleep(0.1)
        raise RuntimeError("cluster did not reach cluster_state:ok")

    def flushall(self) -> None:
        for server in self.servers:
            client = redis.Redis(port=server.port)
            try:
                client.flushall()
            finally:
                client.close()

    def stop(self) -> None:
        for server in self.servers:
            server.stop()

    def __enter__(self) -> RedisClusterProcesses:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
