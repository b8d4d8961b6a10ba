"""Where runs are tracked, and what a run's params and tags are.

The tracking URI is always explicit: the config's ``mlflow.tracking_uri``, else
``MLFLOW_TRACKING_URI``, else ``sqlite:///mlflow.db`` in the working directory.

>>> flatten_params({"policy": {"type": "last_n", "n": 3}, "epochs": 5})
{'policy.type': 'last_n', 'policy.n': '3', 'epochs': '5'}
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"


class TrackingUnavailable(RuntimeError):
    """The tracking server cannot be reached before training starts."""


def resolve_tracking_uri(configured: str | None) -> str:
    uri = configured or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        # A relative sqlite path means the driver's working directory: make it absolute,
        # so the Train controller (another process) writes to the same file.
        uri = "sqlite:///" + str(Path(uri.removeprefix("sqlite:///")).resolve())
    return uri


def ensure_reachable(uri: str, timeout_s: float = 10.0) -> None:
    """Raise TrackingUnavailable unless the tracking store answers."""
    if uri.startswith(("http://", "https://")):
        import urllib.error
        import urllib.request

        try:
            with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout_s) as response:
                if response.status != 200:
                    raise TrackingUnavailable(
                        f"MLflow server {uri} answered {response.status} on /health"
                    )
        except (urllib.error.URLError, OSError) as err:
            raise TrackingUnavailable(
                f"MLflow tracking server {uri} is unreachable ({err}). Start it, fix "
                "mlflow.tracking_uri, or set mlflow.required: false to train without tracking."
            ) from None
        return
    import mlflow

    try:
        mlflow.MlflowClient(tracking_uri=uri).search_experiments(max_results=1)
    except Exception as err:  # any store error means: cannot track here
        raise TrackingUnavailable(f"MLflow tracking store {uri} is unusable: {err}") from None


def flatten_params(data: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested config to MLflow params: ``{"policy": {"n": 3}}`` -> ``{"policy.n": "3"}``."""
    flat: dict[str, str] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten_params(value, prefix=f"{name}."))
        else:
            text = str(value)
            flat[name] = text if len(text) <= 6000 else text[:5997] + "..."
    return flat


def run_tags(config: Any) -> dict[str, str]:
    """Tags that make runs searchable: policy, model, dataset, job id, commit, version."""
    from freezelab import __version__

    tags = {
        "freezelab.policy": config.policy.type,
        "freezelab.model": config.model.name,
        "freezelab.dataset": config.data.kind,
        "freezelab.version": __version__,
        "freezelab.run_name": config.name,
    }
    node_id = ray_node_id()
    if node_id:
        tags["ray.node_id"] = node_id  # where this run logs from (a sqlite file is per node)
    job_id = job_submission_id()
    if job_id:
        tags["ray.job_submission_id"] = job_id
    commit = git_commit()
    if commit:
        tags["mlflow.source.git.commit"] = commit
    tags.update(config.mlflow.tags)
    return tags


def ray_node_id() -> str | None:
    import ray

    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else None


def job_submission_id() -> str | None:
    """The id of the Ray job this driver runs as (``ray job submit``), if any: Ray's job
    supervisor passes it to the entrypoint in the job config's metadata."""
    raw = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")
    if not raw:
        return None
    try:
        return json.loads(raw).get("metadata", {}).get("job_submission_id")
    except (ValueError, AttributeError):
        return None


def git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None
