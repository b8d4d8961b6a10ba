"""A run's model in MLflow: logged from its checkpoint, found again, registered.

The model is logged once per (run, epoch) as a LoggedModel in freezelab's model format
(``trainers/model_file.py``); finishing a run again finds it instead of logging a copy.
The registry is always the tracking store's own.

>>> uri = log_checkpoint_model(tracking_uri, run_id, config, checkpoint, step=7)  # doctest: +SKIP
>>> register(tracking_uri, uri, "transfer-study-best", "champion")  # doctest: +SKIP
'1'
"""

from __future__ import annotations

import contextlib
import logging
import re
from pathlib import Path
from typing import Any

from freezelab.errors import FreezelabError
from freezelab.mlflow.tracking import tracking_uri_set
from freezelab.trainers.models import build_for_config

log = logging.getLogger(__name__)


class ActiveRunError(FreezelabError, RuntimeError):
    """Another MLflow run is active in this process, which MLflow would give the model to."""


def log_checkpoint_model(
    tracking_uri: str, run_id: str, config: Any, checkpoint_dir: str, step: int = 0
) -> str:
    """Log the checkpoint's model as an MLflow model (a LoggedModel) with a signature
    and an input example, in freezelab's model format (``trainers/model_file.py``):
    ``mlflow.pytorch.load_model`` returns the ``nn.Module``, the weights are stored once,
    and no reader runs code from the file.

    ``step`` is the checkpoint's epoch, the run's output step of the model. The model's
    metrics are the run's up to that epoch (``link_final_metrics``): a finished run's
    final ones, so the Models tab shows the handed-over model's val_acc, not epoch 0's.
    Refused while another MLflow run is active in this process (``ActiveRunError``),
    before anything is logged."""
    import mlflow
    import numpy as np
    import timm
    import torch

    from freezelab import __version__
    from freezelab.trainers import checkpoint as ckpt
    from freezelab.trainers import model_file
    from freezelab.trainers.data import input_size_of, num_classes_of
    from freezelab.trainers.head_init import labels_from

    active = mlflow.active_run()
    if active is not None:
        # MLflow would give the model to the active run: its output, its metrics.
        raise ActiveRunError(
            f"an MLflow run ({active.info.run_id}) is active in this process: freezelab "
            f"logs run {run_id}'s model itself; call it outside `mlflow.start_run()`"
        )
    model = build_for_config(config, with_weights=False)
    ckpt.load_model_weights(checkpoint_dir, model)
    head = config.model.head.model_dump() if config.model.head else None
    spec = model_file.spec_of(
        config.model.name,
        num_classes_of(config.data),
        head=head,
        head_norm=config.model.head_norm,
        in_chans=config.model.in_chans,
        image_size=config.data.input_size,
        # The labels the checkpoint records travel with the model (chained fine-tuning).
        labels=labels_from(ckpt.safetensors_metadata(Path(checkpoint_dir) / ckpt.MODEL_FILE)),
    )
    model_file.attach_spec(model.eval(), spec)
    example = np.zeros((2, *input_size_of(config.data, model)), dtype=np.float32)
    with torch.no_grad():
        output = model(torch.from_numpy(example)).numpy()
    signature = mlflow.models.infer_signature(example, output)
    client = mlflow.MlflowClient(tracking_uri=tracking_uri)
    run = client.get_run(run_id)
    # Named as its run, so the Models tab tells the policies apart.
    name = re.sub(r"[/:.%\"']", "_", config.mlflow.run_name or config.name)
    # MLflow warns against pickled models: this one's pickle loads nothing but tensors
    # and freezelab's rebuild (model_file.py), so the warning would mislead at every run.
    # The model is created for the run, then filled outside any active run: a model
    # logged inside one gets that run's metrics of ``step``, which early/* (logged at
    # global steps) can share with another meaning.
    with tracking_uri_set(tracking_uri), _quiet("mlflow.pytorch"):
        created = mlflow.initialize_logged_model(
            name=name,
            source_run_id=run_id,
            tags={"freezelab.policy": config.policy.label(), "freezelab.epoch": str(step)},
            params=run.data.params,
            experiment_id=run.info.experiment_id,
        )
        info = mlflow.pytorch.log_model(
            model,
            name=name,
            model_id=created.model_id,
            signature=signature,
            input_example=example,
            serialization_format="pickle",
            pickle_module=model_file,
            pip_requirements=[
                f"torch=={torch.__version__.split('+')[0]}",
                f"timm=={timm.__version__}",
                f"freezelab=={__version__}",
            ],
        )
    link_final_metrics(client, run_id, created.model_id, step, global_step_of(checkpoint_dir))
    return info.model_uri


def global_step_of(checkpoint_dir: str) -> int | None:
    """The optimizer steps the checkpoint had taken (its ``state.json``), if it says."""
    from freezelab.trainers import checkpoint as ckpt

    try:
        return int(ckpt.read_state(checkpoint_dir)["step"])
    except (OSError, KeyError, TypeError, ValueError):
        return None


def link_final_metrics(
    client: Any, run_id: str, model_id: str, step: int, global_step: int | None = None
) -> None:
    """Make the model the run's output at epoch ``step`` and give it the run's metrics
    of its weights: each metric's last point up to ``step``, as the run page shows a
    finished run's. ``early/*`` count global optimizer steps: theirs up to
    ``global_step``. Up to, not the last: a trial stopped past its last checkpoint has
    epochs the model never saw. Linking again changes nothing."""
    from mlflow.entities import LoggedModelOutput, Metric

    run = client.get_run(run_id)
    outputs = run.outputs.model_outputs if run.outputs else []
    if not any(o.model_id == model_id for o in outputs):
        client.log_outputs(run_id, [LoggedModelOutput(model_id, step=step)])
    final = []
    for key in run.data.metrics:
        limit = global_step if key.startswith("early/") else step
        history = [
            m for m in client.get_metric_history(run_id, key) if limit is None or m.step <= limit
        ]
        if history:
            last = max(history, key=lambda m: (m.step, m.timestamp))
            # The point itself (its timestamp too): linked, not logged a second time.
            final.append(
                Metric(key, last.value, last.timestamp, last.step, run_id=run_id, model_id=model_id)
            )
    for start in range(0, len(final), 1000):
        client.log_batch(run_id, metrics=final[start : start + 1000])


@contextlib.contextmanager
def _quiet(logger_name: str):
    logger = logging.getLogger(logger_name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def logged_model_uri(client: Any, experiment_id: str, run_id: str, step: int) -> str | None:
    """The URI of the model this run already logged for ``step``, if any: a whole one
    (READY), not one whose logging failed or was cut off."""
    for model in ready_models(client, experiment_id, run_id):
        if model.tags.get("freezelab.epoch") == str(step):
            return model.model_uri
    return None


def ready_models(client: Any, experiment_id: str, run_id: str, **search: Any) -> list[Any]:
    """The run's logged models whose logging finished (status READY)."""
    from mlflow.entities import LoggedModelStatus

    found = client.search_logged_models(
        experiment_ids=[experiment_id], filter_string=f"source_run_id = '{run_id}'", **search
    )
    return [m for m in found if m.status == LoggedModelStatus.READY]


def registry_client(uri: str) -> Any:
    """A client whose model registry is the tracking store's: without ``registry_uri``,
    MLflow takes the registry of the first tracking URI the process used."""
    import mlflow

    return mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)


def is_registered(client: Any, name: str, model_uri: str) -> bool:
    """Whether ``model_uri`` already is a version of registered model ``name``."""
    from mlflow.exceptions import MlflowException

    try:
        versions = registry_client(client.tracking_uri).search_model_versions(f"name = '{name}'")
    except MlflowException:
        return False
    model_id = model_uri.removeprefix("models:/")
    return any(v.source == model_uri or getattr(v, "model_id", None) == model_id for v in versions)


def register(tracking_uri: str, model_uri: str, name: str, alias: str) -> str:
    import mlflow

    with tracking_uri_set(tracking_uri):
        version = mlflow.register_model(model_uri, name)
    registry_client(tracking_uri).set_registered_model_alias(name, alias, version.version)
    log.info(f"MLflow: registered {name} version {version.version} as @{alias}")
    return version.version
