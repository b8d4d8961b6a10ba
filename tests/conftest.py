"""Shared fixtures: tiny train configs, and one Ray session for the tests that need it.

Starting Ray costs about 15 s on a 2-core machine, so every test that needs a cluster
shares the session-scoped ``ray_session``; loop logic runs in one process without Ray
(``scaling.num_workers: 0``) instead.

The suite runs on two pytest-xdist workers (``addopts``; ``-n 0`` runs it in one
process). Each worker is a pytest session of its own, with its own session fixtures (its
own Ray, its own S3 endpoint) and its own Ray temporary folder (below). Test files are
handed out whole, so module fixtures (a Ray head, an MLflow server) start once; the tests
that read one shared run (``demo_run``, ``small_study_run``) go to one worker together,
so that run happens once (``pytest_xdist_make_scheduler``).
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from freezelab.trainers.config import deep_merge

# Ray Train V2 changes into a per-run directory in the workers; tests keep cwd.
os.environ.setdefault("RAY_CHDIR_TO_TRIAL_DIR", "0")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")

# Ray finds "its" cluster through the address file in its temporary folder
# (ray_current_cluster): a bare ray.init() reads it, and so does Ray Train's
# placement-group cleaner, which several Rays behind one file confuse. So each xdist
# worker gets a folder of its own, set before any Ray starts; the subprocesses that
# tests start inherit it. (Short: Ray's unix socket paths under it must stay within 107
# characters.) Once per worker: the test modules that import ``tests.conftest`` run this
# module a second time.
_WORKER = os.environ.get("PYTEST_XDIST_WORKER")
if _WORKER and "FREEZELAB_TESTS_RAY_TMPDIR" not in os.environ:
    os.environ["RAY_TMPDIR"] = os.environ["FREEZELAB_TESTS_RAY_TMPDIR"] = tempfile.mkdtemp(
        prefix=f"ray-{_WORKER}-", dir=os.environ.get("RAY_TMPDIR", "/tmp")
    )

# The session fixtures that hold one shared run: the tests that read one go to one worker.
SHARED_RUNS = ("demo_run", "small_study_run")

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


@pytest.hookimpl(tryfirst=True)  # before xdist reads the marks (it tags the test ids)
def pytest_collection_modifyitems(items):
    for item in items:
        for name in SHARED_RUNS:
            if name in item.fixturenames:
                item.add_marker(pytest.mark.xdist_group(name))


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """``--dist loadgroup`` as this suite means it: a test in an ``xdist_group`` goes with
    its group, any other test with its file (as ``--dist loadfile``)."""
    if config.getvalue("dist") != "loadgroup":
        return None
    from xdist.scheduler import LoadGroupScheduling

    class FileOrGroupScheduling(LoadGroupScheduling):
        def _split_scope(self, nodeid: str) -> str:
            group = super()._split_scope(nodeid)
            return nodeid.split("::", 1)[0] if group == nodeid else group

    return FileOrGroupScheduling(config, log)


def pytest_configure(config):
    """Before the workers start: Ray's token. A new local Ray writes one to
    ``~/.ray/auth_token`` when there is none (a fresh machine, as in CI); two workers
    starting their Rays at once would each write their own, and a Ray could then
    start with the other's. The controller writes it once, first."""
    if _WORKER or not getattr(config.option, "numprocesses", None):
        return
    if not (Path.home() / ".ray" / "auth_token").exists():
        made = subprocess.run(
            [sys.executable, "-m", "ray.scripts.scripts", "get-auth-token", "--generate"],
            capture_output=True,
            text=True,
        )
        if made.returncode != 0:
            raise pytest.UsageError(f"could not write Ray's token: {made.stderr[-2000:]}")


def pytest_unconfigure(config):
    folder = os.environ.get("FREEZELAB_TESTS_RAY_TMPDIR")
    if _WORKER and folder:  # the worker's Ray has stopped: its session folders (logs) go
        shutil.rmtree(folder, ignore_errors=True)


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
