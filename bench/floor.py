"""The floor: what a server that does nothing costs per frame, under the benchmark's own load.

``python -m bench.floor --bots 100 --frame-ms 100`` runs a uvloop server that completes
each bot's WebSocket handshake and then discards every byte it reads, and offers it the
same real-time load as ``bench.run`` (same generator, same pinning: the server on one
core, the generator on the rest). It prints the server's CPU per frame and its event
loop's wake-ups.

No server that reads the bots' sockets with an event loop can spend less than this per
frame, on this machine: at light load each frame arrives on its own, and waking up for it
is most of the cost. It puts a ceiling on any ratio against the reference bridge
(reference CPU per frame ÷ this floor), whatever the gateway does with the frame.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import json
import os
import subprocess
import sys
import time

from bench.loadgen import LoadGen, LoadSpec, merge
from bench.procstat import sample, wait_port
from bench.run import pin_cores
from gateway.embedded_redis import free_port, terminate

_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"  # RFC 6455, section 1.3


class _Discard(asyncio.Protocol):
    """Accepts the opening handshake, then reads and drops everything."""

    def __init__(self) -> None:
        self.head = b""
        self.open = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.Transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if self.open:
            return
        self.head += data
        if b"\r\n\r\n" not in self.head:
            return
        keys = [
            line.split(b":", 1)[1].strip()
            for line in self.head.split(b"\r\n")
            if line.lower().startswith(b"sec-websocket-key:")
        ]
        if not keys:
            self.transport.write(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
            self.transport.close()
            return
        key = keys[0]
        accept = base64.b64encode(hashlib.sha1(key + _GUID).digest())
        self.transport.write(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Accept: " + accept + b"\r\n\r\n"
        )
        self.open = True


async def serve(port: int) -> None:
    server = await asyncio.get_running_loop().create_server(_Discard, "127.0.0.1", port)
    async with server:
        await server.serve_forever()


def measure(
    bots: int, frame_ms: int, window_s: float, warmup_s: float = 3.0, group_ms: float = 5.0
) -> dict[str, float]:
    affinity = os.sched_getaffinity(0)
    cores = pin_cores()  # as bench.run: the server alone on the last core
    port = free_port()
    command = [sys.executable, "-m", "bench.floor", "--serve", str(port)]
    proc = subprocess.Popen(command, stdin=subprocess.DEVNULL)
    gen: LoadGen | None = None
    try:
        wait_port(port, 20, proc)
        if cores is not None:
            os.sched_setaffinity(proc.pid, cores[1])
        duration = warmup_s + window_s
        spec = LoadSpec(
            url=f"ws://127.0.0.1:{port}",
            bot_ids=[f"floor-{i}" for i in range(bots)],
            frame_ms=frame_ms,
            duration_s=duration,
            window_start_s=warmup_s,
            window_end_s=duration,
            tail_s=0.2,
            group_ms=group_ms,
        )
        gen = LoadGen(spec, max(1, min(4, bots // 250))).start()
        gen.wait_connected(timeout_s=120)
        start = time.time() + 1.0
        gen.go_at(start)
        time.sleep(max(0.0, start + warmup_s - time.time()))
        s0 = sample(proc.pid)
        time.sleep(max(0.0, start + duration - time.time()))
        s1 = sample(proc.pid)
        load = merge(gen.results(timeout_s=duration + 60))
    finally:
        if gen is not None:
            gen.stop()
        terminate(proc, 10)
        os.sched_setaffinity(0, affinity)
    window = s1.at - s0.at
    frames = load["frames_sent_window"]
    cpu = s1.cpu_s - s0.cpu_s
    wakeups = s1.wakeups - s0.wakeups
    return {
        "bots": bots,
        "frame_ms": frame_ms,
        "offered_fps": frames / window,
        "server_cores": cpu / window,
        "server_cpu_us_per_frame": cpu / frames * 1e6 if frames else float("nan"),
        "server_system_share": (s1.system_s - s0.system_s) / cpu if cpu else float("nan"),
        "wakeups_per_s": wakeups / window,
        "wakeups_per_frame": wakeups / frames if frames else float("nan"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description="CPU per frame of a server that discards every frame")
    parser.add_argument("--bots", type=int, default=100)
    parser.add_argument("--frame-ms", type=int, default=100)
    parser.add_argument("--window-s", type=float, default=10.0)
    parser.add_argument("--group-ms", type=float, default=5.0, help="as bench.run's; 0: each bot on its own")
    parser.add_argument("--serve", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        import uvloop

        uvloop.run(serve(args.serve))
        return
    print(json.dumps(measure(args.bots, args.frame_ms, args.window_s, group_ms=args.group_ms)))


if __name__ == "__main__":
    main()
