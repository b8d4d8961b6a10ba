"""`freezelab demo` on its default path, as a user runs it: a Ray of its own, the
pretraining on 2 Ray Train workers, the study's fine-tuning runs as Ray Tune trials, the
tables, and that Ray stopped again when the command ends. Only the sizes are shrunk."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

# Sizes only: the default study's Ray Train pretraining (base.scaling.num_workers: 2),
# MLflow, report and registry stay as they are.
SMALLER = [
    "base.model.name=test_resnet",
    "base.batch_size=32",
    "pretrain.epochs=1",
    "finetune.epochs=1",
    # each policy at one rate: the selection stage has tests of its own (and the README's
    # demo command runs it, in tests/docs)
    "select=null",
    "seeds=[0]",
    "policies=[{type: full}, {type: head_only}]",
    "variants={}",
]


def _ray_processes(ray_tmp: str) -> list[int]:
    """The processes whose command line names ``ray_tmp`` (raylet, GCS, workers...)."""
    found = subprocess.run(["pgrep", "-f", ray_tmp], capture_output=True, text=True)
    return [int(pid) for pid in found.stdout.split()]


@pytest.mark.ray  # the command starts a Ray of its own (in a subprocess)
def test_demo_pretrains_on_two_workers_runs_the_study_as_trials_and_stops_its_ray(tmp_path):
    # Its own Ray temporary folder (short: Ray's unix socket paths must stay short), so
    # the check below sees this command's Ray alone; no RAY_ADDRESS: a Ray of its own.
    ray_tmp = tempfile.mkdtemp(prefix="ray", dir="/tmp")
    env = {**os.environ, "RAY_TMPDIR": ray_tmp}
    env.pop("RAY_ADDRESS", None)
    command = [sys.executable, "-m", "freezelab", "demo"]
    for override in SMALLER:
        command += ["--set", override]
    driver = subprocess.Popen(
        command,
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        try:
            out, _ = driver.communicate(timeout=300)
        except subprocess.TimeoutExpired:
            os.killpg(driver.pid, signal.SIGKILL)
            out, _ = driver.communicate()
            pytest.fail(f"freezelab demo ran past 300 s:\n{out[-3000:]}")
        assert driver.returncode == 0, out[-3000:]
        # The pretraining on Ray Train: each of its 2 workers reports the group it is in.
        assert "2 workers on 1 node(s)" in out, out[-3000:]
        # The fine-tuning runs as Tune trials, counted as they finish, then the tables.
        assert "trials finished: 2/2" in out, out[-3000:]
        assert "fine-tuning on the target task" in out, out[-3000:]
        assert "each setting over its seeds" in out, out[-3000:]
        # Ray ran from this folder, and none of its processes outlived the command.
        assert list(Path(ray_tmp).rglob("session_*")), "Ray did not use RAY_TMPDIR"
        deadline = time.monotonic() + 10
        while _ray_processes(ray_tmp) and time.monotonic() < deadline:
            time.sleep(0.5)
        left = _ray_processes(ray_tmp)
        assert not left, f"Ray processes left after freezelab demo: {left}"
    finally:
        for pid in _ray_processes(ray_tmp):  # only this command's Ray, after a failure
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        shutil.rmtree(ray_tmp, ignore_errors=True)
