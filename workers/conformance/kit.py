"""The conformance kit's run: a gateway, simulated bots and N instances of any worker
command, driven through crashes, a pause and a clean stop, then checked from outside.

The scenario (timings scale with the lease settings the kit gives the workers)::

    bots_before bots connect and stream          instances start (commands in turn)
    bots_after more bots connect                 every bot owned, settle
    kill -9 one instance (commands in turn)      its bots are taken over; a replacement starts
    kill -9 another                              (with two commands: the other language)
    SIGSTOP one past its lease, then SIGCONT     its bots are taken over; it must not handle them
    SIGTERM one                                  it hands its bots back; a replacement starts
    bots stop streaming, send a last ping, leave every bot let go; SIGTERM to all

The bots stream audio in real time throughout and send a ping every second;
the verdicts are in :mod:`workers.conformance.checks`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import secrets
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any, cast

import redis.asyncio as aioredis

from gateway.embedded_redis import RedisServer
from gateway.protocol import BOT_SAMPLE_RATE, AudioFrame
from gateway.testing.bot import SimulatedBot, tone
from gateway.testing.process import GatewayProcess
from workers.conformance import checks
from workers.conformance.checks import Action, Check, Record

log = logging.getLogger("workers.conformance")

#: What the kit calls its own SDK worker when no command is given.
DEFAULT_WORKER = f"{shlex.quote(sys.executable)} -m workers greeter"


@dataclass
class KitConfig:
    """One run of the kit; units in the names."""

    #: Worker commands (shell syntax, run in ``cwd``); instance k runs command k mod len.
    workers: list[str] = field(default_factory=lambda: [DEFAULT_WORKER])
    instances: int = 3
    bots_before: int = 2
    bots_after: int = 4
    lease_ttl_s: float = 2.0
    lease_renew_s: float = 0.4
    claim_interval_s: float = 0.25
    frame_ms: int = 100
    ping_every_s: float = 1.0
    #: Added to every time bound: process scheduling on a loaded machine.
    slack_s: float = 0.75
    settle_s: float = 1.5
    #: What happens to the instances, in order: kill (kill -9, then a replacement starts),
    #: pause (SIGSTOP past the lease, then SIGCONT), term (SIGTERM, then a replacement).
    disruptions: tuple[str, ...] = ("kill", "kill", "pause", "term")
    start_timeout_s: float = 30.0
    #: An external Redis (a unique key prefix keeps the run apart); default: one of its own.
    redis_url: str | None = None
    group: str = "conformance"
    cwd: str | None = None
    #: Keep the workers' logs here (default: a temporary directory, removed on success).
    run_dir: str | None = None


@dataclass
class Report:
    config: KitConfig
    checks: list[Check]
    wall_s: float
    run_dir: str

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks)

    def text(self) -> str:
        c = self.config
        lines = [
            f"meetstream worker conformance: {c.instances} instances of "
            + " / ".join(repr(w) for w in c.workers)
            + f", {c.bots_before + c.bots_after} bots, {self.wall_s:.1f} s (logs: {self.run_dir})"
        ]
        for check in self.checks:
            figures = ", ".join(f"{k}={v}" for k, v in check.figures.items())
            lines.append(f"{'PASS' if check.passed else 'FAIL'} {check.name}: {check.summary}")
            if figures:
                lines.append(f"     {figures}")
            lines += [f"     - {p}" for p in check.problems]
        ok = sum(c.passed for c in self.checks)
        lines.append(f"RESULT: {'PASS' if self.passed else 'FAIL'} ({ok} of {len(self.checks)} checks)")
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        return {
            "passed": self.passed,
            "wall_s": round(self.wall_s, 2),
            "run_dir": self.run_dir,
            "config": asdict(self.config),
            "checks": [asdict(c) for c in self.checks],
        }


class _Abort(Exception):
    """The run cannot go on (a worker exited, or never showed up): the report says why."""

    def __init__(self, check: Check) -> None:
        super().__init__(check.summary)
        self.check = check


def _tail(path: str, lines: int = 8) -> str:
    with contextlib.suppress(OSError):
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])
    return ""


@dataclass
class _Instance:
    name: str
    command: str
    proc: subprocess.Popen[bytes]
    output: IO[bytes]
    state: str = "running"  # running | paused | stopping | killed | exited
    exit_code: int | None = None
    exit_s: float | None = None

    def signal(self, sig: int) -> None:
        # The whole process group: a command may be a wrapper (npm, a shell) around the worker.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, sig)


class _KitBot:
    """A simulated bot that streams until told to stop and pings every ``ping_every_s``."""

    def __init__(self, url: str, bot_id: str, speakers: int) -> None:
        self.bot = SimulatedBot(url, bot_id, record_sent=False)
        self.bot_id = bot_id
        self.speakers = [(f"spk-{i}", f"Speaker {i}", 180.0 + 90 * i) for i in range(speakers)]
        self.pings: list[str] = []
        self.stop = asyncio.Event()
        self.task: asyncio.Task[None] | None = None
        self.left_at = 0.0

    async def start(self, frame_ms: int, ping_every_s: float) -> None:
        await self.bot.connect()
        self.task = asyncio.create_task(self._stream(frame_ms, ping_every_s))

    async def ping(self) -> None:
        ping_id = f"{self.bot_id}/{len(self.pings)}"
        self.pings.append(ping_id)
        await self.bot.send_control_json({"type": "ping", "id": ping_id})

    async def _stream(self, frame_ms: int, ping_every_s: float) -> None:
        n = BOT_SAMPLE_RATE * frame_ms // 1000
        began = time.monotonic()
        next_ping = began + ping_every_s
        i = 0
        while not self.stop.is_set():
            for speaker_id, name, freq in self.speakers:
                await self.bot.send_frame(AudioFrame(speaker_id, name, tone(freq, n, i * n)))
            i += 1
            if time.monotonic() >= next_ping:
                await self.ping()
                next_ping += ping_every_s
            await asyncio.sleep(max(0.0, began + i * frame_ms / 1000 - time.monotonic()))

    def pongs(self) -> list[str]:
        return [
            str(c.get("message", ""))[5:]
            for c in self.bot.commands("sendmsg")
            if str(c.get("message", "")).startswith("pong:")
        ]


class _Run:
    def __init__(self, config: KitConfig) -> None:
        if config.instances < 2:
            raise ValueError("the kit needs at least 2 instances: someone must take over")
        unknown = set(config.disruptions) - {"kill", "pause", "term"}
        if unknown:
            raise ValueError(f"unknown disruptions {sorted(unknown)}: kill, pause, term")
        self.c = config
        self.records: list[Record] = []
        self.actions: list[Action] = []
        self.instances: dict[str, _Instance] = {}
        self.bots: list[_KitBot] = []
        self.run_dir = Path(config.run_dir or tempfile.mkdtemp(prefix="meetstream-conformance-"))
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.prefix = "meetstream" if config.redis_url is None else f"conformance-{secrets.token_hex(4)}"
        self.journal_key = f"{self.prefix}:workers:{config.group}:journal"
        self.redis_url = config.redis_url or ""
        self._next = 0
        self._disruption = 0

    # -- instances ------------------------------------------------------------------------

    def start_instance(self, command_index: int) -> _Instance:
        c = self.c
        name = f"w{self._next}"
        self._next += 1
        command = c.workers[command_index % len(c.workers)]
        env = {k: v for k, v in os.environ.items() if not k.startswith("MEETSTREAM_")}
        env.update(
            MEETSTREAM_REDIS_URL=self.redis_url,
            MEETSTREAM_KEY_PREFIX=self.prefix,
            MEETSTREAM_WORKER_GROUP=c.group,
            MEETSTREAM_WORKER_INSTANCE=name,
            MEETSTREAM_LEASE_TTL_S=str(c.lease_ttl_s),
            MEETSTREAM_LEASE_RENEW_S=str(c.lease_renew_s),
            MEETSTREAM_CLAIM_INTERVAL_S=str(c.claim_interval_s),
            MEETSTREAM_CONFORMANCE="1",
            MEETSTREAM_LOG_FORMAT="json",
        )
        output = open(self.run_dir / f"{name}.log", "wb")  # noqa: SIM115 (closed in _finish)
        proc = subprocess.Popen(
            shlex.split(command),
            cwd=c.cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        inst = _Instance(name, command, proc, output)
        self.instances[name] = inst
        self.actions.append(Action("start", name, time.time()))
        log.info("started %s: %s", name, command)
        return inst

    def running(self) -> list[_Instance]:
        return [i for i in self.instances.values() if i.state == "running" and i.proc.poll() is None]

    def owned(self, instance: str) -> set[str]:
        open_: set[str] = set()
        for r in self.records:
            if r.instance != instance:
                continue
            if r.type == "start":
                open_.add(r.bot)
            elif r.type == "stop":
                open_.discard(r.bot)
        return open_

    def owner_of(self) -> dict[str, set[str]]:
        """bot -> live instances with an open stint (should be one each); a killed or exited
        instance's stints ended with it, stop record or not."""
        owners: dict[str, set[str]] = {}
        for name, inst in self.instances.items():
            if inst.state in ("killed", "exited"):
                continue
            for bot in self.owned(name):
                owners.setdefault(bot, set()).add(name)
        return owners

    def pick(self) -> _Instance:
        """The next disruption's target: commands in turn, the busiest instance of that command."""
        index = self._disruption % len(self.c.workers)
        self._disruption += 1
        running = self.running()
        mine = [i for i in running if i.command == self.c.workers[index]] or running
        return max(mine, key=lambda i: len(self.owned(i.name)))

    async def wait(self, what: str, cond: Callable[[], bool], timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while not cond():
            for inst in self.instances.values():
                if inst.state == "running" and inst.proc.poll() is not None:
                    check = Check("instances stay up", False, "no instance exits unless the kit stops it")
                    check.fail(
                        f"{inst.name} ({inst.command}) exited with {inst.proc.returncode} while "
                        f"waiting for {what}; its output ends:\n{_tail(inst.output.name)}"
                    )
                    raise _Abort(check)
            if time.monotonic() > deadline:
                log.warning("timed out waiting for %s", what)
                return False
            await asyncio.sleep(0.05)
        return True

    async def hello(self, inst: _Instance) -> None:
        ok = await self.wait(
            f"hello from {inst.name}",
            lambda: any(r.type == "hello" and r.instance == inst.name for r in self.records),
            self.c.start_timeout_s,
        )
        if not ok:
            check = Check("hello", False, "every instance announced itself on the group's journal")
            check.fail(
                f"{inst.name} ({inst.command}) wrote no hello record to {self.journal_key} within "
                f"{self.c.start_timeout_s:g} s: a worker under test must write the journal "
                f"(docs/WORKERS.md, 'The conformance kit'); its output ends:\n{_tail(inst.output.name)}"
            )
            raise _Abort(check)

    async def all_owned(self, timeout_s: float) -> bool:
        ids = {b.bot_id for b in self.bots}
        return await self.wait(
            "every bot owned",
            lambda: ids <= {b for b, owners in self.owner_of().items() if owners},
            timeout_s,
        )

    def bound_s(self) -> float:
        return self.c.lease_ttl_s + self.c.claim_interval_s + self.c.slack_s

    # -- the journal ----------------------------------------------------------------------

    async def tail(self, client: aioredis.Redis, stop: asyncio.Event) -> None:
        last = "0-0"
        while True:
            reply = cast(
                "list[tuple[bytes, list[tuple[bytes, dict[bytes, bytes]]]]]",
                await client.xread({self.journal_key: last}, count=1000, block=100),
            )
            for _, entries in reply or ():
                for entry_id, raw in entries:
                    last = entry_id.decode()
                    f = {k.decode(): v.decode() for k, v in raw.items()}
                    self.records.append(Record(last, f.get("type", ""), f.get("instance", ""), f))
            if stop.is_set() and not reply:
                return

    # -- the scenario ---------------------------------------------------------------------

    async def disrupt(self, kind: str) -> None:
        c = self.c
        target = self.pick()
        bots = self.owned(target.name)
        t = time.time()
        log.info("%s %s (owns %d bots)", kind, target.name, len(bots))

        def taken() -> bool:
            owners = self.owner_of()
            return all(owners.get(b, set()) - {target.name} for b in bots)

        if kind == "kill":
            self.actions.append(Action("kill", target.name, t))
            target.signal(signal.SIGKILL)
            target.state = "killed"
            await asyncio.to_thread(target.proc.wait, 10)
            await self.wait("takeover", taken, self.bound_s() + 5)
        elif kind == "pause":
            self.actions.append(Action("pause", target.name, t))
            target.signal(signal.SIGSTOP)
            target.state = "paused"
            await self.wait("takeover of a paused instance", taken, self.bound_s() + 5)
            await asyncio.sleep(0.5)
            target.signal(signal.SIGCONT)
            target.state = "running"
            self.actions.append(Action("resume", target.name, time.time()))
            await asyncio.sleep(c.settle_s)
            return
        elif kind == "term":
            self.actions.append(Action("term", target.name, t))
            target.signal(signal.SIGTERM)
            target.state = "stopping"
            try:
                target.exit_code = await asyncio.to_thread(target.proc.wait, 40)
                target.exit_s = time.time() - t
            except subprocess.TimeoutExpired:
                target.signal(signal.SIGKILL)
            target.state = "exited"
            await self.wait("hand-back", taken, c.claim_interval_s + c.slack_s + 5)
        replacement = self.start_instance(c.workers.index(target.command))
        await self.hello(replacement)
        await asyncio.sleep(c.settle_s)

    async def main(self) -> Report:
        c = self.c
        began = time.monotonic()
        server: RedisServer | None = None
        gateway: GatewayProcess | None = None
        client: aioredis.Redis | None = None
        tail: asyncio.Task[None] | None = None
        tail_stop = asyncio.Event()
        try:
            if c.redis_url is None:
                server = RedisServer().start()
                self.redis_url = server.url
            else:
                self.redis_url = c.redis_url
            gateway = GatewayProcess(self.redis_url, "--key-prefix", self.prefix, "--audio-maxlen", "1000000")
            await asyncio.to_thread(gateway.start)
            client = aioredis.Redis.from_url(self.redis_url)
            tail = asyncio.create_task(self.tail(client, tail_stop))

            # 1. bots that are there before the group
            for i in range(c.bots_before):
                kb = _KitBot(gateway.url, f"early-{i}", speakers=1 + i % 2)
                await kb.start(c.frame_ms, c.ping_every_s)
                self.bots.append(kb)
            await asyncio.sleep(1.0)
            # 2. the group
            group_start = time.time()
            first = [self.start_instance(k) for k in range(c.instances)]
            for inst in first:
                await self.hello(inst)
            await self.all_owned(10)
            # 3. bots that come later
            for i in range(c.bots_after):
                kb = _KitBot(gateway.url, f"late-{i}", speakers=1 + i % 2)
                await kb.start(c.frame_ms, c.ping_every_s)
                self.bots.append(kb)
            await self.all_owned(10)
            await asyncio.sleep(c.settle_s)
            # 4. crashes, a pause, a clean stop
            for kind in c.disruptions:
                await self.disrupt(kind)
            # 5. the end of the meetings
            for kb in self.bots:
                kb.stop.set()
            await asyncio.gather(*(kb.task for kb in self.bots if kb.task is not None))
            for kb in self.bots:
                await kb.ping()
            await self.wait(
                "every ping answered",
                lambda: all(set(kb.pings) <= set(kb.pongs()) for kb in self.bots),
                10,
            )
            for kb in self.bots:
                await kb.bot.close()
                kb.left_at = time.time()
            await self.wait(
                "every bot let go",
                lambda: not any(self.owner_of().values()),
                10 + c.lease_ttl_s,
            )
            return await self.verdict(client, group_start, time.monotonic() - began)
        except _Abort as abort:
            return Report(c, [abort.check], time.monotonic() - began, str(self.run_dir))
        finally:
            await self.finish(gateway, server, client, tail, tail_stop)

    async def verdict(self, client: aioredis.Redis, group_start: float, wall_s: float) -> Report:
        c = self.c
        # Stop the group before reading the last records: every stop and bye is in.
        for inst in self.running():
            inst.signal(signal.SIGTERM)
            inst.state = "stopping"
        for inst in self.instances.values():
            if inst.proc.poll() is None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    await asyncio.to_thread(inst.proc.wait, 30)
        await asyncio.sleep(0.3)
        published: dict[str, set[checks.Frame]] = {}
        for kb in self.bots:
            entries = cast(
                "list[tuple[bytes, dict[bytes, bytes]]]",
                await client.xrange(f"{self.prefix}:{{{kb.bot_id}}}:audio"),
            )
            published[kb.bot_id] = {(f[b"conn"].decode(), int(f[b"seq"])) for _, f in entries}
        leases = [await client.get(f"{self.prefix}:{{{kb.bot_id}}}:lease:{c.group}") for kb in self.bots]
        records = list(self.records)
        by_bot = checks.stints(records)
        hellos = {r.instance: r for r in records if r.type == "hello"}
        defaults = dict(default_lease_s=c.lease_ttl_s, default_claim_s=c.claim_interval_s, slack_s=c.slack_s)
        results = [
            checks.check_hello(records, self.instances),
            checks.check_found(by_bot, [kb.bot_id for kb in self.bots[: c.bots_before]], group_start),
            checks.check_frames_outside_stints(records),
            checks.check_one_owner(by_bot),
        ]
        alive_after = self._alive_after
        for a in self.actions:
            if a.kind in ("kill", "pause"):
                name = "takeover after kill -9" if a.kind == "kill" else "takeover of a paused instance"
                results.append(
                    checks.check_takeover(
                        f"{name} ({a.instance}, {self.instances[a.instance].command})",
                        by_bot,
                        hellos,
                        a,
                        alive_after(a),
                        **defaults,
                    )
                )
            elif a.kind == "term":
                inst = self.instances[a.instance]
                results.append(
                    checks.check_handback(
                        by_bot,
                        hellos,
                        a,
                        alive_after(a),
                        exit_code=inst.exit_code,
                        exit_s=inst.exit_s,
                        default_claim_s=c.claim_interval_s,
                        slack_s=c.slack_s,
                    )
                )
        results += [
            checks.check_no_frame_skipped(by_bot, published),
            checks.check_commands(
                {kb.bot_id: kb.pings for kb in self.bots}, {kb.bot_id: kb.pongs() for kb in self.bots}
            ),
            checks.check_session_end(
                by_bot, {kb.bot_id: kb.left_at for kb in self.bots}, sum(v is not None for v in leases)
            ),
        ]
        return Report(c, results, wall_s, str(self.run_dir))

    def _alive_after(self, action: Action) -> list[str]:
        """Instances that were running right after ``action`` (the possible new owners)."""
        alive: set[str] = set()
        for a in sorted(self.actions, key=lambda x: x.t):
            if a.t > action.t:
                break
            if a.kind in ("start", "resume"):
                alive.add(a.instance)
            elif a.kind in ("kill", "pause", "term"):
                alive.discard(a.instance)
        return sorted(alive)

    async def finish(
        self,
        gateway: GatewayProcess | None,
        server: RedisServer | None,
        client: aioredis.Redis | None,
        tail: asyncio.Task[None] | None,
        tail_stop: asyncio.Event,
    ) -> None:
        for kb in self.bots:
            kb.stop.set()
            if kb.task is not None:
                kb.task.cancel()
            with contextlib.suppress(Exception):
                await kb.bot.close()
        for inst in self.instances.values():
            if inst.proc.poll() is None:
                inst.signal(signal.SIGCONT)
                inst.signal(signal.SIGKILL)
                with contextlib.suppress(Exception):
                    await asyncio.to_thread(inst.proc.wait, 10)
            inst.output.close()
        if tail is not None:
            tail_stop.set()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(tail, 5)
        if client is not None:
            await client.aclose()
        if gateway is not None:
            await asyncio.to_thread(gateway.stop)
        if server is not None:
            server.stop()


async def run(config: KitConfig) -> Report:
    """Run the kit once; the report says what passed, with the figures measured."""
    kit = _Run(config)
    report = await kit.main()
    (kit.run_dir / "report.json").write_text(json.dumps(report.to_json(), indent=2))
    return report


def run_sync(config: KitConfig) -> Report:
    return asyncio.run(run(config))


__all__ = ["DEFAULT_WORKER", "KitConfig", "Report", "run", "run_sync"]
