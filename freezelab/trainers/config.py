"""The train config: one YAML file, validated into typed sections before Ray starts.

>>> config = load_config("examples/train_tiny.yaml", overrides=["epochs=1"])
>>> config.epochs
1
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from freezelab import objectstore
from freezelab.config_io import ConfigModel, parse_yaml, read_mapping
from freezelab.env import resolve_result_path
from freezelab.errors import ConfigError, describe_validation_error
from freezelab.policies import AnyPolicy, FreezePolicy, PolicyError, from_dict
from freezelab.redact import redact_config
from freezelab.trainers.shifts import SHIFT_KINDS, parse_shift

__all__ = [
    "ConfigError",
    "DataConfig",
    "TrainConfig",
    "apply_override",
    "deep_merge",
    "load_config",
    "read_mapping",
    "validate_config",
]


# Every section: frozen, no unknown fields, no inf/nan, no boolean for a number.
_Section = ConfigModel


class HeadConfig(ConfigModel):
    """A custom classifier on the backbone's features.

    ``pool``: ``flatten`` (the feature map as is, Keras's Flatten), ``avg`` or ``max``
    (global pooling of the feature map), or ``default`` (timm's own pooling and
    pre-logits). ``hidden``: sizes of the hidden Linear+ReLU layers.
    """

    pool: Literal["flatten", "avg", "max", "default"] = "default"
    hidden: tuple[int, ...] = ()
    dropout: float = Field(0.0, ge=0.0, lt=1.0)


class ModelSection(_Section):
    """The backbone and where its weights come from.

    ``head_init``: whether the classifier of ``weights`` (or of timm's pretrained
    weights) is kept. ``reset``: never, the head starts fresh (seeded); ``keep``: always,
    and a classifier that does not fit the model is an error; ``auto``: only when the
    weights record the same labels as this run's data (``head_init.py``).
    ``head_norm: batchnorm`` puts an affine-free BatchNorm on the features the head
    reads (MAE's linear-probe protocol): part of the head, with no parameters of its
    own (``models.HeadNorm``).
    """

    name: str
    pretrained: bool = False
    weights: str | None = None
    head: HeadConfig | None = None
    head_norm: Literal["none", "batchnorm"] = "none"
    in_chans: int = Field(3, ge=1)
    head_init: Literal["auto", "keep", "reset"] = "auto"

    @model_validator(mode="after")
    def _one_source(self) -> ModelSection:
        if self.pretrained and self.weights:
            raise ValueError("set either pretrained or weights, not both")
        return self


# A data section's kinds: a new kind adds its fields here (``kind`` and these two tables)
# and its source in ``datasets.py`` (``SOURCES``).
ALL_DIGITS = tuple(range(10))
# Fields that mean something for one kind only: set for another kind they are a mistake.
_KIND_OF_FIELD = {
    "root": "image_folder",
    "classes": "digits",
    "num_samples": "synthetic",
    "num_classes": "synthetic",
    "image_size": "synthetic",
}
_REQUIRED_FIELDS = {
    "image_folder": ("root",),
    "digits": (),
    "synthetic": ("num_samples", "num_classes"),
}


class DataConfig(ConfigModel):
    """Which dataset, how it is split, and how it is shown to the model.

    >>> DataConfig(kind="synthetic", num_samples=64, num_classes=4).val_fraction
    0.2
    """

    kind: Literal["image_folder", "digits", "synthetic"]
    seed: int = Field(0, ge=0)
    val_fraction: float = Field(0.2, gt=0.0, lt=1.0)  # unused when root has train/ and val/
    # The held-out test split, a share of all the data like val_fraction (None: none;
    # README, "Held-out test data"); unused when root has a test/ folder, which is the test set.
    test_fraction: float | None = Field(None, gt=0.0, lt=1.0)
    augment: bool = False
    num_workers: int = Field(0, ge=0)
    input_size: int | None = Field(None, ge=1)  # square side; wins over the model's own size
    train_per_class: int | None = Field(None, ge=1)  # few-shot cap, any kind
    # Each epoch trains on a fresh random subset of ceil(f * N) of the N training rows
    # (N after train_per_class), drawn from (run seed, epoch) before the rows are split
    # among ranks (``rank_data.EpochSubsetSampler``); None: every row, every epoch.
    # Steps, the LR schedule, train_images and train_flops follow the subset. The
    # frozen-feature cache is off with it (it holds a set of rows no epoch covers), and
    # Ray Data does not support it.
    epoch_fraction: float | None = Field(None, gt=0.0, le=1.0)
    root: str | None = None
    classes: tuple[int, ...] | None = None  # digits to keep, relabelled 0.. in this order
    num_samples: int | None = Field(None, ge=2)
    num_classes: int | None = Field(None, ge=2)
    image_size: int | None = Field(None, ge=1)  # generated side, resized to the input size
    # Input-level shifts (``freezelab.trainers.shifts``): ``shift`` changes the task's
    # own images, train and val; each of ``eval_shifts`` is a shifted copy of the val
    # set, reported as shifted/val_acc/<shift>; each of ``eval_sets`` (name: image folder
    # with the same class folders) is reported as shifted/val_acc/<name>.
    shift: str | None = None
    eval_shifts: tuple[str, ...] = ()
    eval_sets: dict[str, str] = Field(default_factory=dict)
    # How images reach the loop: a DataLoader per worker (torch), Ray Data's streaming
    # reads and preprocessing on any node's CPUs (ray_data), or auto (``resolve_loader``).
    loader: Literal["auto", "torch", "ray_data"] = "auto"
    # Ray Data: an image that cannot be decoded is skipped (and counted in the logs)
    # instead of failing the run with its file's name.
    skip_corrupt: bool = False

    @field_validator("shift")
    @classmethod
    def _valid_shift(cls, value: str | None) -> str | None:
        return None if value is None else parse_shift(value).name

    @field_validator("eval_shifts")
    @classmethod
    def _valid_shifts(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        names = tuple(parse_shift(text).name for text in value)
        repeated = sorted({name for name in names if names.count(name) > 1})
        if repeated:
            raise ValueError(f"eval_shifts repeat {repeated}")
        return names

    @field_validator("eval_sets")
    @classmethod
    def _valid_set_names(cls, value: dict[str, str]) -> dict[str, str]:
        for name in value:
            if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
                raise ValueError(
                    f"eval_sets name {name!r}: letters, digits, '_', '.' and '-' only "
                    "(it names the metric shifted/val_acc/<name>)"
                )
            if name.partition(":")[0] in SHIFT_KINDS:
                raise ValueError(f"eval_sets name {name!r} is the name of a shift")
        return value

    @field_validator("classes")
    @classmethod
    def _valid_digits(cls, value: tuple[int, ...] | None) -> tuple[int, ...] | None:
        if value is None:
            return value
        outside = [digit for digit in value if digit not in ALL_DIGITS]
        if outside:
            raise ValueError(f"digit classes must be in 0..9, got {outside}")
        repeated = sorted({digit for digit in value if value.count(digit) > 1})
        if repeated:
            raise ValueError(f"digit classes must be distinct, {repeated} repeated")
        if len(value) < 2:
            raise ValueError(f"at least 2 digit classes are needed, got {list(value)}")
        return value

    @model_validator(mode="after")
    def _fields_match_kind(self) -> DataConfig:
        for name, kind in _KIND_OF_FIELD.items():
            if getattr(self, name) is not None and kind != self.kind:
                raise ValueError(f"{name} applies to kind {kind!r} only, not {self.kind!r}")
        for name in _REQUIRED_FIELDS[self.kind]:
            if getattr(self, name) is None:
                raise ValueError(f"{name} is required when kind is {self.kind!r}")
        if self.kind != "image_folder" and self.loader == "ray_data":
            raise ValueError(f"loader 'ray_data' reads image folders, not kind {self.kind!r}")
        if self.kind != "image_folder" and self.skip_corrupt:
            raise ValueError(f"skip_corrupt applies to kind 'image_folder' only, not {self.kind!r}")
        if self.kind == "image_folder" and objectstore.is_uri(self.root):
            if self.loader == "torch":
                raise ValueError(
                    f"root {self.root!r} is a URI: loader 'torch' reads local or mounted "
                    "folders; use loader 'ray_data' (or 'auto')"
                )
        if self.loader == "torch" and self.skip_corrupt:
            raise ValueError("skip_corrupt needs loader 'ray_data' (or 'auto' on a URI)")
        if self.loader != "torch" and self.kind == "image_folder":
            shifted = ["shift"] * bool(self.shift) + ["eval_shifts"] * bool(self.eval_shifts)
            if shifted and (self.loader == "ray_data" or objectstore.is_uri(self.root)):
                raise ValueError(
                    f"{' and '.join(shifted)}: not available with loader 'ray_data' yet; "
                    "use a local folder with loader 'torch'"
                )
        if self.epoch_fraction is not None and (
            self.loader == "ray_data"
            or (
                self.loader == "auto"
                and self.kind == "image_folder"
                and objectstore.is_uri(self.root)
            )
        ):
            raise ValueError(
                "epoch_fraction is not supported with loader 'ray_data'"
                + (" (which loader 'auto' takes for a URI root)" if self.loader == "auto" else "")
            )
        if self.test_fraction is not None and self.test_fraction + self.val_fraction >= 1:
            raise ValueError(
                f"test_fraction={self.test_fraction} and val_fraction={self.val_fraction} "
                "leave no training data: both are shares of the data, their sum must be below 1"
            )
        needed = 2 if self.test_fraction is None else 3
        if self.kind == "synthetic" and self.num_samples < needed * self.num_classes:
            split = "train/val" if self.test_fraction is None else "train/val/test"
            raise ValueError(
                f"num_samples={self.num_samples} leaves fewer than {needed} samples per class "
                f"for num_classes={self.num_classes}; the {split} split needs at least {needed}"
            )
        return self


class OptimizerSection(_Section):
    name: Literal["sgd", "adamw", "adam"] = "sgd"
    lr: float = Field(0.01, gt=0.0)
    momentum: float = Field(0.9, ge=0.0, lt=1.0)
    nesterov: bool = False
    weight_decay: float = Field(0.0, ge=0.0)
    label_smoothing: float = Field(0.0, ge=0.0, lt=1.0)


class ScheduleSection(_Section):
    """The LR factor as a function of training progress, set before every step."""

    name: Literal["constant", "cosine", "step"] = "cosine"
    warmup_epochs: float = Field(0.0, ge=0.0)
    min_lr_factor: float = Field(0.0, ge=0.0, le=1.0)
    step_epochs: int = Field(10, ge=1)
    gamma: float = Field(0.1, gt=0.0, le=1.0)


class ScalingSection(_Section):
    """Workers and where they go. ``env_vars`` reach every worker's environment, e.g.
    ``{GLOO_SOCKET_IFNAME: eth0}`` on nodes whose hostname resolves to the wrong
    interface; those two and ``NCCL_SOCKET_IFNAME`` are also passed on from the driver's
    environment when set there."""

    num_workers: int = Field(1, ge=0)
    use_gpu: bool = False
    resources_per_worker: dict[str, float] | None = None
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    env_vars: dict[str, str] = Field(default_factory=dict)


class PerformanceSection(_Section):
    """GPU switches (autocast, channels_last, compile) and the frozen-feature cache."""

    amp: Literal["bf16", "fp16"] | None = None
    channels_last: bool = False
    compile: bool = False
    feature_cache: bool = True
    torch_threads: int | None = Field(None, ge=1)


class MetricsSection(_Section):
    """What the loop measures beyond accuracy and cost (README, "What the study measures")."""

    # Per-group gradient norms each epoch (grad_norm/<group>, rel_grad_norm/<group>), and
    # per step for the first `early_steps` steps of the run and of every phase.
    gradients: bool = True
    early_steps: int = Field(20, ge=0)
    # data.eval_shifts and data.eval_sets are evaluated every `eval_every` epochs and
    # at the last one.
    eval_every: int = Field(1, ge=1)


class ForgettingSection(_Section):
    """Representation forgetting (``trainers/forgetting.py``): a linear probe on the
    backbone's features of the ``source`` task, fitted at the start of the run, at its
    end, and every ``every`` epochs when set. ``source`` is a data section (the
    pretraining task); its input size defaults to the run's ``data.input_size``."""

    source: DataConfig | None = None
    every: int | None = Field(None, ge=1)
    max_iter: int = Field(500, ge=1)  # L-BFGS iterations of the probe

    @field_validator("source")
    @classmethod
    def _whole_source(cls, value: DataConfig | None) -> DataConfig | None:
        if value is not None and value.epoch_fraction is not None:
            raise ValueError("epoch_fraction does not apply: the probe fits the whole source set")
        return value


class CheckpointSection(_Section):
    every: int = Field(1, ge=1)
    keep: int | None = Field(2, ge=1)


class MlflowSection(_Section):
    """MLflow tracking. The URI: ``tracking_uri``, else ``MLFLOW_TRACKING_URI``, else
    ``sqlite:///mlflow.db`` in the working directory."""

    enabled: bool = True
    tracking_uri: str | None = None
    experiment: str = "freezelab"
    run_name: str | None = None
    required: bool = True
    register_as: str | None = None
    alias: str = "champion"
    log_model: bool = True
    tags: dict[str, str] = Field(default_factory=dict)
    # How long the end of a run retries a tracking server that is away before it
    # leaves the run for `freezelab sync`.
    sync_timeout_s: float = Field(60.0, ge=0)


class TrainConfig(_Section):
    # A name or a template of one: {policy}, {hash}, {model} and {seed} are filled in
    # from the config, so that every distinct config gets a run of its own.
    name: str = Field(pattern=r"^[A-Za-z0-9{][A-Za-z0-9_.={}-]*$", max_length=200)
    model: ModelSection
    data: DataConfig
    policy: AnyPolicy
    epochs: int = Field(ge=1)
    batch_size: int = Field(32, ge=1)
    seed: int = 0
    optimizer: OptimizerSection = OptimizerSection()
    schedule: ScheduleSection = ScheduleSection()
    scaling: ScalingSection = ScalingSection()
    performance: PerformanceSection = PerformanceSection()
    checkpoint: CheckpointSection = CheckpointSection()
    metrics: MetricsSection = MetricsSection()
    forgetting: ForgettingSection = ForgettingSection()
    max_failures: int = Field(0, ge=-1)  # worker failures survived by restarting
    max_controller_failures: int = Field(3, ge=-1)  # e.g. worker groups that could not start
    storage_path: str = Field("freezelab_runs", validate_default=True)
    mlflow: MlflowSection = MlflowSection()

    @field_validator("policy", mode="before")
    @classmethod
    def _policy(cls, value: Any) -> FreezePolicy:
        try:
            return from_dict(value)
        except PolicyError as err:
            raise ValueError(str(err)) from None

    @field_validator("storage_path")
    @classmethod
    def _absolute_storage(cls, value: str) -> str:
        # Ray needs an absolute path or a URI. Relative paths mean the working directory,
        # or FREEZELAB_HOME inside a Ray job (whose working directory is temporary).
        return resolve_result_path(value)

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def safe_dict(self) -> dict[str, Any]:
        """:meth:`to_dict` fit to be logged or saved: env var values and URI passwords
        hidden (``freezelab.redact``)."""
        return redact_config(self.to_dict())


def load_config(
    source: str | Path | dict[str, Any], overrides: list[str] | None = None
) -> TrainConfig:
    """Read and validate a train config; ``overrides`` are ``a.b=value`` strings."""
    if isinstance(source, dict):
        data, origin = dict(source), "config"
    else:
        data, origin = read_mapping(source, "a train config"), str(source)
    for override in overrides or []:
        apply_override(data, override)
    return validate_config(data, origin)


def validate_config(data: dict[str, Any], origin: str = "config") -> TrainConfig:
    try:
        config = TrainConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(describe_validation_error(origin, err)) from None
    if "{" in config.name or "}" in config.name:
        config = config.model_copy(update={"name": _fill_name(config, origin)})
    return config


NAME_FIELDS = ("policy", "hash", "model", "seed")


def _fill_name(config: TrainConfig, origin: str) -> str:
    from freezelab.trainers.location import config_hash

    values = {
        "policy": config.policy.slug(),
        "hash": config_hash(config.to_dict()),
        "model": config.model.name.replace("/", "_"),
        "seed": str(config.seed),
    }
    try:
        return config.name.format(**values)
    except (KeyError, IndexError, ValueError) as err:
        raise ConfigError(
            f"{origin}: name {config.name!r}: a template may use "
            + ", ".join("{" + k + "}" for k in NAME_FIELDS)
            + f" ({type(err).__name__}: {err})"
        ) from None


def apply_override(data: dict[str, Any], override: str) -> None:
    """Set ``a.b.c=value`` in a nested dict; the value is parsed as YAML (so ``3``,
    ``true``, ``[1, 2]`` and ``{type: full}`` keep their types)."""
    if "=" not in override:
        raise ConfigError(f"--set {override!r}: expected KEY=VALUE, e.g. optimizer.lr=0.001")
    key, raw = override.split("=", 1)
    value = parse_yaml(raw, f"--set {override!r}: the value")
    parts = key.strip().split(".")
    node = data
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {override!r}: {part!r} is not a section")
        node = child
    node[parts[-1]] = value


def deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """``update`` over ``base``, recursively for nested sections; neither is changed."""
    merged = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged
