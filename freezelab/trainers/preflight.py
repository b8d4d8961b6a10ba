"""Everything about a run that can be checked on the driver before Ray, MLflow or a
worker starts: the model, its weights and what becomes of their classifier
(``model.head_init``), the policy for every epoch, the data.

>>> from freezelab.trainers.config import load_config
>>> check_run(load_config("examples/train_tiny.yaml"))  # doctest: +SKIP
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from freezelab import objectstore
from freezelab.errors import ConfigError, FreezelabError
from freezelab.policies import PolicyError
from freezelab.trainers.artifacts import is_model_uri
from freezelab.trainers.config import TrainConfig
from freezelab.trainers.data import check_data
from freezelab.trainers.models import build_unallocated, head_init_decision


def check_run(
    config: TrainConfig,
    *,
    num_classes: int | None = None,
    check_weights: bool = True,
    storage: bool = True,
) -> None:
    """Build the model's shapes (without downloading or allocating anything), check a
    local weights file against them (``head_init_decision``: ``head_init keep`` with a
    classifier that cannot be kept fails here too), and plan the policy for every epoch:
    what cannot work fails here, one line.

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
    if check_weights and not is_model_uri(weights):
        try:
            head_init_decision(config, model=model, num_classes=num_classes)
        except ConfigError:  # head_init keep that cannot keep: it names the field
            raise
        except Exception as err:  # unreadable, not a state dict, another architecture
            raise ConfigError(f"model.weights: {_first_line(err)}") from None
    try:
        config.policy.validate_epochs(config.epochs)
        for epoch in range(config.epochs):
            config.policy.plan(model, epoch)
    except PolicyError as err:
        raise ConfigError(f"policy: {err}") from None


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
