"""Where runs are tracked, and what a run's params and tags are.

The tracking URI is always explicit: the config's ``mlflow.tracking_uri``, else
``MLFLOW_TRACKING_URI``, else ``sqlite:///mlflow.db`` in the working directory.

>>> flatten_params({"policy": {"type": "last_n", "n": 3}, "epochs": 5})
{'policy.type': 'last_n', 'policy.n': '3', 'epochs': '5'}
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

from freezelab.env import job_submission_id
from freezelab.errors import FreezelabError
from freezelab.redact import redact_text, redact_uri, strip_credentials
from freezelab.trainers.artifacts import (  # noqa: F401  (re-exported: the MLflow layer's API)
    DEFAULT_TRACKING_URI,
    resolve_tracking_uri,
    tracking_uri_set,
)


class TrackingUnavailable(FreezelabError, RuntimeError):
    """The tracking server cannot be reached before training starts."""


def ensure_reachable(uri: str, timeout_s: float = 10.0) -> None:
    """Raise TrackingUnavailable unless the tracking store answers."""
    if uri.startswith(("http://", "https://")):
        import urllib.error
        import urllib.request

        # The probe never resolves a host with user:password@ in front of it.
        bare, _ = strip_credentials(uri)
        shown = redact_uri(uri)
        try:
            with urllib.request.urlopen(
                bare.rstrip("/") + "/health", timeout=timeout_s
            ) as response:
                if response.status != 200:
                    raise TrackingUnavailable(
                        f"MLflow server {shown} answered {response.status} on /health"
                    )
        except (urllib.error.URLError, OSError) as err:
            raise TrackingUnavailable(
                f"MLflow tracking server {shown} is unreachable ({redact_text(str(err))}). "
                "Start it, fix mlflow.tracking_uri, or set mlflow.required: false to train "
                "without tracking."
            ) from None
        return
    if uri.startswith("sqlite:///"):
        # A file that does not exist yet is created by the run itself: checking must
        # not create it (a refused run leaves no database behind).
        database = Path(uri.removeprefix("sqlite:///"))
        folder = next((p for p in (database.parent, *database.parent.parents) if p.exists()), None)
        if not database.exists():
            if folder is None or not folder.is_dir() or not os.access(folder, os.W_OK):
                raise TrackingUnavailable(
                    f"MLflow tracking store {redact_uri(uri)}: cannot create {database} here"
                )
            return
    import mlflow

    try:
        mlflow.MlflowClient(tracking_uri=uri).search_experiments(max_results=1)
    except Exception as err:  # any store error means: cannot track here
        raise TrackingUnavailable(
            f"MLflow tracking store {redact_uri(uri)} is unusable: {redact_text(str(err))}"
        ) from None


def open_store(uri: str, timeout_s: float = 5.0) -> Any:
    """A client for a store that must already hold runs (``compare``, ``report``): a
    missing sqlite file is an error, never a new empty database, and an unreachable
    server fails within seconds instead of MLflow's minutes of retries."""
    import mlflow

    from freezelab.errors import NotFound

    if uri.startswith("sqlite:///"):
        database = Path(uri.removeprefix("sqlite:///"))
        if not database.is_file():
            raise NotFound(
                f"no MLflow database at {database}: give --tracking-uri (or run from the "
                "folder where training wrote mlflow.db)"
            )
    elif uri.startswith(("http://", "https://")):
        ensure_reachable(uri, timeout_s=timeout_s)
    return mlflow.MlflowClient(tracking_uri=uri)


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


STAGE_TAG = "freezelab.stage"
PRETRAIN = "pretrain"


def run_tags(config: Any) -> dict[str, str]:
    """Tags that make runs searchable: policy, model, dataset, job id, commit, version."""
    from freezelab import __version__

    tags = {
        "freezelab.policy": config.policy.type,
        "freezelab.model": config.model.name,
        "freezelab.dataset": config.data.kind,
        "freezelab.version": __version__,
        "freezelab.run_name": config.name,
        # pretrain, finetune or trial: `compare` and `report` leave pretraining out.
        STAGE_TAG: "finetune",
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


def git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None
