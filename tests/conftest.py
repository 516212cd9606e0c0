"""Shared fixtures: a small but real Fashion-MNIST Parquet dataset, and a CLI runner."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

import pytest

from job.data import default_source, prepare_data

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = 1200  # first 1200 official train images (-> 960 train / 240 val) and 1200 test images


@pytest.fixture(scope="session")
def source_dir() -> str:
    source = default_source()
    if not os.path.exists(os.path.join(source, "train-images-idx3-ubyte.gz")):
        pytest.fail(f"official Fashion-MNIST IDX files not found in {source}: run `make test`, "
                    f"which installs Debian's dataset-fashion-mnist, or set FASHION_MNIST_DIR")
    return source


@pytest.fixture(scope="session")
def small_data(source_dir, tmp_path_factory) -> str:
    """A real, small dataset, shared read-only by the whole session."""
    out = str(tmp_path_factory.mktemp("data") / "fashion-mnist")
    prepare_data(source_dir, out, num_shards=4, seed=0, limit=SMALL)
    return out


@pytest.fixture
def data_copy(small_data, tmp_path) -> str:
    """A private copy of the small dataset that a test may damage."""
    return shutil.copytree(small_data, tmp_path / "data")


def run_cli(*args: str, timeout: float = 600, **kwargs) -> subprocess.CompletedProcess:
    """`python -m job ARGS` in a subprocess, as a user would run it."""
    return subprocess.run([sys.executable, "-m", "job", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout, **kwargs)


def error_line(result: subprocess.CompletedProcess) -> str:
    """The CLI's one-line error (TensorFlow may print start-up lines of its own before it)."""
    lines = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, result.stderr
    return lines[0]


def pinned_ray_version() -> str:
    """The `ray[...]==X` pin in pyproject.toml, which every manifest and image must match."""
    with open(os.path.join(REPO, "pyproject.toml")) as f:
        return re.search(r'"ray\[[^\]]*\]==([\d.]+)"', f.read()).group(1)
