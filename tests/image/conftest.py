"""Session fixtures of the image tests: the engine, the stand-in base, the
wheelhouse and the image, each made once and timed (shown with ``pytest -s``).

On a machine where Docker cannot run at all (not Linux, not root, no apt-get)
the tests are skipped with the reason; with CI=true they fail instead, so CI
never passes without having built and run the image.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import NoReturn

import pytest

from tests.image.engine import (
    ROOT,
    DockerEngine,
    EngineUnavailable,
    build_image,
    build_redis_image,
    ensure_installed,
    import_standin,
    in_ci,
    make_wheelhouse,
    standin_rootfs,
)

# Inside the build context (.dockerignore lets build/wheels* in); kept apart
# from build/wheels, which is the user's own.
WHEELS = ROOT / "build" / "wheels-tests"
IMAGE = "meetstream-gateway:test"


def report(name: str, **figures: object) -> None:
    print(f"\n[{name}] " + ", ".join(f"{k}={v}" for k, v in figures.items()))


def unavailable(reason: str) -> NoReturn:
    if in_ci():
        pytest.fail(f"CI must build and run the image, but: {reason}", pytrace=False)
    pytest.skip(f"Docker cannot run here: {reason}")


@pytest.fixture(scope="session")
def engine() -> Iterator[DockerEngine]:
    start = time.monotonic()
    try:
        ensure_installed()
    except EngineUnavailable as exc:
        unavailable(str(exc))
    installed = time.monotonic()
    engine = DockerEngine()
    try:
        engine.start()
    except EngineUnavailable as exc:
        engine.stop()
        unavailable(str(exc))
    except BaseException:
        engine.stop()
        raise
    report("engine", install_s=f"{installed - start:.1f}", dockerd_s=f"{time.monotonic() - installed:.1f}")
    try:
        yield engine
    finally:
        engine.stop()


@pytest.fixture(scope="session")
def standin_base(engine: DockerEngine) -> str:
    start = time.monotonic()
    try:
        tar = standin_rootfs()
    except EngineUnavailable as exc:
        unavailable(str(exc))
    made = time.monotonic()
    tag = import_standin(engine, tar)
    cached = f"{made - start:.1f}"
    report("stand-in base", debootstrap_or_cache_s=cached, import_s=f"{time.monotonic() - made:.1f}")
    return tag


@pytest.fixture(scope="session")
def wheelhouse(engine: DockerEngine, standin_base: str) -> Path:
    start = time.monotonic()
    wheels = make_wheelhouse(engine, standin_base, WHEELS)
    report("wheelhouse", wheels=len(wheels), seconds=f"{time.monotonic() - start:.1f}")
    return WHEELS


@pytest.fixture(scope="session")
def image(engine: DockerEngine, standin_base: str, wheelhouse: Path) -> str:
    start = time.monotonic()
    build_image(engine, standin_base, wheelhouse, IMAGE)
    report("image build (BuildKit, --network none)", seconds=f"{time.monotonic() - start:.1f}")
    return IMAGE


@pytest.fixture(scope="session")
def redis_image(engine: DockerEngine, standin_base: str) -> str:
    start = time.monotonic()
    tag = build_redis_image(engine, standin_base)
    report("redis image", seconds=f"{time.monotonic() - start:.1f}")
    return tag
