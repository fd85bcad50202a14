"""The metrics and probe HTTP server: ``/metrics``, ``/healthz``, ``/readyz``.

A deliberately tiny HTTP/1.1 responder on its own port, so that scraping and
the chart's probes do not share a port (or a code path) with bot traffic. The bot
port answers ``/healthz`` and ``/readyz`` as well (``BotServer.process_request``),
for load balancers that can only check the port they route to.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

log = logging.getLogger(__name__)

_MAX_REQUEST_BYTES = 8192


class ProbeServer:
    def __init__(
        self, host: str, port: int, registry: CollectorRegistry, is_ready: Callable[[], bool]
    ) -> None:
        self.host = host
        self.port = port
        self.registry = registry
        self.is_ready = is_ready
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, self.host, self.port)
        self.port = self._server.sockets[0].getsockname()[1]
        log.info("metrics and probes listening", extra={"host": self.host, "port": self.port})

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(5):
                head = await reader.readuntil(b"\r\n\r\n")
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            writer.close()
            return
        parts = head[:_MAX_REQUEST_BYTES].split(b"\r\n", 1)[0].split()
        method = parts[0] if parts else b""
        path = parts[1].split(b"?", 1)[0] if len(parts) > 1 else b""
        if method not in (b"GET", b"HEAD"):
            status, ctype, body = "405 Method Not Allowed", "text/plain", b"GET only\n"
        elif path == b"/metrics":
            status, ctype, body = "200 OK", CONTENT_TYPE_LATEST, generate_latest(self.registry)
        elif path == b"/healthz":
            status, ctype, body = "200 OK", "text/plain", b"ok\n"
        elif path == b"/readyz":
            ok = self.is_ready()
            status = "200 OK" if ok else "503 Service Unavailable"
            ctype, body = "text/plain", b"ready\n" if ok else b"not ready\n"
        else:
            status, ctype, body = "404 Not Found", "text/plain", b"not found\n"
        writer.write(
            f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
            "Connection: close\r\n\r\n".encode()
            + (body if method != b"HEAD" else b"")
        )
        with contextlib.suppress(ConnectionError):
            await writer.drain()
        writer.close()

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await self._server.wait_closed()
            self._server = None
