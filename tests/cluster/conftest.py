"""Fixtures of the cluster tests: a real Ray head, and the freezelab command line."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator

import pytest
from ray_nodes import Head, ray_head


@pytest.fixture(scope="module")
def head(tmp_path_factory) -> Iterator[Head]:
    """One real single-node Ray head (1 CPU) for the job submission tests of a module."""
    with ray_head(tmp_path_factory.mktemp("head"), cpus=2) as started:
        yield started


@pytest.fixture
def freezelab_cli():
    """Run ``python -m freezelab ARGS`` in a subprocess: ``freezelab_cli("train", path)``."""

    def run(*args: str, env: dict | None = None, timeout: float = 300):
        return subprocess.run(
            [sys.executable, "-m", "freezelab", *args],
            capture_output=True,
            text=True,
            env=env,
            timeout=timeout,
        )

    return run
