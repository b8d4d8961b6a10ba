"""The names a run's numbers carry in MLflow, in sections a person can scan.

The loop reports one flat dict per epoch (``train_time_s``, ``trainable_params``, ...),
which Ray Tune and the study read as it is. MLflow shows a run's metrics in chart
sections, one per prefix (the part before the last ``/``), so the names it receives
group them:

- no prefix: what a run is judged by, ``val_acc``, ``val_loss``, ``test_acc``,
  ``test_loss``, ``train_acc``, ``train_loss``;
- ``cost/``: what the run cost so far (its last value is the run's): summed over the
  epochs, ``cost/train_s`` (the training passes' seconds), ``cost/gflops`` and
  ``cost/train_images``; ``cost/images_per_s`` (``cost/train_images`` over
  ``cost/train_s``: the rate the summary states); ``cost/peak_memory_mb``; and
  ``cost/wall_s`` (start-up included, logged once at the end);
- ``epoch/``: one epoch's own numbers: ``epoch/time_s`` (training and evaluation),
  ``epoch/best_val_acc`` (the best epoch's val_acc so far; the run's model is its last
  epoch's, ``val_acc``);
- ``model/``: the policy's share of the model: ``model/trainable_share``,
  ``model/trainable_params``, ``model/frozen_params``;
- ``forgetting/``: the source probe (``forgetting/source_probe_acc``, its value before
  training ``forgetting/source_probe_acc_start``, and the drop ``forgetting/drop``);
- ``run/``: bookkeeping (``run/epoch`` marks an epoch as logged, ``run/diverged``,
  ``run/phase_index``, the images evaluated and each rank's training images);
- diagnostics under their own prefixes: ``drift/<group>``, ``grad_norm/<group>``,
  ``rel_grad_norm/<group>``, ``early/...`` (at the early steps' global step), ``lr/...``,
  and the evaluations under shifts ``shifted/val_acc/<shift>``.

>>> mlflow_name("train_time_s"), mlflow_name("val_acc"), mlflow_name("train_images/rank1")
('cost/train_s', 'val_acc', 'run/train_images/rank1')
>>> current_name("train_time_s"), current_name("val_acc/invert")
('cost/train_s', 'shifted/val_acc/invert')
"""

from __future__ import annotations

from freezelab.trainers.shifts import SHIFTED_PREFIX

# The loop's key -> its MLflow name. Keys not here keep their name.
RENAMED: dict[str, str] = {
    "train_time_s": "cost/train_s",
    "wall_time_s": "cost/wall_s",
    "train_flops": "cost/gflops",
    "train_images": "cost/train_images",
    "peak_memory_mb": "cost/peak_memory_mb",
    "epoch_time_s": "epoch/time_s",
    "best_val_acc": "epoch/best_val_acc",
    "trainable_share": "model/trainable_share",
    "trainable_params": "model/trainable_params",
    "frozen_params": "model/frozen_params",
    "source_probe_acc": "forgetting/source_probe_acc",
    "source_probe_acc_start": "forgetting/source_probe_acc_start",
    "forgetting": "forgetting/drop",
    "epoch": "run/epoch",
    "diverged": "run/diverged",
    "phase_index": "run/phase_index",
    "val_images": "run/val_images",
    "test_images": "run/test_images",
    "replicas_in_sync": "run/replicas_in_sync",
}
RENAMED_PREFIXES = {"train_images/rank": "run/train_images/rank"}
# Logged in another unit: FLOPs as GFLOPs.
SCALE = {"train_flops": 1e-9}
# The run's throughput: one rate, the run's own (``cost/images_per_s``), not each epoch's.
NOT_LOGGED = ("images_per_s",)
IMAGES_PER_S = "cost/images_per_s"
LR = "lr/all"  # the learning rate when every group has the same one

# Names of runs logged before these sections existed, readable as today's.
_LEGACY = {**RENAMED, "lr": LR}


def mlflow_name(key: str) -> str:
    """The MLflow name of the loop's report key ``key``."""
    if key in RENAMED:
        return RENAMED[key]
    for old, new in RENAMED_PREFIXES.items():
        if key.startswith(old):
            return new + key[len(old) :]
    return key


def mlflow_value(key: str, value: float) -> float:
    """``value`` of the loop's key ``key`` in its MLflow unit."""
    return value * SCALE.get(key, 1.0)


def current_name(logged: str) -> str:
    """Today's name of a metric an older run logged (``train_time_s``, the shifted
    evaluations' ``val_acc/<shift>``); a current name is returned as it is."""
    if logged in _LEGACY:
        return _LEGACY[logged]
    for split in ("val", "test"):
        if logged.startswith(f"{split}_acc/"):
            return SHIFTED_PREFIX + logged
    return mlflow_name(logged) if "/" in logged else logged


def current_value(logged: str, value: float) -> float:
    """``value`` of the metric an older run logged as ``logged``, in today's unit."""
    return mlflow_value(logged, value) if logged in _LEGACY else value


def current_metrics(logged: dict[str, float]) -> dict[str, float]:
    """A run's last values (``run.data.metrics``) under today's names and units; where
    a run holds a metric under both names (resumed across the rename), today's wins."""
    found: dict[str, float] = {}
    for key, value in sorted(logged.items(), key=lambda item: current_name(item[0]) == item[0]):
        found[current_name(key)] = current_value(key, value)
    return found
