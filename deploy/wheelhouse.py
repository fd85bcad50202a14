"""Make a wheelhouse for the image's Python: offline, reproducible image builds.

pip runs inside the base image itself (a throw-away container on the host
network), so the wheels fit the interpreter that installs them: its version,
ABI and glibc, and the environment markers of every dependency. pip on
another Python would get those wrong: ``pip download --python-version``
still evaluates markers with the host's interpreter (redis needs async-timeout
below Python 3.11.3, for one).

    python deploy/wheelhouse.py                    # python:3.12-slim-bookworm -> build/wheels
    python deploy/wheelhouse.py --image python:3.11-slim-bookworm --constraint constraints.txt
    docker build -f deploy/Dockerfile --network none --build-arg WHEELS=build/wheels -t meetstream-gateway .

The wheelhouse holds the project's dependencies and its build requirements
(setuptools, wheel), as wheels only; the build then installs from it alone
(``--no-index``). Keep the directory, or pin with ``--constraint``, to build
the same image again. Standard library only: it runs before any virtualenv.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_IMAGE = "python:3.12-slim-bookworm"  # the Dockerfile's PYTHON_IMAGE
# Variables that tell pip where the index is and how to reach it; passed on
# to the container (a local --find-links directory would not exist there).
PIP_ENV = ("PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL", "PIP_TRUSTED_HOST", "PIP_DEFAULT_TIMEOUT")
PROXY_ENV = ("HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "http_proxy", "https_proxy", "no_proxy")


def requirements(pyproject: Path = ROOT / "pyproject.toml") -> list[str]:
    """The project's dependencies and build requirements, as pyproject.toml states them."""
    data = tomllib.loads(pyproject.read_text())
    return [*data["project"]["dependencies"], *data["build-system"]["requires"]]


def docker_command(
    image: str, dest: Path, reqs: list[str], constraint: Path | None = None, docker: str = "docker"
) -> list[str]:
    """``docker run`` of pip download inside ``image``, writing into ``dest`` as the caller's user."""
    args = [docker, "run", "--rm", "--network", "host", "--user", f"{os.getuid()}:{os.getgid()}"]
    args += ["--env", "HOME=/tmp", "--env", "PIP_DISABLE_PIP_VERSION_CHECK=1"]
    args += ["--volume", f"{dest}:/wheels"]
    for name in (*PIP_ENV, *PROXY_ENV):
        if os.environ.get(name):
            args += ["--env", name]
    cert = os.environ.get("PIP_CERT")
    if cert:  # a private CA bundle, mounted where pip is told to find it
        args += ["--volume", f"{Path(cert).resolve()}:/etc/pip-cert.pem:ro"]
        args += ["--env", "PIP_CERT=/etc/pip-cert.pem"]
    pip = ["/tmp/venv/bin/pip", "download", "--quiet", "--only-binary=:all:", "--dest", "/wheels"]
    if constraint is not None:
        args += ["--volume", f"{constraint.resolve()}:/constraints.txt:ro"]
        pip += ["--constraint", "/constraints.txt"]
    # A virtualenv of the image's own Python: Debian's python3 has no pip of its
    # own, only ensurepip's (python3-venv).
    script = 'python3 -m venv /tmp/venv && exec "$@"'
    return [*args, "--entrypoint", "sh", image, "-c", script, "wheelhouse", *pip, *reqs]


def make(
    image: str, dest: Path, constraint: Path | None = None, docker: str = "docker", timeout_s: float = 600
) -> list[str]:
    """Fill ``dest`` with wheels for ``image``; returns their file names. Old wheels are removed
    first, so that a newer one left over cannot win over what the constraints pin."""
    dest.mkdir(parents=True, exist_ok=True)
    for old in dest.glob("*.whl"):
        old.unlink()
    command = docker_command(image, dest.resolve(), requirements(), constraint, docker)
    subprocess.run(command, check=True, timeout=timeout_s)
    return sorted(p.name for p in dest.glob("*.whl"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--image", default=DEFAULT_IMAGE, help="the PYTHON_IMAGE the build will use")
    parser.add_argument(
        "--dest", type=Path, default=ROOT / "build" / "wheels", help="inside the build context"
    )
    parser.add_argument("--constraint", type=Path, help="pip constraints file that pins versions")
    parser.add_argument("--docker", default="docker", help="docker client to run")
    args = parser.parse_args()
    try:
        wheels = make(args.image, args.dest, args.constraint, args.docker)
    except subprocess.CalledProcessError as exc:
        sys.exit(f"wheelhouse: pip in {args.image} failed with exit status {exc.returncode}")
    print("\n".join(wheels))
    print(f"{len(wheels)} wheels in {args.dest}", file=sys.stderr)


if __name__ == "__main__":
    main()
