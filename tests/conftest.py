"""Shared fixtures: tiny train configs, and one Ray session for the tests that need it.

Starting Ray costs about 15 s on a 2-core machine, so every test that needs a cluster
shares the session-scoped ``ray_session``; loop logic runs in one process without Ray
(``scaling.num_workers: 0``) instead.
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
from types import SimpleNamespace
from typing import Any

import pytest

from freezelab.trainers.config import deep_merge

# Ray Train V2 changes into a per-run directory in the workers; tests keep cwd.
os.environ.setdefault("RAY_CHDIR_TO_TRIAL_DIR", "0")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")

TINY: dict[str, Any] = {
    "name": "tiny",
    "model": {"name": "test_resnet"},
    "data": {
        "kind": "digits",
        "classes": [0, 1, 2],
        "input_size": 32,
        "train_per_class": 24,
        "val_fraction": 0.25,
    },
    "policy": {"type": "full"},
    "epochs": 2,
    "batch_size": 16,
    "seed": 0,
    "optimizer": {"name": "sgd", "lr": 0.05, "momentum": 0.9},
    "scaling": {"num_workers": 0},
    "mlflow": {"enabled": False},
}


merge = deep_merge


@pytest.fixture(autouse=True)
def _work_in_tmp(tmp_path, monkeypatch):
    """Every test runs in its own directory: MLflow's default artifact root
    (./mlruns) and any relative path land there, never in the checkout."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


def _ray_is_up() -> bool:
    return "ray" in sys.modules and sys.modules["ray"].is_initialized()


@pytest.fixture(autouse=True)
def _ray_only_where_marked(request):
    """A test that starts or joins Ray in this process carries the ``ray`` marker, so
    that the fast loop (``-m "not ray"``) never starts one. A Ray that a subprocess
    starts is not seen here: such tests are marked by hand."""
    marked = request.node.get_closest_marker("ray") is not None
    if not marked and "ray_session" in request.fixturenames:
        pytest.fail("uses the ray_session fixture without @pytest.mark.ray")
    was_up = _ray_is_up()
    yield
    if not marked and not was_up and _ray_is_up():
        pytest.fail("started Ray in this process without @pytest.mark.ray")


@pytest.fixture
def tiny_config(tmp_path):
    """Build a validated tiny TrainConfig: ``tiny_config(policy={...}, epochs=3)``."""
    from freezelab.trainers.config import validate_config

    def build(**update: Any):
        data = merge(TINY, {"storage_path": str(tmp_path / "runs"), **update})
        return validate_config(data)

    return build


@pytest.fixture(scope="session")
def s3_endpoint():
    """A real S3 endpoint (moto's server on 127.0.0.1), with ``AWS_ENDPOINT_URL`` and
    dummy credentials in the environment: ``tests/object_store.py``."""
    from object_store import start_s3

    return start_s3()


@pytest.fixture
def s3_bucket(s3_endpoint):
    """A new, empty bucket on the test endpoint: its name."""
    from object_store import new_bucket

    return new_bucket(s3_endpoint)


@pytest.fixture(scope="session")
def ray_session(s3_endpoint):
    """One local Ray with 2 CPUs for every test that needs workers. The S3 endpoint
    starts first, so that every Ray worker inherits its environment."""
    import ray

    if not ray.is_initialized():
        # "local": a Ray of its own, never one that `ray start` left running on the machine.
        ray.init(address="local", num_cpus=2, log_to_driver=True)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def small_study_run(ray_session, tmp_path_factory):
    """The built-in study shrunk by ``SMALL_STUDY`` (two target variants x two policies,
    one seed), run once on the shared Ray session at its default concurrency (2 at once
    on its 2 CPUs): ``.outcome`` (what ``run_study`` returned), ``.out`` (what it
    printed) and ``.folder`` (where it ran: its ``mlflow.db``, runs and report). Several
    tests read this one run instead of each running the same study again."""
    from small_study import SMALL_STUDY

    from freezelab.study import run_study

    folder = tmp_path_factory.mktemp("small-study")
    printed = io.StringIO()
    with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stdout(printed):
        # as ``_work_in_tmp`` sets up a test, which runs after session fixtures
        patch.chdir(folder)
        patch.delenv("MLFLOW_TRACKING_URI", raising=False)
        outcome = run_study(None, overrides=SMALL_STUDY)
    return SimpleNamespace(outcome=outcome, out=printed.getvalue(), folder=folder)


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory):
    """``freezelab demo`` in a subprocess with a Ray of its own, run once for the tests
    that read it (``tests/demo_command.py``): a ``DemoRun``."""
    from demo_command import run_demo_command

    return run_demo_command(tmp_path_factory.mktemp("demo"))
