"""A real Redis Cluster on loopback, with replicas if asked, for tests and benchmarks.

Faults are real: :meth:`RedisClusterProcesses.kill` SIGKILLs a node (its replica is
promoted after ``node_timeout_ms``), :meth:`restart` brings it back on the same
port and data directory, where it rejoins as a replica of whoever took its slots.
"""

from __future__ import annotations

import subprocess
import time
from typing import Any

import redis

from gateway.embedded_redis import RedisServer, find_redis_binary


def _execute(client: redis.Redis, *args: Any) -> Any:
    """One command; redis-py's sync client leaves execute_command untyped."""
    return client.execute_command(*args)  # type: ignore[no-untyped-call]


class RedisClusterProcesses:
    """``nodes`` primaries with ``replicas`` replicas each, on 127.0.0.1."""

    def __init__(self, nodes: int = 3, replicas: int = 0, node_timeout_ms: int = 2000) -> None:
        self.replicas = replicas
        extra = ["--cluster-node-timeout", str(node_timeout_ms)]
        if replicas:
            # A replica that lost its primary a moment ago must still be allowed to
            # take over (the default factor can refuse a lagging replica for good).
            extra += ["--cluster-replica-validity-factor", "0"]
        self.servers = [RedisServer(cluster=True, extra_args=extra) for _ in range(nodes * (1 + replicas))]

    @property
    def url(self) -> str:
        """A seed URL; a cluster client learns every node from it (a live one is picked)."""
        live = self.live()
        return (live[0] if live else self.servers[0]).url.rsplit("/", 1)[0]

    @property
    def seed_urls(self) -> list[str]:
        return [s.url.rsplit("/", 1)[0] for s in self.servers]

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
                    str(self.replicas),
                    "--cluster-yes",
                ],
                check=True,
                capture_output=True,
                timeout=timeout_s,
            )
            self._wait_ok(timeout_s)
            if self.replicas:
                self._wait_replicas_linked(timeout_s)
        except BaseException:
            self.stop()
            raise
        return self

    def live(self) -> list[RedisServer]:
        return [s for s in self.servers if s.process is not None and s.process.poll() is None]

    def _client(self, server: RedisServer) -> redis.Redis:
        return redis.Redis(port=server.port, socket_timeout=2, socket_connect_timeout=2)

    def _wait_ok(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            states = []
            for server in self.live():
                client = self._client(server)
                try:
                    states.append(client.cluster("info").get("cluster_state"))
                except redis.RedisError:
                    states.append("unreachable")
                finally:
                    client.close()
            if states and all(state == "ok" for state in states):
                return
            time.sleep(0.1)
        raise RuntimeError("cluster did not reach cluster_state:ok")

    def _wait_replicas_linked(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            linked = 0
            for server in self.live():
                client = self._client(server)
                try:
                    info = client.info("replication")
                finally:
                    client.close()
                if info.get("role") == "slave" and info.get("master_link_status") == "up":
                    linked += 1
            if linked >= len(self.servers) - len(self.servers) // (1 + self.replicas):
                return
            time.sleep(0.1)
        raise RuntimeError("replicas did not link to their primaries")

    def role(self, server: RedisServer) -> str:
        client = self._client(server)
        try:
            role: bytes = _execute(client, "ROLE")[0]
            return role.decode()
        finally:
            client.close()

    def primaries(self) -> list[RedisServer]:
        return [s for s in self.live() if self.role(s) == "master"]

    def server_of_slot(self, slot: int) -> RedisServer:
        """The live primary that serves ``slot`` now, as the cluster itself says."""
        for server in self.live():
            client = self._client(server)
            try:
                ranges = _execute(client, "CLUSTER", "SLOTS")
            except redis.RedisError:
                continue
            finally:
                client.close()
            for start, end, primary, *_ in ranges:
                if start <= slot <= end:
                    port = int(primary[1])
                    for candidate in self.live():
                        if candidate.port == port:
                            return candidate
        raise LookupError(f"no live primary serves slot {slot}")

    def server_of_key(self, key: str) -> RedisServer:
        from redis.crc import key_slot

        return self.server_of_slot(key_slot(key.encode()))

    def kill(self, server: RedisServer) -> None:
        """SIGKILL one node: what a crashed primary looks like to everyone else."""
        server.kill()

    def wait_failover(self, dead: RedisServer, slot: int, timeout_s: float = 30.0) -> RedisServer:
        """Wait until ``slot`` (served by ``dead``) is served by a promoted replica, and the
        live nodes agree the cluster is ok again; returns the new primary."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                server = self.server_of_slot(slot)
            except LookupError:
                server = None
            if server is not None and server is not dead:
                self._wait_ok(max(0.1, deadline - time.monotonic()))
                return server
            time.sleep(0.05)
        raise RuntimeError(f"no replica took slot {slot} over within {timeout_s}s")

    def migrate_slot(
        self, slot: int, target: RedisServer | None = None, batch: int = 100
    ) -> tuple[RedisServer, RedisServer]:
        """Move ``slot`` and its keys to another live primary, under load, as
        ``redis-cli --cluster reshard`` does: IMPORTING/MIGRATING, MIGRATE the keys
        (clients meanwhile get ASK for keys already moved), then SETSLOT NODE on the
        target, the source and the other primaries (replicas refuse SETSLOT; they
        follow by gossip). Returns (source, target)."""
        source = self.server_of_slot(slot)
        if target is None:
            target = next(s for s in self.primaries() if s is not source)
        # MIGRATE of a large stream can outlast the 2 s timeout of the probing clients.
        clients = {s.port: redis.Redis(port=s.port, socket_timeout=30) for s in self.primaries()}
        try:
            src, dst = clients[source.port], clients[target.port]
            src_id = _execute(src, "CLUSTER", "MYID")
            dst_id = _execute(dst, "CLUSTER", "MYID")
            _execute(dst, "CLUSTER", "SETSLOT", slot, "IMPORTING", src_id)
            _execute(src, "CLUSTER", "SETSLOT", slot, "MIGRATING", dst_id)
            while keys := _execute(src, "CLUSTER", "GETKEYSINSLOT", slot, batch):
                _execute(src, "MIGRATE", "127.0.0.1", target.port, "", 0, 10_000, "KEYS", *keys)
            others = [p for p in clients if p not in (source.port, target.port)]
            for port in (target.port, source.port, *others):
                _execute(clients[port], "CLUSTER", "SETSLOT", slot, "NODE", dst_id)
        finally:
            for client in clients.values():
                client.close()
        return source, target

    def restart(self, server: RedisServer, timeout_s: float = 30.0) -> None:
        """Start a killed node again on its port and data: it rejoins the cluster (as a
        replica of whoever took its slots over)."""
        server.start()
        self._wait_ok(timeout_s)

    def flushall(self) -> None:
        for server in self.primaries():
            client = self._client(server)
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
