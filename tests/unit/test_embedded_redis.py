"""The embedded redis-server: a port it picked and lost before binding is picked again."""

from __future__ import annotations

import socket

import pytest

from gateway.embedded_redis import RedisServer


def test_a_port_taken_between_pick_and_bind_is_picked_again():
    """CI once failed a cluster's setup: a picked port was taken by an outgoing connection
    before redis-server bound it ('Address already in use')."""
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        taken = squatter.getsockname()[1]
        server = RedisServer()
        server.port = taken  # as if the port had been taken after it was picked
        server.start()
        try:
            assert server.port != taken
            with socket.create_connection(("127.0.0.1", server.port), 2) as s:
                s.sendall(b"PING\r\n")
                assert s.recv(16).startswith(b"+PONG")
        finally:
            server.stop()


def test_a_port_given_by_the_caller_is_not_changed():
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        taken = squatter.getsockname()[1]
        with pytest.raises(RuntimeError, match="Address already in use"):
            RedisServer(taken).start()
