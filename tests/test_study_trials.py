"""The study's fine-tuning runs as Ray Tune trials: several at once with the same results
as one at a time, a study killed mid-way that continues where it stopped, and the bad
input refused before Ray, MLflow or a file."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import mlflow
import pytest
import yaml
from small_study import SMALL_STUDY

from freezelab.errors import ConfigError
from freezelab.study import DEFAULT_STUDY, run_study
from freezelab.study_trials import ROW_FILE
from freezelab.trainers.config import apply_override

# Four fine-tuning runs: two policies x two seeds, one target.
FOUR_RUNS = [
    *SMALL_STUDY,
    "variants={}",
    "seeds=[0, 1]",
    "register_best_as=null",
]


def _study_runs(uri: str) -> tuple[list, list]:
    """The study parents and the fine-tuning runs in the store at ``uri``."""
    client = mlflow.MlflowClient(uri)
    experiment = client.get_experiment_by_name("freezelab").experiment_id
    runs = client.search_runs([experiment], max_results=1000)
    parents = [r for r in runs if r.data.tags.get("freezelab.stage") == "study"]
    finetunes = [r for r in runs if r.data.tags.get("freezelab.stage") == "finetune"]
    return parents, finetunes


@pytest.mark.ray
def test_runs_side_by_side_give_the_results_of_runs_one_at_a_time(
    small_study_run, tmp_path, capsys
):
    # Side by side: the shared run of SMALL_STUDY (conftest.py), up to 2 at once on the
    # session's 2 CPUs. One at a time: the same study again, here.
    one_at_a_time = run_study(
        None, overrides=[*SMALL_STUDY, "register_best_as=null", "max_concurrent=1"]
    )
    runs = {
        1: (one_at_a_time, capsys.readouterr().out, tmp_path),
        2: (small_study_run.outcome, small_study_run.out, small_study_run.folder),
    }
    for concurrent, (outcome, out, folder) in runs.items():
        assert f"up to {concurrent} at once, each trial {{'CPU': 1.0}}" in out
        assert "trials finished: 4/4" in out
        # MLflow: one parent, and one child per fine-tuning run under it
        parents, finetunes = _study_runs(f"sqlite:///{folder}/mlflow.db")
        assert [p.info.run_id for p in parents] == [outcome.parent_run_id]
        assert sorted(r.info.run_id for r in finetunes) == sorted(r["run_id"] for r in outcome.rows)
        assert {r.data.tags["mlflow.parentRunId"] for r in finetunes} == {outcome.parent_run_id}
        assert parents[0].info.status == "FINISHED"
    one, two = runs[1][0], runs[2][0]
    assert len(one.rows) == len(two.rows) == 4 and not one.failed and not two.failed
    for a, b in zip(one.rows, two.rows, strict=True):
        assert (a["run_name"], a["seed"]) == (b["run_name"], b["seed"])
        # The same seed, data order and torch threads (a CPU per run, whatever the cap):
        # the same model, whichever runs beside it.
        for measure in ("val_acc", "best_val_acc", "evaluations", "backbone_drift", "forgetting"):
            assert a[measure] == b[measure], (a["run_name"], measure)


def _study_file(tmp_path: Path, *overrides: str) -> Path:
    data = json.loads(json.dumps(DEFAULT_STUDY))
    for override in [*FOUR_RUNS, *overrides]:
        apply_override(data, override)
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _finished_rows(storage: Path) -> list[Path]:
    return sorted(storage.glob(f"*/{ROW_FILE}"))


@pytest.mark.ray
def test_a_killed_study_continues_where_it_stopped(tmp_path):
    # One run at a time, each long enough to kill the driver between two of them.
    study = _study_file(tmp_path, "max_concurrent=1", "finetune.epochs=3")
    storage = tmp_path / "freezelab_runs"
    # The driver starts a Ray of its own, in a temporary folder of its own: its address
    # file never points the tests' shared Ray session elsewhere.
    ray_tmp = tempfile.mkdtemp(prefix="ray", dir="/tmp")
    env = {**os.environ, "RAY_TMPDIR": ray_tmp}
    env.pop("RAY_ADDRESS", None)
    command = [sys.executable, "-m", "freezelab", "demo", "--config", str(study)]
    with open(tmp_path / "first.log", "w") as log:
        driver = subprocess.Popen(
            command, cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
        deadline = time.monotonic() + 300
        while len(_finished_rows(storage)) < 2 and driver.poll() is None:
            assert time.monotonic() < deadline, (tmp_path / "first.log").read_text()[-3000:]
            time.sleep(0.2)
        # The driver, its local Ray and every trial with it, as a lost machine would.
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait()
    finished = {p.parent.name: p.stat().st_mtime_ns for p in _finished_rows(storage)}
    assert 2 <= len(finished) < 4, (tmp_path / "first.log").read_text()[-3000:]
    checkpoints = {
        name: (storage / name / "local_checkpoints").stat().st_mtime_ns for name in finished
    }

    second = subprocess.run(
        [*command, "--resume"], cwd=tmp_path, env=env, capture_output=True, text=True,
        timeout=400,
    )  # fmt: skip
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "continuing transfer study" in second.stdout
    assert "trials finished: 4/4" in second.stdout
    # The runs that had finished are kept as they were: not trained again.
    assert len(_finished_rows(storage)) == 4
    for name, mtime in finished.items():
        assert (storage / name / ROW_FILE).stat().st_mtime_ns == mtime, name
        assert (storage / name / "local_checkpoints").stat().st_mtime_ns == checkpoints[name]
    # MLflow: one parent, continued; every run once, under it.
    parents, finetunes = _study_runs(f"sqlite:///{tmp_path}/mlflow.db")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    names = [r.info.run_name for r in finetunes]
    assert len(names) == 4 and len(set(names)) == 4, names
    assert {r.data.tags["mlflow.parentRunId"] for r in finetunes} == {parents[0].info.run_id}
    assert all(r.info.status == "FINISHED" for r in finetunes)


@pytest.mark.parametrize(
    ("overrides", "resume", "message"),
    [
        (["max_concurrent=0"], False, "max_concurrent"),
        (
            ["finetune.scaling={num_workers: 1, use_gpu: true}"],
            False,
            "each run asks for 1 worker(s) x {GPU: 1}, which no run can get",
        ),
        (
            ["finetune.scaling={num_workers: 2, resources_per_worker: {CPU: 512}}"],
            False,
            "x {CPU: 512}, which no run can get",
        ),
        ([], True, "nothing to resume: no study transfer-study-"),
    ],
    ids=["no-concurrency", "gpus-nowhere", "cpus-nowhere", "resume-of-nothing"],
)
def test_bad_study_input_is_refused_before_ray_mlflow_or_a_file(
    tmp_path, overrides, resume, message
):
    import ray

    # With a Ray up in this process (the shared session), the check reads its nodes;
    # without one, this machine's: no Ray starts for it.
    was_up = ray.is_initialized()
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")) as err:
        run_study(None, overrides=[*FOUR_RUNS, *overrides], resume=resume)
    assert "\n" not in str(err.value)
    assert ray.is_initialized() == was_up
    assert sorted(p.name for p in Path.cwd().iterdir()) == []


@pytest.mark.ray
def test_a_study_none_of_whose_runs_finished_fails_with_the_first_error(ray_session, monkeypatch):
    import freezelab.study as study_module
    from freezelab.study import StudyFailed

    def every_run_failed(study, tag, runs, parent):
        return [], [(run.name, "RuntimeError: boom") for run in runs]

    monkeypatch.setattr(study_module, "_fine_tune", every_run_failed)
    with pytest.raises(StudyFailed, match="none of its 4 fine-tuning runs finished.*boom"):
        run_study(None, overrides=FOUR_RUNS)
    assert StudyFailed.exit_code == 1
    parents, finetunes = _study_runs(f"sqlite:///{Path.cwd()}/mlflow.db")
    assert len(parents) == 1 and parents[0].info.status == "FAILED" and finetunes == []
