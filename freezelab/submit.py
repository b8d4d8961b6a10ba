"""Submit a train or sweep config to a Ray cluster as a Ray job.

The config is validated here first, so a bad config never reaches the cluster. The job
runs ``python -m freezelab train|sweep CONFIG`` in the uploaded working directory, the
same command that ``ray job submit`` runs in the README.

>>> job = prepare_job("examples/train_tiny.yaml", working_dir=".")
>>> job.entrypoint
'python -m freezelab train examples/train_tiny.yaml'
"""

from __future__ import annotations

import asyncio
import os
import shlex
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from freezelab.config_io import config_kind, read_mapping
from freezelab.errors import ConfigError

# The templates stay in cluster/, where the docs and the package data name them.
TEMPLATES = Path(__file__).parent / "cluster" / "templates"
RUNTIME_ENV_FILE = TEMPLATES / "runtime_env.yaml"
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


@dataclass(frozen=True)
class Job:
    """A validated job, ready to submit: what runs, and in which runtime environment."""

    kind: Literal["train", "sweep"]
    name: str
    entrypoint: str
    runtime_env: dict[str, Any]
    warnings: list[str] = field(default_factory=list)

    def submission_id(self) -> str:
        return f"freezelab-{self.kind}-{self.name}-{uuid.uuid4().hex[:8]}"


def shipped_runtime_env() -> dict[str, Any]:
    """The runtime environment of ``runtime_env.yaml`` (its excludes)."""
    return yaml.safe_load(RUNTIME_ENV_FILE.read_text())


def prepare_job(
    config_path: str | Path,
    *,
    working_dir: str | Path | None,
    overrides: list[str] | None = None,
    env_vars: dict[str, str] | None = None,
    pip: list[str] | None = None,
    python: str = "python",
) -> Job:
    """Validate the config as the cluster will read it and build the job around it.

    With a ``working_dir`` the config must lie inside it (it is uploaded with it, and
    the entrypoint names it relative to it). Without one, the cluster's image must hold
    freezelab, and the config path must exist on the cluster as given.
    """
    overrides = list(overrides or [])
    kind = config_kind(config_path)
    config_path = Path(config_path)
    if working_dir is not None:
        root = Path(working_dir).resolve()
        if not root.is_dir():
            raise ConfigError(f"--working-dir {str(working_dir)!r} is not a directory")
        try:
            shown = config_path.resolve().relative_to(root).as_posix()
        except ValueError:
            raise ConfigError(
                f"{config_path} is outside the working directory {root}: the job could not "
                "read it. Move it inside, or pass --working-dir a folder that holds it."
            ) from None
        if kind == "sweep":
            _base_inside(config_path, root)
    else:
        shown = str(config_path)
    name, warnings = _validate(kind, config_path, overrides)
    if env_vars and env_vars.get("MLFLOW_TRACKING_URI"):
        # The job's variable settles the store only where the config names none.
        warnings = [w for w in warnings if not w.startswith("mlflow.tracking_uri is unset")]
    runtime_env = shipped_runtime_env()
    if working_dir is not None:
        runtime_env["working_dir"] = str(Path(working_dir).resolve())
        warnings += upload_warnings(Path(working_dir), runtime_env.get("excludes", []))
    else:
        runtime_env.pop("excludes", None)
    if pip:
        runtime_env["pip"] = list(pip)
    if env_vars:
        runtime_env["env_vars"] = dict(env_vars)
    command = [python, "-m", "freezelab", kind, shown]
    for override in overrides:
        command += ["--set", override]
    return Job(kind, name, shlex.join(command), runtime_env, warnings)


def _base_inside(sweep_path: Path, root: Path) -> None:
    base = read_mapping(sweep_path, "a sweep file").get("base")
    if isinstance(base, str):
        try:
            (sweep_path.parent / base).resolve().relative_to(root)
        except ValueError:
            raise ConfigError(
                f"{sweep_path}: base config {base!r} is outside the working directory {root}"
            ) from None


def _validate(kind: str, path: Path, overrides: list[str]) -> tuple[str, list[str]]:
    """Everything that can be checked without the cluster. Paths that the cluster will
    resolve in the job's own working directory come back as warnings, and so does data
    that only the cluster has (the policy is then checked on a stand-in class count)."""
    from freezelab.trainers.config import apply_override, load_config
    from freezelab.trainers.preflight import check_run

    raw = read_mapping(path)
    if kind == "sweep" and isinstance(raw.get("base"), str):
        raw["base"] = read_mapping(path.parent / raw["base"], "a train config")
    for override in overrides:
        apply_override(raw, override)
    if kind == "sweep":
        from freezelab.sweep.space import load_sweep, validate_space

        sweep = load_sweep(path, overrides)
        probe = sweep.trial_config(sweep.space.extreme_policies()[0], {}, sweep.name)
        num_classes, warnings = _class_count(probe)
        validate_space(sweep, num_classes=num_classes)
        base = raw["base"]
        for override in raw.get("overrides") or []:
            apply_override(base, override)
        return sweep.name, warnings + _cluster_relative_paths(base)
    config = load_config(path, overrides=overrides)
    num_classes, warnings = _class_count(config)
    weights = config.model.weights
    weights_here = (
        not weights or Path(weights).exists() or weights.startswith(("models:/", "runs:/"))
    )
    if not weights_here:
        warnings.append(
            f"model.weights {weights!r} is not on this machine: it is read on the cluster only"
        )
    check_run(config, num_classes=num_classes, check_weights=weights_here, storage=False)
    return config.name, warnings + _storage_here(config) + _cluster_relative_paths(raw)


def _storage_here(config: Any) -> list[str]:
    """A local storage_path is checked as for a run here; object storage that this
    machine cannot open (the credentials may be the cluster's only) is a warning, and
    the job checks it again before it starts."""
    from freezelab import objectstore
    from freezelab.trainers.preflight import check_storage

    if not objectstore.is_uri(config.storage_path):
        check_storage(config.storage_path)
        return []
    try:
        objectstore.require_writable(config.storage_path, "storage_path")
    except objectstore.StorageError as err:
        return [f"{err} from this machine: the job checks it again on the cluster"]
    return []


def _class_count(config: Any) -> tuple[int | None, list[str]]:
    """None (read the data) when the data is here; else a stand-in and a warning."""
    from freezelab.trainers.data import DataError, num_classes_of

    try:
        num_classes_of(config.data)
    except DataError as err:
        return 2, [f"{err}: here, so it is read on the cluster only; the policy was checked."]
    return None, []


def _cluster_relative_paths(config: dict[str, Any]) -> list[str]:
    """Warnings for paths the job resolves inside its own, temporary, working directory."""
    warnings = []
    storage = str(config.get("storage_path", "freezelab_runs"))
    if "://" not in storage and not storage.startswith(("/", "~")):
        warnings.append(
            f"storage_path {storage!r} is relative: on the cluster it resolves inside the "
            "job's temporary working directory. Set it to shared storage (s3://, gs://, "
            "or a path mounted on every node)."
        )
    mlflow = config.get("mlflow") or {}
    uri = mlflow.get("tracking_uri")
    if mlflow.get("enabled", True) and (uri is None or uri.startswith("sqlite:///")):
        if uri is None or not uri.startswith("sqlite:////"):
            warnings.append(
                f"mlflow.tracking_uri {uri or 'is unset, so sqlite:///mlflow.db'!s}: the "
                "sqlite file lands in the job's temporary working directory unless the job's "
                "MLFLOW_TRACKING_URI says otherwise. Use a tracking server "
                "(mlflow.tracking_uri: http://HOST:5000) or an absolute sqlite path."
            )
    weights = (config.get("model") or {}).get("weights")
    if weights and ":/" not in weights and not weights.startswith("/"):
        warnings.append(f"model.weights {weights!r} is relative: it is read on the cluster.")
    root = (config.get("data") or {}).get("root")
    if root and "://" not in root and not root.startswith("/"):
        warnings.append(f"data.root {root!r} is relative: it is read on the cluster.")
    return warnings


def submit_job(job: Job, address: str) -> str:
    """Submit ``job`` to the Ray job server at ``address``; return the submission id."""
    client = _client(address)
    submission_id = job.submission_id()
    try:
        return client.submit_job(
            entrypoint=job.entrypoint,
            runtime_env=job.runtime_env,
            submission_id=submission_id,
            metadata={"freezelab.kind": job.kind, "freezelab.name": job.name},
        )
    except Exception as err:
        raise _explained(err, address) from None


def follow_job(address: str, submission_id: str) -> str:
    """Stream the job's logs to stdout until it ends; return its final status."""
    client = _client(address)

    async def tail() -> None:
        async for lines in client.tail_job_logs(submission_id):
            print(lines, end="", flush=True)

    asyncio.run(tail())
    status = str(client.get_job_status(submission_id))
    # The log stream can close a moment before the status turns terminal.
    for _ in range(30):
        if status.split(".")[-1] in TERMINAL:
            break
        time.sleep(1.0)
        status = str(client.get_job_status(submission_id))
    return status.split(".")[-1]


def _client(address: str):
    """A JobSubmissionClient that sends the cluster's token, by Ray's own rules: a token
    given explicitly (``RAY_AUTH_TOKEN``, or the file ``RAY_AUTH_TOKEN_PATH``), or the
    default ``~/.ray/auth_token`` under ``RAY_AUTH_MODE=token``. A token that happens to
    lie in the default file is never sent to an address nobody chose it for."""
    from ray.job_submission import JobSubmissionClient

    token = auth_token()
    headers = {"Authorization": f"Bearer {token}"} if token else None
    try:
        return JobSubmissionClient(address, headers=headers)
    except Exception as err:  # Ray's AuthenticationError, connection errors: explained
        raise _explained(err, address) from err


def auth_token() -> str | None:
    if os.environ.get("RAY_AUTH_TOKEN"):
        return os.environ["RAY_AUTH_TOKEN"].strip()
    if os.environ.get("RAY_AUTH_TOKEN_PATH"):
        return Path(os.environ["RAY_AUTH_TOKEN_PATH"]).read_text().strip() or None
    default = Path.home() / ".ray" / "auth_token"
    if os.environ.get("RAY_AUTH_MODE", "").lower() == "token" and default.is_file():
        return default.read_text().strip() or None
    return None


def _explained(err: Exception, address: str) -> ConfigError:
    text = str(err) or type(err).__name__
    if type(err).__name__ == "AuthenticationError" or "authentication token" in text.lower():
        return ConfigError(
            f"the Ray cluster at {address} refused the request: {text.splitlines()[0]}\n"
            "Ray clusters check a token. Copy it from the head node (`ray get-auth-token` "
            "there, or its ~/.ray/auth_token) to ~/.ray/auth_token here, or export "
            "RAY_AUTH_TOKEN=... (or RAY_AUTH_TOKEN_PATH=FILE)."
        )
    if isinstance(err, ConnectionError) or "connect" in text.lower():
        return ConfigError(
            f"cannot reach the Ray job server at {address}: {text.splitlines()[0]}\n"
            "Pass the dashboard address, e.g. http://HEAD:8265 (or tunnel it: "
            "ssh -L 8265:localhost:8265 HEAD)."
        )
    return ConfigError(f"the Ray job server at {address} refused the job: {text}")


SECRET_PATTERNS = (".env", "*.pem", "*.key", "credentials*", ".aws", ".ssh", "*.p12", "id_rsa*")
LARGE_UPLOAD = 100 * 2**20  # Ray refuses working dirs of a few hundred MiB


def upload_warnings(root: Path, excludes: list[str]) -> list[str]:
    """What a user should know about the folder that ``submit`` uploads: secrets in it
    (left out by the excludes, but they should not be there) and its size."""
    import fnmatch
    import os

    def excluded(name: str, is_dir: bool) -> bool:
        return any(
            fnmatch.fnmatch(name + "/", pattern)
            if pattern.endswith("/")
            else fnmatch.fnmatch(name, pattern)
            for pattern in excludes
            if is_dir or not pattern.endswith("/")
        )

    secrets, size = [], 0
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            if any(fnmatch.fnmatch(name, p) for p in SECRET_PATTERNS):
                secrets.append(str((Path(folder) / name).relative_to(root)))
        dirs[:] = [d for d in dirs if not excluded(d, True)]
        for name in files:
            if not excluded(name, False):
                try:
                    size += (Path(folder) / name).stat().st_size
                except OSError:
                    pass
    warnings = []
    if secrets:
        shown = ", ".join(sorted(secrets)[:5]) + (" ..." if len(secrets) > 5 else "")
        warnings.append(
            f"the working directory holds credentials ({shown}); they are not uploaded, but "
            "keep secrets out of project folders"
        )
    if size > LARGE_UPLOAD:
        warnings.append(
            f"the upload is {size / 2**20:.0f} MiB: move data and weights to storage the "
            "cluster reads, or pass --working-dir a smaller folder"
        )
    return warnings


def print_warnings(job: Job) -> None:
    for warning in job.warnings:
        print(f"freezelab submit: warning: {warning}", file=sys.stderr)
