"""The orchestration of one run: what ``freezelab train`` does, callable from Python.

Check everything that can be checked on the driver, start (or join) Ray, check a
multi-node cluster's storage and tracking, then train with MLflow tracking around
the run. Each step belongs to a lower layer; this module only puts them in order.

>>> from freezelab.trainers.config import load_config
>>> tracked = train(load_config("examples/train_tiny.yaml"))  # doctest: +SKIP
>>> print(summarize(tracked))                                  # doctest: +SKIP
"""

from __future__ import annotations

import logging
import time
from typing import Any

from freezelab.env import freezelab_home, job_submission_id
from freezelab.mlflow.tracked import TrackedOutcome, tracking_available, train_tracked
from freezelab.redact import redact_uri
from freezelab.trainers.config import TrainConfig
from freezelab.trainers.launch import init_ray, worker_resources
from freezelab.trainers.preflight import check_run
from freezelab.trainers.shifts import SHIFTED_PREFIX, shifted_metric

log = logging.getLogger(__name__)


def train(
    config: TrainConfig,
    *,
    address: str | None = None,
    parent_run_id: str | None = None,
    **train_options: Any,
) -> TrackedOutcome:
    """Train ``config`` as ``freezelab train`` does; ``parent_run_id`` nests its MLflow
    run (a study's child). ``train_options`` go to ``train_tracked``."""
    started = time.perf_counter()
    check_run(config)  # before Ray, MLflow or any worker
    tracking = tracking_available(config)
    if job_submission_id():
        from freezelab.mlflow.tracking import resolve_tracking_uri

        log.info(
            f"Ray job {job_submission_id()}: runs in {redact_uri(config.storage_path)}, MLflow "
            f"at {redact_uri(resolve_tracking_uri(config.mlflow.tracking_uri))} (inside a job, relative "
            f"paths resolve under {freezelab_home()}, not in the job's temporary folder)"
        )
    if config.scaling.num_workers > 0:
        from freezelab.cluster.checks import check_cluster

        init_ray(address)
        worker_resources(config)  # a request that can never fit fails before MLflow
        check_cluster(config, logging_nodes="driver")
    return train_tracked(
        config, parent_run_id=parent_run_id, tracking=tracking, started=started, **train_options
    )


def summarize(config: TrainConfig, tracked: TrackedOutcome) -> str:
    """The lines a run ends with: what it reached and where everything is."""
    outcome = tracked.outcome
    m = outcome.metrics
    nan = float("nan")
    train_s, images = m.get("train_time_s", nan), int(m.get("train_images", 0))
    lines = [
        f"run {outcome.name}: {m.get('epoch', -1) + 1} epochs, policy {config.policy.label()}, "
        f"model {config.model.name}",
        f"  val_acc {m.get('val_acc', nan):.4f} (best epoch {m.get('best_val_acc', nan):.4f}), "
        f"val_loss {m.get('val_loss', nan):.4f}, train_loss {m.get('train_loss', nan):.4f}",
        f"  trainable params {m.get('trainable_params', 0):,}, frozen {m.get('frozen_params', 0):,}",
        # Named as MLflow's cost/* metrics, whose last values these are.
        f"  cost: train_s {train_s:.1f}, wall_s {tracked.wall_time_s or nan:.1f}, "
        f"gflops {m.get('train_flops', 0) / 1e9:,.1f}, train_images {images:,}, "
        f"images_per_s {images / train_s if train_s > 0 else nan:.0f}",
    ]
    if "test_acc" in m:  # the held-out test set, evaluated once on the handed-over model
        shifted = "".join(
            f", {k.removeprefix(SHIFTED_PREFIX)} {v:.4f}"
            for k, v in sorted(m.items())
            if k.startswith(shifted_metric("test", ""))
        )
        lines.insert(
            2,
            f"  test_acc {m['test_acc']:.4f} on {m.get('test_images', 0):,} held-out images, "
            f"test_loss {m.get('test_loss', nan):.4f}{shifted}",
        )
    if outcome.checkpoint_dir:
        lines.append(f"  checkpoint: {redact_uri(outcome.checkpoint_location)}")
    if tracked.run_id:
        from freezelab.mlflow.tracking import resolve_tracking_uri, ui_page

        uri = resolve_tracking_uri(config.mlflow.tracking_uri)
        lines.append(f"  MLflow run: {tracked.run_id} at {redact_uri(uri)}")
        if tracked.experiment_id:
            lines.append(f"  MLflow UI: {ui_page(uri, tracked.experiment_id, tracked.run_id)}")
    if tracked.model_uri:
        lines.append(f"  model: {tracked.model_uri}")
    return "\n".join(lines)
