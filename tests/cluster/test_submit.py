"""Job submission: `freezelab submit` validates before anything reaches a cluster, and
jobs sent to a real Ray head (with `ray job submit` and with `freezelab submit`) succeed
and land in MLflow."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from freezelab.config_io import config_kind
from freezelab.submit import prepare_job, shipped_runtime_env
from freezelab.trainers.config import ConfigError

REPO = Path(__file__).resolve().parents[2]


def _write_job_dir(root: Path, name: str, **update) -> Path:
    """A project folder to upload: a tiny train config, plus files the excludes drop."""
    root.mkdir(parents=True, exist_ok=True)
    config = {
        "name": name,
        "model": {"name": "test_resnet"},
        "data": {"kind": "digits", "classes": [0, 1, 2], "input_size": 32, "train_per_class": 24},
        "policy": {"type": "head_only"},
        "epochs": 1,
        "batch_size": 16,
        "scaling": {"num_workers": 1},
        "storage_path": str(root.parent / "shared" / "runs"),
        "mlflow": {"tracking_uri": f"sqlite:///{root.parent / 'shared' / 'mlflow.db'}"},
        **update,
    }
    (root / "configs").mkdir(exist_ok=True)
    (root / "configs" / "tiny.yaml").write_text(yaml.safe_dump(config))
    for junk in (".git/objects/pack.bin", "data/images.bin", "freezelab_runs/old/model.bin"):
        (root / junk).parent.mkdir(parents=True, exist_ok=True)
        (root / junk).write_bytes(b"\0" * 1024)
    (root / "mlflow.db").write_bytes(b"\0" * 1024)
    return root / "configs" / "tiny.yaml"


def _submit_env(**extra: str) -> dict[str, str]:
    """The environment of a submitting machine: no RAY_AUTH_MODE set, as on a laptop."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "MLFLOW_"))}
    env.update(extra)
    return env


def _runs_of_job(tracking_uri: str, job_id: str):
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=tracking_uri)
    experiment = client.get_experiment_by_name("freezelab")
    return client.search_runs(
        [experiment.experiment_id], f"tags.`ray.job_submission_id` = '{job_id}'"
    )


# -- before the cluster -----------------------------------------------------------------


def test_prepare_job_names_the_config_relative_to_the_upload_and_forwards_overrides(
    tmp_path: Path,
) -> None:
    config = _write_job_dir(tmp_path / "project", "job")
    job = prepare_job(
        config,
        working_dir=tmp_path / "project",
        overrides=["epochs=2", "policy={type: bitfit}"],
        env_vars={"GLOO_SOCKET_IFNAME": "eth0"},
        pip=["einops"],
    )
    assert job.kind == "train" and job.name == "job"
    assert job.entrypoint == (
        "python -m freezelab train configs/tiny.yaml --set epochs=2 --set 'policy={type: bitfit}'"
    )
    assert job.runtime_env["working_dir"] == str((tmp_path / "project").resolve())
    assert job.runtime_env["excludes"] == shipped_runtime_env()["excludes"]
    assert job.runtime_env["env_vars"] == {"GLOO_SOCKET_IFNAME": "eth0"}
    assert job.runtime_env["pip"] == ["einops"]
    assert job.warnings == []  # absolute storage and sqlite paths
    assert job.submission_id().startswith("freezelab-train-job-")


def test_a_sweep_file_becomes_a_sweep_job_and_its_base_must_be_uploaded_too(
    tmp_path: Path,
) -> None:
    sweep = REPO / "examples" / "sweep_tiny.yaml"
    assert config_kind(sweep) == "sweep"
    job = prepare_job(sweep, working_dir=REPO)
    assert job.entrypoint == "python -m freezelab sweep examples/sweep_tiny.yaml"

    (tmp_path / "sweep.yaml").write_text(
        yaml.safe_dump({**yaml.safe_load(sweep.read_text()), "base": "../train_tiny.yaml"})
    )
    with pytest.raises(ConfigError, match="base config '../train_tiny.yaml' is outside"):
        prepare_job(tmp_path / "sweep.yaml", working_dir=tmp_path)


def test_a_sweeps_base_takes_overrides_as_freezelab_sweep_does() -> None:
    sweep = REPO / "examples" / "sweep_tiny.yaml"
    job = prepare_job(sweep, working_dir=REPO, overrides=["base.storage_path=/mnt/shared/runs"])
    assert job.entrypoint.endswith("--set base.storage_path=/mnt/shared/runs")
    assert not any(w.startswith("storage_path") for w in job.warnings)


def test_the_default_token_file_is_sent_only_under_ray_auth_mode_token(
    tmp_path: Path, monkeypatch
) -> None:
    from freezelab.submit import auth_token

    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("local-secret\n")
    monkeypatch.setenv("HOME", str(tmp_path))
    for name in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(name, raising=False)
    assert auth_token() is None
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    assert auth_token() == "local-secret"
    monkeypatch.setenv("RAY_AUTH_TOKEN", "explicit")
    assert auth_token() == "explicit"


def test_paths_that_resolve_in_the_jobs_temporary_directory_are_warned_about(
    tmp_path: Path,
) -> None:
    config = _write_job_dir(tmp_path / "p", "relative")
    data = yaml.safe_load(config.read_text())
    data["storage_path"] = "runs"
    del data["mlflow"]
    config.write_text(yaml.safe_dump(data))
    warnings = prepare_job(config, working_dir=tmp_path / "p").warnings
    assert any(w.startswith("storage_path 'runs' is relative") for w in warnings)
    assert any(w.startswith("mlflow.tracking_uri is unset") for w in warnings)
    # The job's own MLFLOW_TRACKING_URI settles the tracking store.
    env = {"MLFLOW_TRACKING_URI": "http://mlflow:5000"}
    warnings = prepare_job(config, working_dir=tmp_path / "p", env_vars=env).warnings
    assert not any("tracking_uri" in w for w in warnings)


def test_data_only_the_cluster_has_is_a_warning_and_the_policy_is_still_checked(
    tmp_path: Path,
) -> None:
    config = _write_job_dir(
        tmp_path / "p", "folder", data={"kind": "image_folder", "root": "/mnt/shared/cats"}
    )
    job = prepare_job(config, working_dir=tmp_path / "p")
    assert any("'/mnt/shared/cats' does not exist" in w for w in job.warnings)
    with pytest.raises(ConfigError, match="last_n"):
        prepare_job(config, working_dir=tmp_path / "p", overrides=["policy={type: last_n, n: 99}"])


def test_a_config_outside_the_working_dir_is_refused(tmp_path: Path) -> None:
    config = _write_job_dir(tmp_path / "p", "outside")
    (tmp_path / "elsewhere").mkdir()
    with pytest.raises(ConfigError, match="outside the working directory"):
        prepare_job(config, working_dir=tmp_path / "elsewhere")


def test_a_bad_config_never_reaches_the_cluster(tmp_path: Path, freezelab_cli) -> None:
    config = _write_job_dir(tmp_path / "p", "bad", epochs=0)
    # Nothing listens on port 9: a submission attempt would fail on the connection.
    result = freezelab_cli(
        "submit",
        str(config),
        "--address",
        "http://127.0.0.1:9",
        "--working-dir",
        str(tmp_path / "p"),
        env=_submit_env(),
    )
    assert result.returncode == 2
    assert "epochs: Input should be greater than or equal to 1 (got 0)" in result.stderr
    assert "cannot reach" not in result.stderr


def test_submit_explains_an_unreachable_job_server_and_bad_arguments(
    tmp_path: Path, freezelab_cli
) -> None:
    config = _write_job_dir(tmp_path / "p", "ok")
    base = ["submit", str(config), "--working-dir", str(tmp_path / "p")]
    result = freezelab_cli(*base, "--address", "http://127.0.0.1:9", env=_submit_env())
    assert result.returncode == 2
    assert "cannot reach the Ray job server at http://127.0.0.1:9" in result.stderr
    result = freezelab_cli(*base, env=_submit_env())
    assert result.returncode == 2 and "--address is required" in result.stderr
    result = freezelab_cli(*base, "--address", "http://x:1", "--env", "NOEQUALS", env=_submit_env())
    assert result.returncode == 2 and "--env 'NOEQUALS': expected KEY=VALUE" in result.stderr


# -- against a real head ----------------------------------------------------------------


@pytest.mark.ray
def test_the_shipped_runtime_env_uploads_the_configs_and_nothing_else(head, tmp_path: Path) -> None:
    """What a job's upload holds with the shipped runtime env: the config, not the data,
    git, runs or databases beside it. (The README's `ray job submit` of a training run
    runs end to end in tests/docs.)"""
    from ray.job_submission import JobSubmissionClient

    _write_job_dir(tmp_path / "project", "upload")
    token = (Path.home() / ".ray" / "auth_token").read_text().strip()
    client = JobSubmissionClient(head.dashboard, headers={"Authorization": f"Bearer {token}"})
    listing = client.submit_job(
        entrypoint=f'{sys.executable} -c "import os, json; print(json.dumps(sorted('
        "os.path.relpath(os.path.join(d, f)) for d, _, fs in os.walk('.') for f in fs)))\"",
        runtime_env={**shipped_runtime_env(), "working_dir": str(tmp_path / "project")},
    )
    assert _wait_terminal(client, listing) == "SUCCEEDED", client.get_job_logs(listing)
    uploaded = json.loads(client.get_job_logs(listing).strip().splitlines()[-1])
    assert uploaded == ["configs/tiny.yaml"]


def _wait_terminal(client, job_id: str, timeout: float = 120) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = str(client.get_job_status(job_id)).split(".")[-1]
        if status in ("SUCCEEDED", "FAILED", "STOPPED"):
            return status
        time.sleep(0.5)
    raise TimeoutError(f"job {job_id} did not finish in {timeout:.0f} s")


def _follow(freezelab_cli, head, config: Path, *extra: str):
    """``freezelab submit CONFIG --follow`` to ``head``, uploading the config's project."""
    return freezelab_cli(
        "submit",
        str(config),
        "--address",
        head.dashboard,
        "--follow",
        "--working-dir",
        str(config.parent.parent),
        "--python",
        sys.executable,
        *extra,
        env=_submit_env(RAY_AUTH_MODE="token"),  # the head's token in ~/.ray/auth_token
        timeout=400,
    )


@pytest.mark.ray
def test_a_sweep_submitted_as_a_job_runs_its_trials_and_writes_the_best_policy(
    head, tmp_path: Path, freezelab_cli
) -> None:
    _write_job_dir(tmp_path / "project", "sweep-base")
    sweep = tmp_path / "project" / "configs" / "sweep.yaml"
    sweep.write_text(
        yaml.safe_dump(
            {
                "name": "job-sweep",
                "base": "tiny.yaml",
                "space": {"policies": [{"type": "bitfit"}]},
            }
        )
    )
    result = _follow(freezelab_cli, head, sweep)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    job_id = re.search(r"as job (\S+)", result.stdout).group(1)
    assert job_id.startswith("freezelab-sweep-job-sweep-")
    best = yaml.safe_load(
        (tmp_path / "shared" / "runs" / "job-sweep" / "best_policy.yaml").read_text()
    )
    assert best["type"] == "bitfit"
    parent = _runs_of_job(f"sqlite:///{tmp_path / 'shared' / 'mlflow.db'}", job_id)
    assert len(parent) == 1 and parent[0].data.tags["freezelab.kind"] == "sweep"


@pytest.mark.ray
def test_freezelab_submit_exits_with_the_status_of_a_failed_job(
    head, tmp_path: Path, freezelab_cli
) -> None:
    # Data that passes every up-front check (two class folders of .png files) but
    # cannot be decoded: the worker fails during the first epoch.
    images = tmp_path / "shared" / "broken"
    for label in ("a", "b"):
        (images / label).mkdir(parents=True)
        for index in range(4):
            (images / label / f"{index}.png").write_bytes(b"not a png")
    data = {"kind": "image_folder", "root": str(images), "input_size": 32, "val_fraction": 0.5}
    config = _write_job_dir(tmp_path / "project", "fails", data=data)
    result = _follow(freezelab_cli, head, config)
    assert result.returncode == 1, result.stdout[-3000:] + result.stderr[-3000:]
    assert "cannot identify image file" in result.stdout + result.stderr
    assert re.search(r"job freezelab-train-fails-\w+: FAILED$", result.stdout.rstrip())


@pytest.mark.ray
def test_a_wrong_token_is_refused_with_how_to_get_the_right_one(
    head, tmp_path: Path, freezelab_cli
) -> None:
    config = _write_job_dir(tmp_path / "project", "intruder")
    result = freezelab_cli(
        "submit",
        str(config),
        "--address",
        head.dashboard,
        "--working-dir",
        str(tmp_path / "project"),
        env=_submit_env(RAY_AUTH_TOKEN="not-the-token"),
    )
    assert result.returncode == 2
    assert f"the Ray cluster at {head.dashboard} refused the request" in result.stderr
    assert "ray get-auth-token" in result.stderr
    assert "submitted" not in result.stdout


@pytest.mark.ray
@pytest.mark.timeout(1200)  # two jobs, 400 s each
def test_two_jobs_of_one_upload_keep_their_own_results_at_freezelab_home(
    head, tmp_path: Path
) -> None:
    """Ray reuses the package of an identical upload: relative results there would be
    shared by the jobs and lost with the package. Inside a job they go to FREEZELAB_HOME,
    and a name template gives each config its own run."""
    from ray.job_submission import JobSubmissionClient

    project = tmp_path / "project"
    config_path = _write_job_dir(project, "twin-{hash}")
    config = yaml.safe_load(config_path.read_text())
    del config["storage_path"], config["mlflow"]  # the defaults: relative paths
    config_path.write_text(yaml.safe_dump(config))
    home = tmp_path / "home"
    token = (Path.home() / ".ray" / "auth_token").read_text().strip()
    client = JobSubmissionClient(head.dashboard, headers={"Authorization": f"Bearer {token}"})
    jobs = {}
    for epochs in (1, 2):
        jobs[epochs] = client.submit_job(
            entrypoint=f"{sys.executable} -m freezelab train configs/tiny.yaml --set epochs={epochs}",
            runtime_env={
                **shipped_runtime_env(),
                "working_dir": str(project),
                "env_vars": {"FREEZELAB_HOME": str(home)},
            },
        )
        status = _wait_terminal(client, jobs[epochs], timeout=400)
        logs = client.get_job_logs(jobs[epochs])
        assert status == "SUCCEEDED", logs[-3000:]
        assert f"runs in {home / 'freezelab_runs'}" in logs
        assert f"checkpoint: {home / 'freezelab_runs'}" in logs and "MLflow run: " in logs

    runs = {
        epochs: _runs_of_job(f"sqlite:///{home / 'mlflow.db'}", job_id)
        for epochs, job_id in jobs.items()
    }
    assert all(len(found) == 1 and found[0].info.status == "FINISHED" for found in runs.values())
    assert runs[1][0].info.run_id != runs[2][0].info.run_id
    assert runs[1][0].data.metrics["run/epoch"] == 0 and runs[2][0].data.metrics["run/epoch"] == 1
    directories = sorted((home / "freezelab_runs").glob("twin-*"))
    assert len(directories) == 2 and all(
        list(d.glob("checkpoint_*/state.json")) for d in directories
    )
    assert len(list((home / "mlruns" / "freezelab").glob("*/artifacts/config.yaml"))) == 2
    # Nothing landed in Ray's copy of the upload.
    from ray._common.utils import get_default_ray_temp_dir

    packages = list(
        Path(get_default_ray_temp_dir()).glob("session_*/runtime_resources/working_dir_files/*")
    )
    leftovers = [
        p for pkg in packages for p in pkg.rglob("*") if p.name in ("mlflow.db", "freezelab_runs")
    ]
    assert leftovers == []


@pytest.mark.ray
def test_train_without_an_address_never_joins_the_head_that_ray_start_left(head) -> None:
    """While the head runs, Ray's address file points at it: a bare ``ray.init()`` would
    join it. freezelab starts a Ray of its own unless told an address."""
    from ray_nodes import _address_file_kept

    code = (
        "import ray; from freezelab.trainers.launch import init_ray; init_ray(); "
        "print(ray.get_runtime_context().gcs_address); ray.shutdown()"
    )
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    addresses = {}
    for label, extra in (
        ("own", {}),
        ("joined", {"RAY_ADDRESS": head.gcs, "RAY_AUTH_MODE": "token"}),
    ):
        with _address_file_kept():
            result = subprocess.run(
                [sys.executable, "-c", code],
                capture_output=True,
                text=True,
                env={**env, **extra},
                timeout=180,
            )
        assert result.returncode == 0, result.stderr[-3000:]
        addresses[label] = result.stdout.strip().splitlines()[-1]
    assert addresses["joined"] == head.gcs
    assert addresses["own"] != head.gcs


def test_submit_warns_of_credentials_and_a_large_upload(tmp_path: Path) -> None:
    from freezelab.submit import upload_warnings

    (tmp_path / ".env").write_text("AWS_SECRET_ACCESS_KEY=x\n")
    (tmp_path / "keys").mkdir()
    (tmp_path / "keys" / "deploy.pem").write_text("-----BEGIN-----\n")
    (tmp_path / ".git").mkdir()
    (tmp_path / ".git" / "pack").write_bytes(b"\0" * (150 << 20))  # excluded: not counted
    excludes = shipped_runtime_env()["excludes"]
    warnings = upload_warnings(tmp_path, excludes)
    assert len(warnings) == 1 and ".env" in warnings[0] and "keys/deploy.pem" in warnings[0]
    (tmp_path / "weights.bin").write_bytes(b"\0" * (120 << 20))
    assert any("the upload is 120 MiB" in w for w in upload_warnings(tmp_path, excludes))
    assert {".env", "*.pem", "*.key", ".ssh/", ".aws/"} <= set(excludes)
