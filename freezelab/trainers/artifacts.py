"""Reading what freezelab logged to MLflow, from anywhere (a worker, the driver).

A tiny module that imports no trainer (only the checkpoint format) and none of freezelab's tracking code, so the
model builder can seed a run from ``models:/NAME@ALIAS`` or ``runs:/RUN_ID/model``
(chained fine-tuning) without the trainers depending on the MLflow layer above them.

The tracking URI is always explicit: the config's ``mlflow.tracking_uri``, else
``MLFLOW_TRACKING_URI``, else ``sqlite:///mlflow.db`` in the working directory.

>>> resolve_tracking_uri("http://mlflow:5000")
'http://mlflow:5000'
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from freezelab.env import resolve_result_path
from freezelab.errors import ConfigError
from freezelab.redact import strip_credentials
from freezelab.trainers.checkpoint import LOGGED_MODEL_FILE, LOGGED_MODEL_REBUILD, MODEL_FILE

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
MODEL_URI_SCHEMES = ("models:/", "runs:/")


def resolve_tracking_uri(configured: str | None) -> str:
    uri = configured or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        # A relative sqlite path means the driver's working directory (FREEZELAB_HOME
        # inside a Ray job): made absolute, so the Train controller (another process)
        # writes to the same file.
        uri = "sqlite:///" + resolve_result_path(uri.removeprefix("sqlite:///"))
    if strip_credentials(uri)[1] is not None:
        # MLflow prints run and model links with the URI as given (at every run's end):
        # with a password in it, this process prints none.
        os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"
        os.environ["MLFLOW_PRINT_MODEL_URLS_ON_CREATION"] = "false"
    return uri


def is_model_uri(weights: str | None) -> bool:
    return bool(weights) and weights.startswith(MODEL_URI_SCHEMES)


def download_weights(
    model_uri: str, tracking_uri: str | None = None, dst_path: str | Path | None = None
) -> str:
    """A local weights file for ``models:/NAME@ALIAS`` or ``runs:/RUN_ID/...``: the
    model file freezelab logged (read later with ``weights_only=True``, see
    ``model_file``), or the safetensors file that older versions logged beside it."""
    import mlflow

    uri = resolve_tracking_uri(tracking_uri)
    try:
        with tracking_uri_set(uri):
            local = Path(
                mlflow.artifacts.download_artifacts(
                    artifact_uri=model_uri, dst_path=None if dst_path is None else str(dst_path)
                )
            )
    except Exception as err:  # MlflowException, OSError: the URI names nothing here
        raise ConfigError(
            f"model.weights {model_uri!r}: cannot download it from {uri}: {err}"
        ) from None
    if not local.is_dir():
        return str(local)
    for pattern in (f"data/{LOGGED_MODEL_FILE}", f"**/{MODEL_FILE}"):
        found = sorted(local.glob(pattern))
        if found and (local / "MLmodel").is_file() and _pickled_by_freezelab(local, found[0]):
            return str(found[0])
    raise ConfigError(
        f"model.weights {model_uri!r} is not a model that freezelab logged: only those can "
        "seed a run"
    )


def _pickled_by_freezelab(model_dir: Path, weights: Path) -> bool:
    """Whether ``weights`` is freezelab's: a safetensors file, or a model file whose
    recorded pickle module is freezelab's (never a pickle that would run other code)."""
    if weights.suffix == ".safetensors":
        return True
    info = model_dir / "data" / "pickle_module_info.txt"
    module = LOGGED_MODEL_REBUILD.rsplit(".", 1)[0]
    return info.is_file() and info.read_text().strip() == module


@contextlib.contextmanager
def tracking_uri_set(uri: str):
    """MLflow's fluent API for one call. ``mlflow.set_tracking_uri`` also writes the
    MLFLOW_TRACKING_URI environment variable, which would leak into every later run
    of this process: the previous value is restored."""
    import mlflow
    from mlflow.tracking._model_registry import utils as registry

    # The model registry too: left unset, MLflow resolves it from the first tracking URI
    # it saw and keeps it, so a later run of this process would register elsewhere.
    previous_env = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
    previous = mlflow.get_tracking_uri()
    previous_registry = registry._registry_uri
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(previous)
        registry._registry_uri = previous_registry
        for key, value in previous_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
