"""What is in the final image: no compiler, no pip, and the size and layers it adds."""

from __future__ import annotations

import json
import re
import subprocess

import pytest

from tests.image.conftest import report
from tests.image.engine import DockerEngine, image_files

pytestmark = [pytest.mark.image, pytest.mark.timeout(600)]

COMPILER = re.compile(
    r"(^|/)s?bin/((x86_64|aarch64)-linux-gnu-)?(gcc|cc|c\+\+|g\+\+|cpp|clang(\+\+)?|tcc|ld(\.bfd|\.gold)?|as|make)"
    r"(-[\d.]+)?$|/cc1(plus)?$"
)
PIP_PACKAGES = {"pip", "setuptools", "wheel", "pkg_resources", "_distutils_hack"}
PIP_DIST = re.compile(r"^(pip|setuptools|wheel)-[^/]*\.(dist-info|egg-info|whl)$")


def pip_leftover(name: str) -> bool:
    """pip, setuptools or wheel, installed or as a wheel file, or a pip script."""
    parts = name.rstrip("/").split("/")
    if re.fullmatch(r"pip[\d.]*", parts[-1]) and len(parts) > 1 and parts[-2] == "bin":
        return True
    return any(
        PIP_DIST.match(part) or (part in PIP_PACKAGES and parts[i - 1] in ("site-packages", "dist-packages"))
        for i, part in enumerate(parts)
        if i > 0
    )


def test_the_leftover_checks_catch_what_they_look_for():
    assert pip_leftover("usr/local/lib/python3.12/site-packages/pip/__init__.py")
    assert pip_leftover("opt/venv/lib/python3.11/site-packages/setuptools-80.0.dist-info/RECORD")
    assert pip_leftover("usr/local/lib/python3.12/ensurepip/_bundled/pip-24.0-py3-none-any.whl")
    assert pip_leftover("usr/local/bin/pip3.12") and pip_leftover("opt/venv/bin/pip")
    assert not pip_leftover("opt/venv/lib/python3.11/site-packages/numpy/pipeline.py")
    assert COMPILER.search("usr/bin/gcc-12") and COMPILER.search("usr/bin/x86_64-linux-gnu-ld.bfd")
    assert COMPILER.search("usr/lib/gcc/x86_64-linux-gnu/12/cc1")
    assert not COMPILER.search("usr/bin/python3.11") and not COMPILER.search("usr/bin/ascii")


def test_no_compiler_and_no_pip_in_the_final_image(engine: DockerEngine, image: str):
    """Read off the image's filesystem (docker export), not the Dockerfile's text."""
    names = [entry.name for entry in image_files(engine, image)]
    assert "opt/venv/bin/meetstream-gateway" in names  # the right filesystem, read in full
    assert [n for n in names if COMPILER.search(n)] == []
    assert [n for n in names if pip_leftover(n)] == []
    run = subprocess.run(
        [engine.client, "run", "--rm", "--network", "none", "--entrypoint", "python", image, "-m", "pip"],
        capture_output=True,
        text=True,
        timeout=60,
        env=engine.env,
    )
    assert run.returncode != 0 and "No module named pip" in run.stderr


def test_size_and_layers(engine: DockerEngine, image: str, standin_base: str):
    """The image adds two layers with content to its base: the user (and pip's removal), and
    the virtualenv (WORKDIR adds an empty one)."""

    def inspect(ref: str) -> dict:
        return json.loads(engine.docker("image", "inspect", ref))[0]

    ours, base = inspect(image), inspect(standin_base)
    added = ours["RootFS"]["Layers"][len(base["RootFS"]["Layers"]) :]
    assert ours["RootFS"]["Layers"][: len(base["RootFS"]["Layers"])] == base["RootFS"]["Layers"]

    def history(ref: str) -> list[tuple[int, str]]:
        fmt = "{{.Size}}\t{{.CreatedBy}}"
        lines = engine.docker("history", "--no-trunc", "--human=false", "--format", fmt, ref).splitlines()
        return [(int(size), step) for size, step in (line.split("\t", 1) for line in lines)]

    steps = history(image)[: -len(history(standin_base))]  # newest first: ours, then the base's
    nonempty = [(size, step) for size, step in steps if size > 0]
    venv_size = max(size for size, step in nonempty if "/opt/venv" in step)
    mb = 1e6
    report(
        "image size",
        image_mb=f"{ours['Size'] / mb:.0f}",
        base_mb=f"{base['Size'] / mb:.0f}",
        added_mb=f"{(ours['Size'] - base['Size']) / mb:.1f}",
        venv_mb=f"{venv_size / mb:.1f}",
        layers=len(ours["RootFS"]["Layers"]),
        added_layers=len(added),
        steps_with_content=len(nonempty),
    )
    assert len(nonempty) == 2 and len(added) <= 3
    assert venv_size < 150 * mb  # 116 MB measured: numpy is half of it
    assert ours["Size"] - base["Size"] - venv_size < 1 * mb
