"""The transfer study: a self-contained answer to "what if I don't freeze?".

Pretrain a small backbone on a source task (digits 0-4), then fine-tune it on target
tasks that differ from it (``variants``: digits 5-9 with few labels per class, and the
same digits inverted) under several freeze policies. Print each policy's accuracy,
cost, and the four consequences of not freezing, each measured (README, "What the
study measures"): compute, accuracy under data shift, forgetting of the source task,
and the gradients a new head sends into the backbone. No download: the digits ship
with scikit-learn.

    freezelab demo                      # the built-in study below
    freezelab demo --config study.yaml  # your own (same keys)
"""

from __future__ import annotations

import copy
import itertools
import json
import logging
import os
import re
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import Field, ValidationError, field_validator

from freezelab import objectstore
from freezelab.api import train
from freezelab.config_io import ConfigModel, read_mapping
from freezelab.console import Column, format_table
from freezelab.errors import ConfigError, FreezelabError, describe_validation_error
from freezelab.mlflow.tracking import PRETRAIN, STAGE_TAG
from freezelab.policies import from_dict
from freezelab.redact import redact_uri
from freezelab.report.runs import VARIANT_TAG
from freezelab.study_trials import STUDY_FILE, StudyTrials, read_row, study_tag
from freezelab.trainers.config import TrainConfig, apply_override, deep_merge, validate_config
from freezelab.trainers.location import RunLocation

log = logging.getLogger(__name__)

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
        "data": {
            "classes": [5, 6, 7, 8, 9],
            "train_per_class": 20,
            "eval_shifts": ["rotate:30", "gaussian_noise:0.3", "blur:1", "contrast:0.3"],
        },
        "optimizer": {"lr": 0.02},
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


STUDY_TAG = "freezelab.study"  # the study's id, on each of its runs
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


def finetune_configs(study: StudyConfig, tag: str) -> list[TrainConfig]:
    """One config per (variant, policy, grid point, seed), validated before anything
    trains."""
    configs = []
    source = deep_merge(study.base, study.pretrain).get("data")
    for variant, overrides in (study.variants or {"": {}}).items():
        for policy in study.policies:
            for point in grid_points(study.grid):
                stage = deep_merge(study.finetune, overrides)
                for key, value in point.items():
                    apply_override(stage, f"{key}={json.dumps(value)}")
                if source is not None and "source" not in stage.get("forgetting", {}):
                    stage = deep_merge(stage, {"forgetting": {"source": source}})
                tags = {STUDY_TAG: tag, **({VARIANT_TAG: variant} if variant else {})}
                stage = deep_merge(stage, {"mlflow": {"tags": tags}})
                suffix = "".join(f"-{k.rsplit('.', 1)[-1]}{v}" for k, v in point.items())
                for seed in study.seeds:
                    name = f"{tag}-{variant + '-' if variant else ''}{from_dict(policy).slug()}"
                    name += suffix + (f"-seed{seed}" if len(study.seeds) > 1 else "")
                    # What the MLflow UI shows: the policy first, the study in a tag.
                    shown = [from_dict(policy).label(), variant]
                    shown += [f"{k.rsplit('.', 1)[-1]}={v}" for k, v in point.items()]
                    shown += [f"seed={seed}"] if len(study.seeds) > 1 else []
                    configs.append(
                        stage_config(
                            study,
                            stage,
                            re.sub(r"[^A-Za-z0-9_.=-]", "_", name),
                            policy=policy,
                            seed=seed,
                            model={"weights": "PENDING"},
                            mlflow={"run_name": " ".join(filter(None, shown))},
                        )
                    )
    if study.register_best_as and not configs[0].mlflow.log_model:
        raise ConfigError(f"study {study.name!r}: register_best_as needs mlflow.log_model: true")
    return configs


@dataclass(frozen=True)
class StudyOutcome:
    """What a study ran: a row per fine-tuning run that finished, and the runs that
    failed (name and error line)."""

    tag: str
    rows: list[dict[str, Any]]
    failed: list[tuple[str, str]]
    parent_run_id: str | None


def run_study(
    source: str | Path | None = None,
    overrides: list[str] | None = None,
    address: str | None = None,
    *,
    resume: bool = False,
) -> StudyOutcome:
    """Pretrain once, fine-tune every (variant, policy, grid point, seed) as Ray Tune
    trials, as many at once as the cluster holds, print the settings with their
    intervals and a summary, and write the report.

    A study is named by its config (``study_tag``): the same study again continues
    where it stopped (``resume`` insists that it exists), its finished runs kept and
    each run once in MLflow, under one parent run."""
    import ray

    from freezelab.sweep.trials import require_fits
    from freezelab.trainers.launch import init_ray
    from freezelab.trainers.preflight import check_run

    study = load_study(source, overrides)
    tag = study_tag(study)
    # Nested under the study, tagged as pretraining: compare and report leave it out.
    pretrain = stage_config(
        study,
        study.pretrain,
        f"{tag}-pretrain",
        mlflow={"tags": {STAGE_TAG: PRETRAIN, STUDY_TAG: tag}, "run_name": "pretrain"},
    )
    finetunes = finetune_configs(study, tag)
    # Everything that can be checked before Ray, MLflow or a file: the study to resume,
    # what each run asks of the nodes, the data, the model and every policy against
    # it, the storage.
    home = RunLocation(pretrain.storage_path, tag)
    started_before = objectstore.exists(home.file(STUDY_FILE))
    if resume and not started_before:
        raise ConfigError(
            f"study {study.name!r}: nothing to resume: no study {tag} in "
            f"{redact_uri(pretrain.storage_path)} (a changed config is another study)"
        )
    ray_was_up = ray.is_initialized()
    if address or os.environ.get("RAY_ADDRESS"):
        init_ray(address)  # joining a cluster creates nothing: its nodes are checked next
    scalings = {c.scaling.model_dump_json(): c for c in finetunes}
    for config in scalings.values():
        require_fits(config, f"study {study.name!r}")
    distinct = {
        json.dumps([c.policy.to_dict(), c.data.model_dump(mode="json")]): c for c in finetunes
    }
    for config in distinct.values():
        check_run(config, check_weights=False, storage=False)
    check_run(pretrain)
    log.info(
        f"{'continuing ' if started_before else ''}transfer study {tag}: "
        f"{len(study.variants or [''])} target variants x {len(study.policies)} policies x "
        f"{len(grid_points(study.grid))} grid points x {len(study.seeds)} seeds = "
        f"{len(finetunes)} fine-tuning runs; pretraining {pretrain.model.name} on the source task"
    )
    try:
        return _run(study, home, pretrain, finetunes, started_before, address)
    finally:
        if not ray_was_up and ray.is_initialized():
            ray.shutdown()  # the Ray this study started or joined; a cluster stays up


def _run(
    study: StudyConfig,
    home: RunLocation,
    pretrain: TrainConfig,
    finetunes: list[TrainConfig],
    started_before: bool,
    address: str | None,
) -> StudyOutcome:
    """Record the study (``home``: its folder, named by its tag), pretrain, fine-tune,
    then print, register and report."""
    from freezelab.report.rows import group_rows
    from freezelab.trainers.launch import init_ray

    tag = home.name
    if not started_before:
        home.write_file(
            STUDY_FILE, json.dumps({"tag": tag, "study": study.model_dump(mode="json")})
        )
    parent = None
    if finetunes[0].mlflow.enabled:
        from freezelab.mlflow.sweep import start_group_run

        parent, _ = start_group_run(finetunes[0], tag, "study")
    source_model = train(pretrain, address=address, parent_run_id=parent).outcome
    log.info(
        f"source model val_acc {source_model.metrics.get('val_acc', float('nan')):.3f}; "
        f"weights {source_model.weights_file}"
    )
    init_ray(address)
    runs = [_on_driver(c, source_model.weights_file) for c in finetunes]
    rows, failed = _fine_tune(study, home, runs, parent)
    if not rows:
        if parent is not None:
            from freezelab.mlflow.sweep import fail_group_run

            fail_group_run(finetunes[0], parent)
        raise StudyFailed(
            f"study {tag}: none of its {len(runs)} fine-tuning runs finished. "
            f"First error: {failed[0][1]}"
        )
    groups = group_rows(rows)
    print(format_study(tag, rows, groups))
    if study.register_best_as and parent is not None:
        _register_best(finetunes[0], rows, groups, study.register_best_as)
    if parent is not None:
        from freezelab.mlflow.sweep import finish_study_run
        from freezelab.mlflow.tracking import resolve_tracking_uri
        from freezelab.report import build_report

        uri = resolve_tracking_uri(finetunes[0].mlflow.tracking_uri)
        report = build_report(parent, out_dir=Path("freezelab_reports") / tag, tracking_uri=uri)
        finish_study_run(finetunes[0], parent, groups[0], report.summary, rows)
        log.info(f"report of the study: {report.index}")
        log.info(f"compare the runs in the MLflow UI: {study_page(uri, parent)}")
    if failed:
        log.warning(
            f"{len(failed)} of {len(runs)} fine-tuning run(s) failed (listed above); the "
            "tables and the summary come from the runs that finished"
        )
    return StudyOutcome(tag, rows, failed, parent)


class StudyFailed(FreezelabError):
    """Every fine-tuning run of a study failed: there is nothing to compare."""

    exit_code = 1


def _fine_tune(
    study: StudyConfig, home: RunLocation, runs: list[TrainConfig], parent: str | None
) -> tuple[list[dict[str, Any]], list[tuple[str, str]]]:
    """Every fine-tuning run as a Tune trial (continued, if the study ran before): the
    rows of the runs that finished, in the study's order, and the runs that failed."""
    from ray import tune

    from freezelab.mlflow.tracking import source_tags
    from freezelab.sweep.trials import fit_trials, plan_trials, trial_outcomes

    plan = plan_trials(runs[0], study.max_concurrent, f"study {study.name!r}")
    runs = [_overridden(c, plan.overrides) for c in runs]
    log.info(
        f"fine-tuning: {len(runs)} runs, up to {plan.concurrent} at once, "
        f"{plan.describe(runs[0].scaling.num_workers)}"
    )
    varying = tuple(k for k, values in study.grid.items() if len(values) > 1)
    grid = fit_trials(
        StudyTrials({c.name: c.to_dict() for c in runs}, varying, source_tags()),
        plan,
        {"trial": tune.grid_search([{"name": c.name} for c in runs])},
        name=home.name,
        storage_path=home.storage_path,
        parent_run_id=parent,
        resume=tune.Tuner.can_restore(home.directory),
        epochs=runs[0].epochs,
        count=len(runs),
        kind="study",
    )
    errors = {t["trial"]["name"]: t["error"] for t in trial_outcomes(grid)}
    rows, failed = [], []
    for config in runs:
        row = read_row(config)
        if row is None:
            failed.append((config.name, errors.get(config.name) or "did not finish"))
            log.warning(f"fine-tuning run {config.name} failed: {failed[-1][1]}")
        else:
            rows.append(row)
    return rows, failed


def _on_driver(config: TrainConfig, weights: str | None) -> TrainConfig:
    """A fine-tuning config as its trial runs it: the pretrained weights, and MLflow's
    store as the driver resolves it (a trial's working directory is Ray's, not this
    one)."""
    from freezelab.mlflow.tracking import resolve_tracking_uri

    model = config.model.model_copy(update={"weights": weights})
    uri = resolve_tracking_uri(config.mlflow.tracking_uri)
    tracking = config.mlflow.model_copy(update={"tracking_uri": uri})
    return config.model_copy(update={"model": model, "mlflow": tracking})


def _overridden(config: TrainConfig, overrides: tuple[str, ...]) -> TrainConfig:
    """``config`` with the trial plan's overrides (workers, their resources, threads)."""
    data = config.to_dict()
    for override in overrides:
        apply_override(data, override)
    return validate_config(data, origin=f"run {config.name!r}")


def study_page(uri: str, parent_run_id: str) -> str:
    """Where to read a study in the MLflow UI (with the command that serves a local store)."""
    import mlflow

    from freezelab.mlflow.tracking import ui_page

    experiment_id = mlflow.MlflowClient(tracking_uri=uri).get_run(parent_run_id).info.experiment_id
    page = ui_page(uri, experiment_id)
    if uri.startswith(("http://", "https://")):
        return page
    return f"run `mlflow ui --backend-store-uri {uri}`, then open {page}"


def _register_best(base: TrainConfig, rows: list[dict[str, Any]], groups, name: str) -> None:
    """Register the best run of the best setting: the model the study hands over, with
    the verdict of that setting against each other policy's best setting on the same
    target, as the summary compares them (``mlflow.verdict``)."""
    from freezelab.mlflow.tracking import resolve_tracking_uri
    from freezelab.mlflow.verdict import register_winner

    winner = groups[0]
    members = [r for r in rows if r["run_id"] in winner["run_ids"] and r["model_uri"]]
    if not members:
        log.warning(f"no logged model to register as {name}")
        return
    best = max(members, key=lambda r: r["val_acc"])
    rivals = [
        g
        for g in groups
        if g["best_of_policy"] and g["variant"] == winner["variant"] and g is not winner
    ]
    register_winner(
        resolve_tracking_uri(base.mlflow.tracking_uri),
        best["model_uri"],
        name,
        base.mlflow.alias,
        chosen_by=f"study {base.mlflow.tags.get(STUDY_TAG, base.name)}",
        policy=winner["policy"],
        setting=winner["setting"],
        variant=winner["variant"],
        metric="val_acc",
        values=winner["values"],
        others={g["policy"]: g["values"] for g in rivals},
    )
    log.info(f"registered run {best['run_name']} ({best['label']}) as {name}")


STUDY_COLUMNS = (
    Column("label", "policy [setting]", max_width=48),
    Column("seed"),
    Column("val_acc", fmt="{:.3f}"),
    Column("best_val_acc", "best", fmt="{:.3f}"),
    Column("train_time_s", "train_s", fmt="{:.1f}"),
    Column("wall_time_s", "wall_s", fmt="{:.1f}"),
    Column("trainable_share", "trainable", fmt="{:.1%}"),
    Column("backbone_drift", "drift", fmt="{:.3f}"),
)


def format_study(tag: str, rows: list[dict[str, Any]], groups: list[dict[str, Any]]) -> str:
    """For each target variant: each run, each setting with its interval, the summary
    in words; then one paragraph per consequence of not freezing."""
    from freezelab.report import format_settings
    from freezelab.report.rows import by_variant
    from freezelab.report.summary import summarize_variants

    lines = []
    for variant, members in by_variant(groups).items():
        target = f"the target '{variant}'" if variant else "the target task"
        lines += [
            f"transfer study {tag}: fine-tuning on {target}",
            format_table([r for r in rows if r.get("variant", "") == variant], STUDY_COLUMNS),
            "drift: mean relative L2 change of the backbone's groups from the pretrained weights",
            "",
            "each setting over its seeds (val_acc: the last epoch's, the handed-over model's):",
            format_settings(members),
            "",
        ]
    paragraphs = summarize_variants(groups).split("\n\n")
    return "\n".join(lines + ["\n\n".join(textwrap.fill(p, width=100) for p in paragraphs)])
