"""A Docker engine of the test session's own, and the images the image tests need.

No system service is used or changed: Debian's ``docker.io`` (installed with
apt-get when missing, as root, like the suite brings its own redis-server)
provides ``dockerd``, which is started here without systemd, with its data,
state and socket in a temporary directory, no bridge and no iptables rules
(builds and containers use the host network, on loopback), and stopped by
PID. Base images cannot be pulled here, so the Dockerfile's ``PYTHON_IMAGE``
is a stand-in made from Debian's own packages: a debootstrap ``minbase``
with python3 and python3-venv, imported into the engine, and cached as a tar
between runs (40-50 s to make cold, 2-6 s to import when cached).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from gateway.embedded_redis import terminate

ROOT = Path(__file__).resolve().parents[2]
# What the harness runs, and the Debian package that brings it.
PACKAGES = {"dockerd": "docker.io", "debootstrap": "debootstrap", "docker-compose": "docker-compose"}
STANDIN_PACKAGES = ("python3", "python3-venv", "python-is-python3")
# Bump to rebuild cached stand-in bases after changing how they are made.
STANDIN_RECIPE = 1
SBIN_PATH = "/usr/local/sbin:/usr/sbin:/sbin"


class EngineUnavailable(Exception):
    """Docker cannot run on this machine at all (the tests are skipped, except in CI)."""


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def which(name: str) -> str | None:
    return shutil.which(name, path=f"{os.environ.get('PATH', '')}:{SBIN_PATH}")


def run(
    args: Sequence[str], timeout_s: float, env: dict[str, str] | None = None, input: str | None = None
) -> subprocess.CompletedProcess[str]:
    """A command with a deadline; its output is in the error when it fails."""
    proc = subprocess.run(
        list(args), capture_output=True, text=True, timeout=timeout_s, env=env, input=input, check=False
    )
    if proc.returncode != 0:
        raise RuntimeError(
            f"{' '.join(args[:4])}... exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        )
    return proc


def ensure_installed() -> None:
    """apt-get install what is missing (Debian, root); EngineUnavailable where that cannot be."""
    missing = sorted({pkg for cmd, pkg in PACKAGES.items() if which(cmd) is None})
    if not missing:
        return
    if not sys.platform.startswith("linux"):
        raise EngineUnavailable(f"a Docker engine of the tests' own needs Linux, not {sys.platform}")
    if os.geteuid() != 0 or which("apt-get") is None:
        raise EngineUnavailable(
            f"missing {', '.join(missing)} and no way to install them "
            "(root and apt-get needed: apt-get install docker.io debootstrap docker-compose)"
        )
    apt_env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    run(["apt-get", "update", "-qq"], 300, env=apt_env)
    run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing], 600, env=apt_env)


def mounts_under(path: Path) -> list[str]:
    """Mount points at or below ``path`` (deepest first), from this process's mount table."""
    prefix = str(path.resolve())
    found = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            point = line.split()[4].replace("\\040", " ")
            if point == prefix or point.startswith(prefix + "/"):
                found.append(point)
    return sorted(found, key=len, reverse=True)


def remove_tree(path: Path) -> None:
    """rm -rf, but never through a mount left behind (it could reach outside ``path``)."""
    for point in mounts_under(path):
        subprocess.run(["umount", "-l", point], capture_output=True, timeout=30, check=False)
    if mounts_under(path):
        print(f"\n[engine] leaving {path}: still mounted", file=sys.stderr)
        return
    shutil.rmtree(path, ignore_errors=True)


class DockerEngine:
    """One ``dockerd`` in a temporary directory; :meth:`start`, :meth:`docker`, :meth:`stop`."""

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="meetstream-docker-"))
        self.socket = self.dir / "docker.sock"
        self.process: subprocess.Popen[bytes] | None = None
        # The client from the same package as the engine (a newer one, without
        # buildx, can only use the legacy builder).
        self.client = "/usr/bin/docker" if Path("/usr/bin/docker").exists() else (which("docker") or "docker")
        (self.dir / "client").mkdir()
        (self.dir / "daemon.json").write_text("{}")
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("DOCKER_")},
            "DOCKER_HOST": f"unix://{self.socket}",
            "DOCKER_CONFIG": str(self.dir / "client"),  # not the user's credentials or contexts
        }

    @property
    def log_path(self) -> Path:
        return self.dir / "dockerd.log"

    def log_tail(self, n: int = 3000) -> str:
        with contextlib.suppress(OSError):
            return self.log_path.read_text()[-n:]
        return ""

    def start(self, timeout_s: float = 60.0) -> DockerEngine:
        dockerd = which("dockerd")
        if dockerd is None:
            raise EngineUnavailable("dockerd not found")
        # SIGTERM to dockerd if the test process dies, so none outlives a killed run.
        setpriv = which("setpriv")
        args = [
            *([setpriv, "--pdeathsig", "TERM", "--"] if setpriv else []),
            dockerd,
            "--config-file", str(self.dir / "daemon.json"),
            "--data-root", str(self.dir / "data"),
            "--exec-root", str(self.dir / "exec"),
            "--pidfile", str(self.dir / "dockerd.pid"),
            "--host", f"unix://{self.socket}",
            "--iptables=false",
            "--ip-masq=false",
            "--bridge=none",
            "--userland-proxy=false",
        ]  # fmt: skip
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                args,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout_s
        while not self._ping():
            if self.process.poll() is not None:
                raise EngineUnavailable(f"dockerd exited with {self.process.returncode}:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"dockerd not answering after {timeout_s}s:\n{self.log_tail()}")
            time.sleep(0.1)
        return self

    def _ping(self) -> bool:
        with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX) as s:
            s.settimeout(2)
            s.connect(str(self.socket))
            s.sendall(b"GET /_ping HTTP/1.0\r\n\r\n")
            return b" 200 " in s.recv(64).split(b"\r\n")[0]
        return False

    def docker(self, *args: str, timeout_s: float = 60.0, input: str | None = None, **env: str) -> str:
        """Run the docker client against this engine; its stdout. Fails with its output."""
        return run([self.client, *args], timeout_s, env={**self.env, **env}, input=input).stdout

    def stop(self, timeout_s: float = 30.0) -> None:
        """Remove every container, stop dockerd (SIGTERM, then SIGKILL), delete its directory."""
        proc, self.process = self.process, None
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(Exception):
                ids = self.docker("ps", "-aq", timeout_s=10).split()
                if ids:
                    self.docker("rm", "-f", "-v", *ids, timeout_s=timeout_s)
            terminate(proc, timeout_s)
        remove_tree(self.dir)


def debian_source() -> tuple[str, str]:
    """(mirror URL, suite) of this machine's Debian: the mirror apt is configured with."""
    release = Path("/etc/os-release").read_text() if Path("/etc/os-release").exists() else ""
    codename = re.search(r"^VERSION_CODENAME=\"?(\w+)", release, re.M)
    if not re.search(r"^ID=\"?debian", release, re.M) or codename is None:
        raise EngineUnavailable("the stand-in base image is made with debootstrap from a Debian mirror")
    suite = codename.group(1)
    texts = [p.read_text() for p in sorted(Path("/etc/apt").glob("sources.list*/**/*")) if p.is_file()]
    if Path("/etc/apt/sources.list").is_file():
        texts.append(Path("/etc/apt/sources.list").read_text())
    for text in texts:
        # deb822 stanzas (URIs: / Suites:) and one-line "deb URI suite components".
        for stanza in re.split(r"\n\s*\n", text):
            uris = re.search(r"^URIs:\s*(\S+)", stanza, re.M)
            suites = re.search(r"^Suites:(.*)$", stanza, re.M)
            if uris and suites and suite in suites.group(1).split():
                return uris.group(1), suite
        for m in re.finditer(r"^deb\s+(?:\[[^\]]*\]\s+)?(\S+)\s+(\S+)\s", text, re.M):
            if m.group(2) == suite:
                return m.group(1), suite
    return "http://deb.debian.org/debian", suite


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "meetstream-gateway"


def standin_rootfs(timeout_s: float = 600.0) -> Path:
    """A tar of a Debian minbase with Python, made once per recipe and mirror and cached."""
    mirror, suite = debian_source()
    arch = run(["dpkg", "--print-architecture"], 10).stdout.strip()
    recipe = json.dumps([STANDIN_RECIPE, mirror, suite, arch, STANDIN_PACKAGES])
    key = hashlib.sha256(recipe.encode()).hexdigest()[:16]
    cache = cache_dir()
    tar = cache / f"standin-{key}.tar"
    if tar.exists():
        return tar
    cache.mkdir(parents=True, exist_ok=True)
    for old in cache.glob("standin-*.tar"):  # one cached base at a time (~160 MB)
        old.unlink()
    target = Path(tempfile.mkdtemp(prefix="standin-", dir=cache))
    try:
        run(
            [
                which("debootstrap") or "debootstrap",
                "--variant=minbase",
                f"--arch={arch}",
                f"--include={','.join(STANDIN_PACKAGES)}",
                suite,
                str(target),
                mirror,
            ],
            timeout_s,
        )
        # What a slim image leaves out: downloaded packages, indexes, docs.
        for junk in ("var/cache/apt/archives", "var/lib/apt/lists", "usr/share/doc", "usr/share/man"):
            for item in (target / junk).glob("*"):
                if item.is_dir() and not item.is_symlink():
                    shutil.rmtree(item)
                else:
                    item.unlink()
        partial = tar.with_suffix(".partial")
        run(["tar", "--numeric-owner", "-C", str(target), "-cf", str(partial), "."], 300)
        partial.rename(tar)
    finally:
        remove_tree(target)
    return tar


def import_standin(engine: DockerEngine, tar: Path) -> str:
    """The cached rootfs as an image, named after it: the build's PYTHON_IMAGE."""
    tag = f"meetstream-standin-python:{tar.stem.removeprefix('standin-')}"
    engine.docker(
        "import",
        "--change", "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "--change", "ENV LANG=C.UTF-8",
        "--change", 'CMD ["python3"]',
        str(tar),
        tag,
        timeout_s=120,
    )  # fmt: skip
    return tag


def build_redis_image(engine: DockerEngine, base: str) -> str:
    """Debian's redis-server on the stand-in base, for compose's REDIS_IMAGE (no image can be pulled)."""
    tag = base.replace("standin-python", "standin-redis")
    dockerfile = (
        f"FROM {base}\n"
        "RUN apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq"
        " --no-install-recommends redis-server >/dev/null && rm -rf /var/lib/apt/lists/*\n"
    )
    engine.docker("build", "--quiet", "--network", "host", "-t", tag, "-", input=dockerfile, timeout_s=300)
    return tag


def make_wheelhouse(engine: DockerEngine, base: str, dest: Path) -> list[str]:
    """deploy/wheelhouse.py, as a user runs it, for the stand-in base's Python."""
    script = str(ROOT / "deploy" / "wheelhouse.py")
    args = [sys.executable, script, "--image", base, "--dest", str(dest), "--docker", engine.client]
    out = run(args, 600, env=engine.env).stdout
    return out.split()


def build_image(engine: DockerEngine, base: str, wheels: Path, tag: str) -> None:
    """deploy/Dockerfile with BuildKit, offline (--network none): only the wheelhouse is read."""
    engine.docker(
        "build",
        "--network", "none",
        "--progress", "plain",
        "-f", str(ROOT / "deploy" / "Dockerfile"),
        "--build-arg", f"PYTHON_IMAGE={base}",
        "--build-arg", f"WHEELS={wheels.relative_to(ROOT)}",
        "-t", tag,
        str(ROOT),
        timeout_s=600,
        DOCKER_BUILDKIT="1",
    )  # fmt: skip


def image_files(engine: DockerEngine, image: str) -> list[tarfile.TarInfo]:
    """Every entry of an image's filesystem as a container sees it (docker export)."""
    cid = engine.docker("create", image, timeout_s=30).strip()
    try:
        with subprocess.Popen([engine.client, "export", cid], stdout=subprocess.PIPE, env=engine.env) as proc:
            if proc.stdout is None:
                raise RuntimeError("docker export gave no output")
            with tarfile.open(fileobj=proc.stdout, mode="r|") as tf:
                entries = list(tf)
            proc.wait(60)
        return entries
    finally:
        engine.docker("rm", "-f", cid, timeout_s=30)
