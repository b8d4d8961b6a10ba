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

import json
import logging
import os
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from freezelab import objectstore
from freezelab.api import train
from freezelab.console import Column, format_table
from freezelab.errors import ConfigError, FreezelabError
from freezelab.mlflow.tracking import PRETRAIN, STAGE_TAG, VARIANT_TAG
from freezelab.redact import redact_uri
from freezelab.study_config import (
    DEFAULT_STUDY,
    GRID_FORBIDDEN,
    STUDY_TAG,
    StudyConfig,
    finetune_configs,
    grid_points,
    load_study,
    stage_config,
)
from freezelab.study_selection import (
    GROUP_TAG,
    Choice,
    choose,
    format_choices,
    load_choices,
    save_choices,
)
from freezelab.study_trials import STUDY_FILE, study_tag
from freezelab.trainers.config import TrainConfig
from freezelab.trainers.location import RunLocation

log = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_STUDY",
    "GRID_FORBIDDEN",
    "STUDY_TAG",
    "StudyConfig",
    "StudyFailed",
    "StudyOutcome",
    "finetune_configs",
    "format_study",
    "load_study",
    "run_study",
    "stage_config",
]


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
    selecting = []
    if study.select is not None:
        selecting = finetune_configs(study, tag, selecting=True)
        _check_selection(study, finetunes[0])
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
    scalings = {c.scaling.model_dump_json(): c for c in finetunes + selecting}
    for config in scalings.values():
        require_fits(config, f"study {study.name!r}")
    distinct = {
        json.dumps([c.policy.to_dict(), c.data.model_dump(mode="json")]): c
        for c in finetunes + selecting
    }
    for config in distinct.values():
        check_run(config, check_weights=False, storage=False)
    check_run(pretrain)
    log.info(
        f"{'continuing ' if started_before else ''}transfer study {tag}: "
        f"{len(study.variants or [''])} target variants x {len(study.policies)} policies x "
        f"{len(grid_points(study.grid))} grid points x {len(study.seeds)} seeds = "
        f"{len(finetunes)} fine-tuning runs; pretraining {pretrain.model.name} on the source task"
        + (
            f"; first, each policy's own {', '.join(study.select.grid)} chosen on val from "
            f"{len(selecting)} selection runs ({study.select.method})"
            if selecting
            else ""
        )
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

        parent, _ = start_group_run(_parent_config(finetunes[0]), tag, "study")
    source_model = train(pretrain, address=address, parent_run_id=parent).outcome
    log.info(
        f"source model val_acc {source_model.metrics.get('val_acc', float('nan')):.3f}; "
        f"weights {source_model.weights_file}"
    )
    init_ray(address)
    weights = source_model.weights_file
    base = finetunes[0]
    choices = _choices(study, home, weights, parent) if study.select is not None else None
    if choices is not None:
        finetunes = finetune_configs(study, tag, chosen=choices)
    runs = [_on_driver(c, weights) for c in finetunes]
    rows, failed = _fine_tune(study, home, runs, parent) if runs else ([], [])
    if choices is not None:
        labels = _group_labels(choices)
        failed = [(labels[g], c.note) for g, c in choices.items() if c.point is None] + failed
        for row in rows:
            row["selected"] = choices[row["select_group"]].describe(study.select)
    if not rows:
        if parent is not None:
            from freezelab.mlflow.sweep import fail_group_run

            fail_group_run(base, parent)
        raise StudyFailed(
            f"study {tag}: none of its {len(runs) or len(failed)} fine-tuning runs finished. "
            f"First error: {failed[0][1]}"
        )
    groups = group_rows(rows)
    print(format_study(tag, rows, groups))
    if study.register_best_as and parent is not None:
        _register_best(base, rows, groups, study.register_best_as)
    if parent is not None:
        from freezelab.mlflow.sweep import finish_study_run
        from freezelab.mlflow.tracking import resolve_tracking_uri
        from freezelab.report import build_report
        from freezelab.report.description import (
            study_description,
            summary_markdown,
            variant_winners,
        )

        uri = resolve_tracking_uri(base.mlflow.tracking_uri)
        _save_view(uri, parent, tag, groups)
        report = build_report(parent, out_dir=Path("freezelab_reports") / tag, tracking_uri=uri)
        finish_study_run(
            base,
            parent,
            variant_winners(report.settings),
            study_description(report.settings, report.summary),
            summary_markdown(f"transfer study {tag}", report.settings, report.summary),
            rows,
        )
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
    log.info(f"fine-tuning: {len(runs)} runs")
    found, outcomes = _fit_trials(study, home.name, home.storage_path, runs, parent)
    rows, failed = [], []
    for config in runs:
        row = found[config.name]
        if row is None:
            failed.append(
                (config.name, outcomes.get(config.name, {}).get("error") or "did not finish")
            )
            log.warning(f"fine-tuning run {config.name} failed: {failed[-1][1]}")
        else:
            rows.append({**row, "select_group": config.mlflow.tags.get(GROUP_TAG)})
    return rows, failed


def _fit_trials(
    study: StudyConfig,
    name: str,
    storage_path: str,
    runs: list[TrainConfig],
    parent: str | None,
    scheduler: Any = None,
    groups: dict[str, str] | None = None,
) -> tuple[dict[str, dict[str, Any] | None], dict[str, dict[str, Any]]]:
    """``runs`` as the Tune experiment ``name`` (``study_trials.fit_runs``)."""
    from freezelab.study_trials import fit_runs

    varying = tuple(k for k, values in study.grid.items() if len(values) > 1)
    if study.select is not None:
        varying += tuple(study.select.grid)
    return fit_runs(
        runs,
        name,
        storage_path,
        parent,
        group=f"study {study.name!r}",
        kind="study",
        varying=varying,
        max_concurrent=study.max_concurrent,
        scheduler=scheduler,
        groups=groups,
    )


def _choices(
    study: StudyConfig, home: RunLocation, weights: str | None, parent: str | None
) -> dict[str, Choice]:
    """Each group's choice: made by the selection stage once, then read from the study's
    folder (a resumed study does not choose again); printed either way."""
    choices = load_choices(home)
    if choices is None:
        choices = _select(study, home, weights, parent)
        save_choices(home, choices)
    else:
        log.info("selection: made before, read from the study's folder")
    print(f"each policy's own {', '.join(study.select.grid)}, chosen on val_acc:")
    print(format_choices(choices, study.select, _group_labels(choices)))
    return choices


def _select(
    study: StudyConfig, home: RunLocation, weights: str | None, parent: str | None
) -> dict[str, Choice]:
    """The selection stage: each group's runs over ``select.grid``, successive halving
    within the group (``method: asha``), then each group's choice, printed."""
    from freezelab.mlflow.sweep import close_stopped_run
    from freezelab.sweep.schedulers import GroupedASHA, GroupOf

    select = study.select
    configs = [_on_driver(c, weights) for c in finetune_configs(study, home.name, selecting=True)]
    members: dict[str, list[TrainConfig]] = {}
    for config in configs:
        members.setdefault(config.mlflow.tags[GROUP_TAG], []).append(config)
    # Each group's first value (the middle of the grid) in every group, then the second:
    # a group's later values meet rungs its first value has already set.
    depth = max(len(m) for m in members.values())
    ordered = [m[i] for i in range(depth) for m in members.values() if i < len(m)]
    epochs = configs[0].epochs
    scheduler = None
    if select.method == "asha":
        scheduler = GroupedASHA(
            GroupOf("group"),
            max_t=epochs,
            grace_period=select.grace_epochs,
            reduction_factor=select.reduction_factor,
        )
    log.info(
        f"selection: {len(ordered)} runs over {', '.join(select.grid)} in {len(members)} groups"
        + (f", compared at epochs {scheduler.rungs()}" if scheduler else "")
    )
    rows, outcomes = _fit_trials(
        study,
        f"{home.name}-select",
        home.storage_path,
        ordered,
        parent,
        scheduler,
        {c.name: c.mlflow.tags[GROUP_TAG] for c in ordered},
    )
    for config in ordered:
        outcome = outcomes.get(config.name, {})
        if rows[config.name] is None and outcome and not outcome.get("error"):
            close_stopped_run(
                config, outcome["epochs"], "successive halving: behind its group at a rung"
            )
    return choose(members, rows, outcomes, epochs)


def _group_labels(choices: dict[str, Choice]) -> dict[str, str]:
    """Each selection group as the table names it: the variant, the policy, its grid point."""
    from freezelab.policies import from_dict

    labels = {}
    for group in choices:
        variant, policy, point = json.loads(group)
        values = " ".join(f"{k.rsplit('.', 1)[-1]}={v}" for k, v in point.items())
        labels[group] = " ".join(filter(None, [variant, from_dict(policy).label(), values]))
    return labels


def _check_selection(study: StudyConfig, config: TrainConfig) -> None:
    """A selection that can compare: its first rung before the last epoch."""
    if study.select.method == "asha" and study.select.grace_epochs >= config.epochs:
        raise ConfigError(
            f"study {study.name!r}: select.grace_epochs {study.select.grace_epochs} must be "
            f"below the fine-tuning runs' epochs ({config.epochs})"
        )


def _on_driver(config: TrainConfig, weights: str | None) -> TrainConfig:
    """A fine-tuning config as its trial runs it: the pretrained weights, and MLflow's
    store as the driver resolves it (a trial's working directory is Ray's, not this
    one)."""
    from freezelab.mlflow.tracking import resolve_tracking_uri

    model = config.model.model_copy(update={"weights": weights})
    uri = resolve_tracking_uri(config.mlflow.tracking_uri)
    tracking = config.mlflow.model_copy(update={"tracking_uri": uri})
    return config.model_copy(update={"model": model, "mlflow": tracking})


def _parent_config(config: TrainConfig) -> TrainConfig:
    """The config the study's parent run is opened with: a fine-tuning run's, without
    the tags that describe that one run (its variant, label, selection group), so that
    grouping the runs table by variant never puts the parent inside a variant."""
    from freezelab.study_config import LABEL_TAG
    from freezelab.study_selection import POINT_TAG

    own = {VARIANT_TAG, LABEL_TAG, GROUP_TAG, POINT_TAG}
    tags = {k: v for k, v in config.mlflow.tags.items() if k not in own}
    return config.model_copy(update={"mlflow": config.mlflow.model_copy(update={"tags": tags})})


def _save_view(uri: str, parent_run_id: str, tag: str, groups: list[dict[str, Any]]) -> None:
    """Save the runs table the study's page opens on (``mlflow.views``)."""
    import mlflow

    from freezelab.mlflow.views import save_study_view, study_view, view_key

    client = mlflow.MlflowClient(tracking_uri=uri)
    experiment_id = client.get_run(parent_run_id).info.experiment_id
    variants = any(g["variant"] for g in groups)
    try:
        save_study_view(
            client, experiment_id, view_key(tag), study_view(tag, groups[0]["metric"], variants)
        )
    except Exception as err:  # the page then opens on the experiment's runs, unsorted
        log.warning(f"MLflow: the study's view of its runs was not saved: {err}")


def study_page(uri: str, parent_run_id: str) -> str:
    """Where to read a study in the MLflow UI (with the command that serves a local
    store): its fine-tuning runs by target variant, best first, with their cost
    (the view ``_save_view`` saved), else the experiment's runs."""
    import mlflow

    from freezelab.mlflow.tracking import ui_page
    from freezelab.mlflow.views import has_view, view_key

    client = mlflow.MlflowClient(tracking_uri=uri)
    parent = client.get_run(parent_run_id)
    experiment_id = parent.info.experiment_id
    key = view_key(parent.data.tags.get(STUDY_TAG, ""))
    page = ui_page(uri, experiment_id, view=key if has_view(client, experiment_id, key) else None)
    if uri.startswith(("http://", "https://")):
        return page
    return f"run `mlflow ui --backend-store-uri {uri}`, then open {page}"


def _register_best(base: TrainConfig, rows: list[dict[str, Any]], groups, name: str) -> None:
    """Register the best run of the best setting: the model the study hands over, with
    the verdict of that setting against each other policy's best setting on the same
    target, as the summary compares them (``mlflow.verdict``)."""
    from freezelab.mlflow.tracking import resolve_tracking_uri
    from freezelab.mlflow.verdict import register_winner

    winner = next(g for g in groups if g["best_of_policy"])
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
        study=base.mlflow.tags.get(STUDY_TAG, ""),
        policy=winner["policy"],
        setting=winner["setting"],
        variant=winner["variant"],
        metric=winner["metric"],
        values=winner["values"],
        others={g["policy"]: g["values"] for g in rivals},
    )
    log.info(f"registered run {best['run_name']} ({best['label']}) as {name}")


STUDY_COLUMNS = (
    Column("label", "policy [setting]", max_width=48),
    Column("seed"),
    Column("val_acc", fmt="{:.3f}"),
    Column("test_acc", fmt="{:.3f}"),
    Column("best_val_acc", "best", fmt="{:.3f}"),
    Column("train_time_s", "train_s", fmt="{:.1f}"),
    Column("wall_time_s", "wall_s", fmt="{:.1f}"),
    Column("trainable_share", "trainable", fmt="{:.1%}"),
    Column("backbone_drift", "drift", fmt="{:.3f}"),
    Column("diverged", "", fmt=lambda d: "DIVERGED" if d else ""),
)


def format_study(tag: str, rows: list[dict[str, Any]], groups: list[dict[str, Any]]) -> str:
    """For each target variant: each run, each setting with its interval, the summary
    in words; then one paragraph per consequence of not freezing."""
    from freezelab.report import format_settings
    from freezelab.report.rows import by_variant, diverged_rows
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
    paragraphs = summarize_variants(groups, diverged_rows(rows)).split("\n\n")
    return "\n".join(lines + ["\n\n".join(textwrap.fill(p, width=100) for p in paragraphs)])
