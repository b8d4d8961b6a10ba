"""Everything about a run that can be checked on the driver before Ray, MLflow or a
worker starts: the model, its weights, the policy for every epoch, the data.

>>> from freezelab.trainers.config import load_config
>>> check_run(load_config("examples/train_tiny.yaml"))  # doctest: +SKIP
"""

from __future__ import annotations

import tempfile
import warnings
from pathlib import Path

import torch

from freezelab import objectstore
from freezelab.errors import ConfigError, FreezelabError
from freezelab.policies import PolicyError
from freezelab.trainers.artifacts import is_model_uri
from freezelab.trainers.config import TrainConfig
from freezelab.trainers.data import check_data
from freezelab.trainers.models import build_for_config, load_weights


def check_run(
    config: TrainConfig,
    *,
    num_classes: int | None = None,
    check_weights: bool = True,
    storage: bool = True,
) -> None:
    """Build the model's shapes (without downloading or allocating anything), load a
    local weights file into it, and plan the policy for every epoch: what cannot work fails here, one line.

    ``num_classes`` stands in for the data's class count where the data is not at
    hand (a folder that only the cluster sees); ``check_weights=False`` skips reading
    a weights file that only the cluster has, ``storage=False`` the storage check
    (object storage that only the cluster's credentials open).
    """
    if num_classes is None:
        check_data(config.data)
    if storage:
        check_storage(config.storage_path)
    try:
        model = build_unallocated(config, num_classes)
    except FreezelabError:
        raise
    except (ValueError, RuntimeError) as err:
        raise ConfigError(f"model: {err}") from None
    weights = config.model.weights
    if check_weights and weights and not is_model_uri(weights):
        try:
            with warnings.catch_warnings():
                # Into meta tensors a load copies nothing, as intended: torch warns per tensor.
                warnings.filterwarnings("ignore", message=".*meta parameter.*no-op")
                load_weights(model, weights)
        except Exception as err:  # unreadable, not a state dict, another architecture
            raise ConfigError(f"model.weights: {_first_line(err)}") from None
    try:
        config.policy.validate_epochs(config.epochs)
        for epoch in range(config.epochs):
            config.policy.plan(model, epoch)
    except PolicyError as err:
        raise ConfigError(f"policy: {err}") from None


def build_unallocated(config: TrainConfig, num_classes: int | None = None) -> torch.nn.Module:
    """The model with its tensors on the meta device: every shape, and no memory or
    initialization (vgg16: 0.04 s instead of 1 s). Loading weights into it checks their
    shapes and copies nothing. A model whose construction needs real values is built on
    the CPU instead."""
    try:
        with torch.device("meta"):
            return build_for_config(config, with_weights=False, num_classes=num_classes)
    except (NotImplementedError, RuntimeError):
        return build_for_config(config, with_weights=False, num_classes=num_classes)


def _first_line(err: Exception) -> str:
    lines = str(err).strip().splitlines()
    return lines[0] if lines else type(err).__name__


def check_storage(storage_path: str) -> None:
    """A local ``storage_path`` must be a directory this process can write, or one it
    can create: a probe file in the nearest existing folder is written and deleted, and
    nothing else is created. On object storage the bucket must exist and a probe object
    is written there and deleted (``objectstore.require_writable``): a bucket that does
    not exist, no permission or an endpoint that does not answer is one line."""
    if objectstore.is_uri(storage_path):
        try:
            objectstore.require_writable(storage_path, "storage_path")
        except objectstore.StorageError as err:
            raise ConfigError(str(err)) from None
        return
    path = Path(storage_path)
    existing = path
    while not existing.exists():
        if existing.parent == existing:
            break
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(
            f"storage_path {storage_path!r}: {str(existing)!r} is a file, not a directory"
        )
    try:
        with tempfile.NamedTemporaryFile(dir=existing, prefix=".freezelab-probe-"):
            pass
    except OSError as err:
        raise ConfigError(
            f"storage_path {storage_path!r}: cannot write in {str(existing)!r} "
            f"({err.strerror or err})"
        ) from None
