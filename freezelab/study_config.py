"""A study's config: the built-in study, its validation, and the train config of each of
its runs (the pretraining, the selection runs, the fine-tuning runs the verdict
compares), each validated before anything trains.

>>> study = load_study(None)  # the built-in study (``DEFAULT_STUDY``)
>>> len(finetune_configs(study, "tag")) == len(study.variants) * len(study.policies) * 3
True
"""

from __future__ import annotations

import copy
import itertools
import json
import re
from pathlib import Path
from typing import Any

from pydantic import Field, ValidationError, field_validator, model_validator

from freezelab.config_io import ConfigModel, read_mapping
from freezelab.errors import ConfigError, describe_validation_error
from freezelab.mlflow.tracking import SELECT, STAGE_TAG, STUDY_TAG, VARIANT_TAG
from freezelab.policies import from_dict
from freezelab.study_selection import (
    GROUP_TAG,
    POINT_TAG,
    Choice,
    SelectionConfig,
    group_key,
)
from freezelab.study_selection import points as select_points
from freezelab.trainers.config import TrainConfig, apply_override, deep_merge, validate_config

DEFAULT_STUDY: dict[str, Any] = {
    "name": "transfer-study",
    "base": {
        "model": {"name": "resnet18"},
        "data": {"kind": "digits", "input_size": 32, "val_fraction": 0.3},
        "batch_size": 16,
        "scaling": {"num_workers": 2},
        "optimizer": {"name": "sgd", "lr": 0.05, "momentum": 0.9, "weight_decay": 0.0001},
        "schedule": {"name": "cosine"},
        "seed": 0,
    },
    "pretrain": {
        "epochs": 4,
        "data": {"classes": [0, 1, 2, 3, 4]},
        "policy": {"type": "full"},
    },
    "finetune": {
        "epochs": 8,
        # An affine-free BatchNorm before every policy's linear classifier (MAE's linear
        # probe): without it the linear heads on frozen features diverged on the inverted
        # digits (6 of the 36 runs; BENCHMARKS section 11).
        "model": {"head_norm": "batchnorm"},
        "data": {
            "classes": [5, 6, 7, 8, 9],
            "train_per_class": 20,
            # Held out from every choice: the verdict and the consequences are read on it.
            "test_fraction": 0.2,
            "eval_shifts": ["rotate:30", "gaussian_noise:0.3", "blur:1", "contrast:0.3"],
        },
        "optimizer": {"lr": 0.02},  # the rate of every policy under `select: null`
        # One process per fine-tuning run (num_workers: 0, no Ray Train: a Tune trial
        # trains in its own process), as many at once as the CPUs hold. The pretraining
        # shows data-parallel training; short runs would spend most of their time
        # starting worker groups.
        "scaling": {"num_workers": 0},
        "metrics": {"eval_every": 4},
        # A run of ten seconds resumes from its middle or its end: a checkpoint per
        # epoch would cost more than it saves.
        "checkpoint": {"every": 4},
    },
    "variants": {
        "new-digits": {},
        "new-digits-inverted": {"data": {"shift": "invert"}},
    },
    "policies": [
        {"type": "full"},
        {"type": "head_only"},
        {"type": "last_n", "n": 1},
        {"type": "surgical", "groups": ["stem", "layer1"]},
        {"type": "gradual", "every": 2},
        {"type": "lp_ft", "probe_epochs": 3, "ft_lr_factor": 0.5},
    ],
    # The model the study hands over, as models:/transfer-study-best@champion.
    "register_best_as": "transfer-study-best",
    # Three repeats of each (variant, policy): the tables give each setting an interval.
    "seeds": [0, 1, 2],
    # Each (variant, policy) at its own learning rate, chosen on val by successive halving
    # (a linear head and a whole backbone do not share a good rate).
    "select": {"grid": {"optimizer.lr": [0.002, 0.01, 0.05]}, "grace_epochs": 2},
}


class StudyConfig(ConfigModel):
    """A base train config, the overrides of each stage, and the policies to compare.

    Every policy is fine-tuned on every target variant (``variants``: name to
    overrides of ``finetune``, e.g. ``{data: {shift: invert}}``), at every combination
    of ``grid`` (dotted keys of the fine-tuning config, e.g. ``optimizer.lr``), once per
    seed in ``seeds``; the report compares each policy at its best combination within
    each variant, averaged over the seeds. Unless ``finetune`` sets
    ``forgetting.source``, the pretraining data is the source task that forgetting is
    measured on.
    """

    name: str = "transfer-study"
    base: dict[str, Any]
    pretrain: dict[str, Any]
    finetune: dict[str, Any]
    policies: list[dict[str, Any]] = Field(min_length=1)
    seeds: list[int] = Field(default=[0], min_length=1)
    grid: dict[str, list[Any]] = Field(default_factory=dict)
    variants: dict[str, dict[str, Any]] = Field(default_factory=dict)
    register_best_as: str | None = Field(default=None, min_length=1)
    # Fine-tuning runs at once, at most; None: as many as the cluster's resources hold.
    max_concurrent: int | None = Field(default=None, ge=1)
    # Each (variant, policy, grid point) chooses its own values of select.grid (say its
    # learning rate) on val before the verdict's runs; None: every policy as configured.
    select: SelectionConfig | None = None

    @field_validator("seeds")
    @classmethod
    def _distinct_seeds(cls, seeds: list[int]) -> list[int]:
        if len(set(seeds)) != len(seeds):
            raise ValueError(f"seeds repeat: {seeds}")
        return seeds

    @field_validator("grid")
    @classmethod
    def _grid_keys(cls, grid: dict[str, list[Any]]) -> dict[str, list[Any]]:
        for key, values in grid.items():
            if key.split(".")[0] in GRID_FORBIDDEN:
                raise ValueError(f"grid key {key!r}: the study sets {key.split('.')[0]} itself")
            if not values:
                raise ValueError(f"grid key {key!r} has no values")
        return grid

    @field_validator("variants")
    @classmethod
    def _variant_names(cls, variants: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        for name in variants:
            if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
                raise ValueError(
                    f"variant name {name!r}: letters, digits, '_', '.' and '-' only "
                    "(it is part of run names)"
                )
        return variants

    @model_validator(mode="after")
    def _selection(self) -> StudyConfig:
        if self.select is None:
            return self
        for key in self.select.grid:
            if key.split(".")[0] in GRID_FORBIDDEN:
                raise ValueError(
                    f"select.grid key {key!r}: the study sets {key.split('.')[0]} itself"
                )
            if key in self.grid:
                raise ValueError(f"{key!r} is in both grid and select.grid: choose one")
        if self.select.seed in self.seeds:
            raise ValueError(
                f"select.seed {self.select.seed} is one of seeds {self.seeds}: the runs that "
                "choose a value must not be the runs the verdict compares"
            )
        return self


# What a study sets per run: a grid over them would be overwritten.
GRID_FORBIDDEN = ("name", "seed", "policy")


def load_study(source: str | Path | None, overrides: list[str] | None = None) -> StudyConfig:
    data = copy.deepcopy(DEFAULT_STUDY)
    if source is not None:
        data = read_mapping(source, "a study")
    for override in overrides or []:
        apply_override(data, override)
    try:
        return StudyConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(
            describe_validation_error(str(source or "the built-in study"), err, "invalid study")
        ) from None


def stage_config(study: StudyConfig, stage: dict[str, Any], name: str, **extra: Any) -> TrainConfig:
    merged = deep_merge(deep_merge(study.base, stage), {"name": name, **extra})
    return validate_config(merged, origin=f"study {study.name!r}, run {name!r}")


def grid_points(grid: dict[str, list[Any]]) -> list[dict[str, Any]]:
    """Every combination of the grid's values, as {dotted key: value}; one empty
    combination without a grid."""
    keys = sorted(grid)
    return [
        dict(zip(keys, values, strict=True))
        for values in itertools.product(*(grid[k] for k in keys))
    ]


def finetune_configs(
    study: StudyConfig,
    tag: str,
    *,
    selecting: bool = False,
    chosen: dict[str, Choice] | None = None,
) -> list[TrainConfig]:
    """One config per (variant, policy, grid point, seed), validated before anything
    trains. With ``selecting``: the selection runs instead, one per value of
    ``select.grid`` on ``select.seed`` (tagged with their group and point). With
    ``chosen`` (each group's ``Choice``): the verdict's runs at the chosen values; a
    group that chose nothing has no runs."""
    configs = []
    source = deep_merge(study.base, study.pretrain).get("data")
    seeds = [study.select.seed] if selecting else study.seeds
    names = short_names(study)
    for variant, overrides in (study.variants or {"": {}}).items():
        for policy in study.policies:
            for point in grid_points(study.grid):
                group = group_key(variant, policy, point)
                if selecting:
                    extra_points = select_points(study.select)
                elif chosen is not None:
                    extra_points = [chosen[group].point] if chosen[group].point else []
                elif study.select is not None:
                    extra_points = select_points(study.select)[:1]  # checked, not run
                else:
                    extra_points = [{}]
                for extra in extra_points:
                    configs += _group_configs(
                        study,
                        tag,
                        variant,
                        overrides,
                        policy,
                        point,
                        extra,
                        seeds,
                        source,
                        selecting,
                        names,
                    )
    if study.register_best_as and not selecting and configs and not configs[0].mlflow.log_model:
        raise ConfigError(f"study {study.name!r}: register_best_as needs mlflow.log_model: true")
    return configs


def _group_configs(
    study: StudyConfig,
    tag: str,
    variant: str,
    overrides: dict[str, Any],
    policy: dict[str, Any],
    point: dict[str, Any],
    extra: dict[str, Any],
    seeds: list[int],
    source: Any,
    selecting: bool,
    names: dict[str, str],
) -> list[TrainConfig]:
    """The runs of one (variant, policy, grid point) at the values ``extra`` of
    ``select.grid``, one per seed."""
    stage = deep_merge(study.finetune, overrides)
    values = {**point, **extra}
    for key, value in values.items():
        apply_override(stage, f"{key}={json.dumps(value)}")
    if source is not None and "source" not in stage.get("forgetting", {}):
        stage = deep_merge(stage, {"forgetting": {"source": source}})
    tags = {STUDY_TAG: tag, **({VARIANT_TAG: variant} if variant else {})}
    if study.select is not None:
        tags[GROUP_TAG] = group_key(variant, policy, point)
        tags[POINT_TAG] = json.dumps(extra, sort_keys=True)
    if selecting:
        # Compare and the report leave selection runs out; they hand over no model.
        tags[STAGE_TAG] = SELECT
        stage = deep_merge(stage, {"mlflow": {"log_model": False}})
    stage = deep_merge(stage, {"mlflow": {"tags": tags}})
    suffix = "".join(f"-{k.rsplit('.', 1)[-1]}{v}" for k, v in values.items())
    label = from_dict(policy).label()
    configs = []
    for seed in seeds:
        name = f"{tag}-{'select-' if selecting else ''}{variant + '-' if variant else ''}"
        name += from_dict(policy).slug() + suffix
        name += f"-seed{seed}" if len(study.seeds) > 1 and not selecting else ""
        # What the MLflow UI shows: the policy first, short enough for the runs table's
        # column (``full · inverted``); the whole label in a tag, the study in another.
        # A verdict run's selected values (one per policy and variant) tell no two of
        # its runs apart: they are params and in the label, not in the name.
        named = values if selecting else point
        values_shown = [f"{k.rsplit('.', 1)[-1]}={v}" for k, v in named.items()]
        values_whole = [f"{k.rsplit('.', 1)[-1]}={v}" for k, v in values.items()]
        seed_shown = [f"seed={seed}"] if len(study.seeds) > 1 and not selecting else []
        shown = ["select" if selecting else "", names[label], names.get(variant, "")]
        whole = ["select" if selecting else "", label, variant]
        configs.append(
            stage_config(
                study,
                stage,
                re.sub(r"[^A-Za-z0-9_.=-]", "_", name),
                policy=policy,
                seed=seed,
                model={"weights": "PENDING"},
                mlflow={
                    "run_name": RUN_NAME_SEPARATOR.join(
                        filter(None, shown + values_shown + seed_shown)
                    ),
                    "tags": {LABEL_TAG: " ".join(filter(None, whole + values_whole + seed_shown))},
                },
            )
        )
    return configs


# Between the parts of a run's name in the MLflow UI: ``full · inverted · seed=1``.
RUN_NAME_SEPARATOR = " · "
# A run's whole name (the policy's full label, the variant's full name), when its run
# name is shortened.
LABEL_TAG = "freezelab.label"


def short_names(study: StudyConfig) -> dict[str, str]:
    """The short names that a study's run names use, by policy label and by variant
    name: a policy by its type, unless another policy of the study has the same type
    (then by its type and the values of its fields: ``last_n(1)``); a variant without
    the words every variant's name starts with (``new-digits``, ``new-digits-inverted``
    -> ``new-digits``, ``inverted``).

    >>> study = load_study(None)
    >>> names = short_names(study)
    >>> names["lp_ft(probe_epochs=3, ft_lr_factor=0.5)"], names["new-digits-inverted"]
    ('lp_ft', 'inverted')
    """
    policies = [from_dict(p) for p in study.policies]
    types = [p.type for p in policies]
    names = {}
    for policy in policies:
        label = policy.label()
        if types.count(policy.type) == 1:
            names[label] = policy.type
        else:
            names[label] = re.sub(r"\w+=", "", label).replace(", ", ",")
    variants = [v.split("-") for v in study.variants]
    common = 0
    while len(variants) > 1 and all(
        len(v) > common and v[common] == variants[0][common] for v in variants
    ):
        common += 1
    for words, name in zip(variants, study.variants, strict=True):
        names[name] = "-".join(words[common:]) or name
    return names
