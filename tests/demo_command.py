"""`freezelab demo` as a user runs it, in a subprocess with a Ray of its own: run once per
session (the ``demo_run`` fixture) for the tests that read it, ``tests/test_demo.py``
and the README's demo command in ``tests/docs``.

Only the sizes are shrunk: the default study's Ray Train pretraining on 2 workers, its
six policies on both target variants, each choosing its learning rate, MLflow, the
report and the registry stay as they are.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

SIZES = [
    "base.model.name=test_resnet",
    "base.batch_size=32",
    "pretrain.epochs=1",
    # lp_ft probes for 3 epochs: the fine-tuning runs need 4
    "finetune.epochs=4",
    # one seed of the three
    "seeds=[0]",
    # two learning rates to choose from (the demo has three), compared after 2 epochs
    "select.grid={optimizer.lr: [0.01, 0.05]}",
]


@dataclass(frozen=True)
class DemoRun:
    command: list[str]
    returncode: int
    out: str  # stdout
    err: str  # stderr
    folder: Path  # its working directory: mlflow.db, freezelab_runs, freezelab_reports
    ray_used_its_folder: bool  # Ray's session folder was under the RAY_TMPDIR it was given
    ray_left: list[int]  # its Ray's processes still running 10 s after it exited


def _ray_processes(ray_tmp: str) -> list[int]:
    """The processes whose command line names ``ray_tmp`` (raylet, GCS, workers...)."""
    found = subprocess.run(["pgrep", "-f", ray_tmp], capture_output=True, text=True)
    return [int(pid) for pid in found.stdout.split()]


def run_demo_command(folder: Path, timeout: float = 600) -> DemoRun:
    """``python -m freezelab demo --set SIZE ...`` in ``folder``; the processes of its Ray
    that outlive it are counted, then killed."""
    # Its own Ray temporary folder (short: Ray's unix socket paths must stay short), so
    # the check sees this command's Ray alone; no RAY_ADDRESS: a Ray of its own.
    ray_tmp = tempfile.mkdtemp(prefix="ray", dir="/tmp")
    env = {**os.environ, "RAY_TMPDIR": ray_tmp}
    env.pop("RAY_ADDRESS", None)
    env.pop("MLFLOW_TRACKING_URI", None)  # its own ./mlflow.db, as in a test's folder
    command = [sys.executable, "-m", "freezelab", "demo"]
    for size in SIZES:
        command += ["--set", size]
    driver = subprocess.Popen(
        command,
        cwd=folder,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        try:
            out, err = driver.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(driver.pid, signal.SIGKILL)
            out, err = driver.communicate()
            err += f"\nfreezelab demo ran past {timeout:.0f} s"
        used = bool(list(Path(ray_tmp).rglob("session_*")))
        deadline = time.monotonic() + 10
        while _ray_processes(ray_tmp) and time.monotonic() < deadline:
            time.sleep(0.5)
        left = _ray_processes(ray_tmp)
    finally:
        for pid in _ray_processes(ray_tmp):  # only this command's Ray
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        shutil.rmtree(ray_tmp, ignore_errors=True)
    return DemoRun(command, driver.returncode, out, err, folder, used, left)
