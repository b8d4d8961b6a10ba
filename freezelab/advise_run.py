"""``freezelab advise`` put in order: read and check the input, size the search to the
budget, run its two stages as Ray Tune trials (``freezelab.advise.search``), measure
the signals that explain the ranking, and log it all under one MLflow run.

Everything that can be wrong with the input fails before Ray starts, an MLflow run or a
file is created, in one line: the config or sweep file, the model and its weights, the
data, ``samples``, the budget and the rates, every candidate policy against the model
for every epoch, and a tracking server that must be reachable.

>>> outcome = run_advise("examples/train_tiny.yaml")  # doctest: +SKIP
>>> outcome.advice.recommended.policy.label(), outcome.run_id  # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from freezelab.advise.advice import Advice
from freezelab.advise.candidates import default_candidates, distinct_valid
from freezelab.advise.measure import DEFAULT_SAMPLES, MIN_SAMPLES
from freezelab.advise.search import (
    DEFAULT_BUDGET,
    AdviseError,
    Ranked,
    SearchPlan,
    default_rates,
    plan_search,
    rank_candidates,
    survivors_of,
    tied_with_winner,
)
from freezelab.policies import FreezePolicy, from_dict
from freezelab.trainers.config import TrainConfig, deep_merge, validate_config

log = logging.getLogger(__name__)

# What a search run leaves out: measurements the ranking does not read, and the model.
QUIET = {
    "data": {"eval_shifts": [], "eval_sets": {}},
    "metrics": {"gradients": False},
    "forgetting": {"source": None},
    "mlflow": {"log_model": False},
}


@dataclass(frozen=True)
class AdviseOutcome:
    advice: Advice
    config: TrainConfig
    run_id: str | None = None
    experiment_id: str | None = None


@dataclass(frozen=True)
class Prepared:
    """What advise will do, every check passed and nothing created."""

    config: TrainConfig
    candidates: list[FreezePolicy]
    origin: str  # "default" or "sweep NAME"
    plan: SearchPlan
    step_flops: dict[str, float]  # per candidate label: FLOPs of one training step


def prepare(
    path: str | Path,
    *,
    samples: int = DEFAULT_SAMPLES,
    overrides: list[str] | None = None,
    budget: float = DEFAULT_BUDGET,
    rates: list[float] | None = None,
) -> Prepared:
    """The config to search on, the candidates (validated), where they came from, and
    the search sized to the budget: every check, nothing created."""
    from freezelab.advise.costs import policy_profile
    from freezelab.config_io import config_kind
    from freezelab.trainers.config import load_config
    from freezelab.trainers.data import build_datasets, input_size_of, num_classes_of
    from freezelab.trainers.models import build_unallocated
    from freezelab.trainers.preflight import check_run

    if samples < 2:
        raise AdviseError(f"--samples {samples}: at least 2 images are needed")
    policies: list[FreezePolicy] | None = None
    if config_kind(path) == "sweep":
        from freezelab.sweep.space import load_sweep, validate_space

        sweep = load_sweep(path, overrides)
        validate_space(sweep)  # every policy the space can produce, against the model
        entries = _sweep_policies(sweep)
        config = sweep.trial_config(entries[0], {}, f"{sweep.name}-advise")
        policies, origin = [from_dict(e) for e in entries], f"sweep {sweep.name}"
        if sweep.space.params:
            # advise searches the rates itself (--rates); the sweep's other params stay
            # at the base config's values.
            log.warning(
                f"advise: the sweep's params ({', '.join(sweep.space.params)}) are not searched: "
                "each candidate is tried at --rates, with the base config's other values"
            )
    else:
        config, origin = load_config(path, overrides=overrides), "default"
    if config.data.loader == "ray_data":
        raise AdviseError(
            "data.loader: ray_data: advise's short runs read a fresh share of the images each "
            "epoch, which the torch loader does; set data.loader: torch (or auto) for advise"
        )
    # The config's own policy is not advise's business: check the rest as training would.
    check_run(config.model_copy(update={"policy": from_dict({"type": "full"})}))
    classes = num_classes_of(config.data)
    if samples < classes:
        raise AdviseError(
            f"--samples {samples}: the data has {classes} classes, and LogME needs at least "
            "one image of each"
        )
    if samples < MIN_SAMPLES:
        raise AdviseError(
            f"--samples {samples}: the signals need at least {MIN_SAMPLES} images (two "
            "gradient batches of two)"
        )
    model = build_unallocated(config)
    if policies is None:
        candidates = default_candidates(model, config.epochs)
    else:
        candidates = distinct_valid(model, policies, config.epochs)
    rates = list(rates) if rates else list(default_rates(config.optimizer.lr))
    if len(set(rates)) != len(rates):
        raise AdviseError(f"--rates {rates}: rates repeat")
    # The training set's size (the budget counts its images) and each candidate's step.
    data = config.data.model_copy(update={"eval_shifts": (), "eval_sets": {}})
    train_set, _, _ = build_datasets(data, model)
    batch_shape = (config.batch_size, *input_size_of(data, model))
    cache: dict[frozenset[str], int] = {}
    step_flops = {
        p.label(): policy_profile(model, p, config.epochs, batch_shape, cache).flops_per_step
        for p in candidates
    }
    plan = plan_search(
        list(step_flops.values()),
        train_images=len(train_set),
        batch_size=config.batch_size,
        epochs=config.epochs,
        classes=classes,
        rates=rates,
        budget=budget,
    )
    # A search run's config, validated as each will be: what the search adds to the
    # config (data.epoch_fraction) must hold for it (not with Ray Data, say).
    _run_config(config, plan, "advise", candidates[0], plan.rates[0], config.seed, "check")
    return Prepared(config, candidates, origin, plan, step_flops)


def _sweep_policies(sweep: Any) -> list[dict[str, Any]]:
    """The sweep's candidate policies: every policy of its grid, or where a field is a
    float range, the ends of the range."""
    try:
        return sweep.space.grid_policies()
    except ValueError:
        log.info("advise: the sweep has float ranges; ranking the ends of each range")
        return sweep.space.extreme_policies()


def run_advise(
    path: str | Path,
    *,
    samples: int = DEFAULT_SAMPLES,
    overrides: list[str] | None = None,
    address: str | None = None,
    budget: float = DEFAULT_BUDGET,
    rates: list[float] | None = None,
) -> AdviseOutcome:
    """Check and size, then search (Tune trials on the Ray at ``address``, else a local
    one), measure the signals, and log the advice as an MLflow run with the search runs
    nested under it when the config tracks."""
    import ray

    from freezelab.mlflow.tracked import tracking_available
    from freezelab.trainers.launch import init_ray

    prepared = prepare(path, samples=samples, overrides=overrides, budget=budget, rates=rates)
    config, plan = prepared.config, prepared.plan
    tracking = tracking_available(config)  # an unreachable required server fails here
    log.info(
        f"advise: {config.model.name} on {config.data.kind} data, {plan.candidates} candidate "
        f"policies ({prepared.origin}); {plan.describe()}"
    )
    started = time.perf_counter()
    ray_was_up = ray.is_initialized()
    init_ray(address)
    parent = experiment_id = None
    try:
        if tracking:
            from freezelab.mlflow.advice import start_advice_run

            parent, experiment_id = start_advice_run(config)
        try:
            advice = _search(prepared, parent, samples, started, address)
        except BaseException:
            if parent is not None:
                from freezelab.mlflow.advice import fail_advice_run

                fail_advice_run(config, parent)
            raise
        if parent is not None:
            from freezelab.mlflow.advice import finish_advice_run

            finish_advice_run(config, parent, advice, candidates_from=prepared.origin)
    finally:
        if not ray_was_up and ray.is_initialized():
            ray.shutdown()
    return AdviseOutcome(advice, config, parent, experiment_id)


def advise_tag(prepared: Prepared) -> str:
    """The search's name: the config, the candidates, the plan and when it started."""
    identity = {
        "config": prepared.config.to_dict(),
        "candidates": [p.to_dict() for p in prepared.candidates],
        "plan": prepared.plan.to_dict(),
    }
    digest = hashlib.sha1(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:8]
    # A new search each time: a resumed one would restart its interrupted runs from
    # their first epoch outside the budget that the scheduler counted.
    return f"advise-{prepared.config.name}-{digest}-{time.strftime('%Y%m%d-%H%M%S')}"


def _search(
    prepared: Prepared, parent: str | None, samples: int, started: float, address: str | None
) -> Advice:
    """Stage 1 (each candidate at each rate, successive halving within the candidate),
    stage 2 (the survivors under more seeds), the ranking, then the signals."""
    from freezelab.mlflow.sweep import close_stopped_run
    from freezelab.study_selection import GROUP_TAG, choose
    from freezelab.study_trials import fit_runs
    from freezelab.sweep.schedulers import GroupedASHA, GroupOf

    config, plan = prepared.config, prepared.plan
    tag = advise_tag(prepared)
    keys = {p.label(): _key(p) for p in prepared.candidates}
    by_key = {keys[p.label()]: p for p in prepared.candidates}
    # Each candidate's first rate (the middle one) in every candidate, then the second:
    # a candidate's later rates meet the rungs its first rate has set.
    ordered_rates = sorted(
        plan.rates, key=lambda r: abs(plan.rates.index(r) - (len(plan.rates) - 1) / 2)
    )
    search = [
        _run_config(config, plan, tag, p, lr, config.seed, keys[p.label()])
        for lr in ordered_rates
        for p in prepared.candidates
    ]
    members: dict[str, list[TrainConfig]] = {}
    for run in search:
        members.setdefault(run.mlflow.tags[GROUP_TAG], []).append(run)
    scheduler = GroupedASHA(
        GroupOf("group"),
        max_t=plan.epochs,
        grace_period=plan.grace_epochs,
        reduction_factor=3,
        group_epochs=plan.group_epochs,
    )
    log.info(f"advise, stage 1: {len(search)} runs, {len(members)} candidates")
    rows, outcomes = fit_runs(
        search,
        f"{tag}-search",
        config.storage_path,
        parent,
        group="advise",
        kind="advise search",
        varying=("optimizer.lr",),
        scheduler=scheduler,
        groups={c.name: c.mlflow.tags[GROUP_TAG] for c in search},
    )
    for run in search if parent is not None else []:
        outcome = outcomes.get(run.name, {})
        if rows[run.name] is None and outcome and not outcome.get("error"):
            close_stopped_run(run, outcome["epochs"], "advise: behind its candidate at a rung")
    spent = {key: 0.0 for key in by_key}
    for run in search:
        spent[run.mlflow.tags[GROUP_TAG]] += _flops(outcomes.get(run.name))
    choices = choose(members, rows, outcomes, plan.epochs)
    chosen: dict[str, Ranked] = {}
    for key, choice in choices.items():
        healthy = choice.point is not None and not choice.note
        tried = [
            {
                "lr": c["point"]["optimizer.lr"],
                "epochs": c["epochs"],
                "val_acc": None if math.isnan(c["val_acc"]) else c["val_acc"],
                "note": c.get("diverged") or c.get("error") or "",
            }
            for c in choice.candidates
        ]
        chosen[key] = Ranked(
            policy=by_key[key],
            lr=choice.point["optimizer.lr"] if choice.point else None,
            values=[choice.val_acc] if healthy else [],
            stage="searched" if healthy else "none",
            tried=sorted(tried, key=lambda t: t["lr"]),
            diverged=[
                f"lr={c['point']['optimizer.lr']:g}: {c['diverged']}"
                for c in choice.candidates
                if c.get("diverged")
            ],
            flops=spent[key],
            note=choice.note,
        )
    survivors = survivors_of(chosen, plan.survivors)
    confirm = [
        _run_config(config, plan, tag, by_key[k], chosen[k].lr, config.seed + s, k)
        for s in range(1, plan.confirm_seeds + 1)
        for k in survivors
    ]
    if confirm:
        log.info(
            f"advise, stage 2: {', '.join(by_key[k].label() for k in survivors)} under "
            f"{plan.confirm_seeds} more seeds"
        )
        rows2, outcomes2 = fit_runs(
            confirm,
            f"{tag}-confirm",
            config.storage_path,
            parent,
            group="advise",
            kind="advise confirm",
            varying=("optimizer.lr",),
        )
        for run in confirm:
            key, row = run.mlflow.tags[GROUP_TAG], rows2[run.name]
            chosen[key].flops += _flops(outcomes2.get(run.name))
            if row is None:
                error = outcomes2.get(run.name, {}).get("error") or "did not finish"
                chosen[key].diverged.append(f"seed {run.seed}: failed: {error}")
            elif row.get("diverged"):
                chosen[key].diverged.append(f"seed {run.seed}: {row.get('diverged_reason')}")
            else:
                chosen[key].values.append(row["val_acc"])
    for key in survivors:
        # Confirmed: more than its one search run, which was the best of its rates and so
        # flattered. A survivor whose every confirmation run failed or diverged keeps its
        # search run, ranked with those never confirmed, its notes naming the runs.
        if len(chosen[key].values) >= 2:
            chosen[key].stage = "confirmed"
    ranking = rank_candidates(chosen)
    tied = tied_with_winner(ranking)
    search_s = time.perf_counter() - started
    signals = _signals(config, samples, remote=address is not None)
    return Advice(
        model=config.model.name,
        ranking=ranking,
        tied=tied,
        plan=plan,
        spent_flops=sum(r.flops for r in ranking),
        signals=signals,
        search_s=search_s,
        time_s=time.perf_counter() - started,
        runs=len(search) + len(confirm),
    )


def _signals(config: TrainConfig, samples: int, *, remote: bool) -> Any:
    """The signals that explain the ranking, measured here, or on one Ray worker of the
    cluster (where the data and the weights are) when advise joined one."""
    from freezelab.advise.measure import measure_signals

    if not remote:
        return measure_signals(config, samples=samples)
    import ray

    task = ray.remote(num_cpus=1)(_remote_signals)
    return ray.get(task.remote(config.to_dict(), samples))


def _remote_signals(config: dict[str, Any], samples: int) -> Any:
    from freezelab.advise.measure import measure_signals

    return measure_signals(validate_config(config), samples=samples)


def _key(policy: FreezePolicy) -> str:
    return json.dumps(policy.to_dict(), sort_keys=True)


def _flops(outcome: dict[str, Any] | None) -> float:
    """The FLOPs a run trained, as its last report to Tune counted them."""
    return float((outcome or {}).get("metrics", {}).get("train_flops", 0.0))


def _run_config(
    config: TrainConfig,
    plan: SearchPlan,
    tag: str,
    policy: FreezePolicy,
    lr: float,
    seed: int,
    key: str,
) -> TrainConfig:
    """One search run: ``config`` with the candidate, the rate, the seed, the share of
    the images per epoch, tagged with its candidate and rate."""
    from freezelab.mlflow.tracking import ADVISE, STAGE_TAG, resolve_tracking_uri
    from freezelab.report.runs import SELECTED_TAG
    from freezelab.study_selection import GROUP_TAG

    data = config.to_dict()
    data = deep_merge(data, QUIET)
    stage = "confirm" if seed != config.seed else "search"
    data.update(
        {
            "name": f"{tag}-{policy.slug()}-lr{lr:g}-seed{seed}",
            "policy": policy.to_dict(),
            "seed": seed,
        }
    )
    data["optimizer"]["lr"] = lr
    if plan.epoch_fraction < 1:
        data["data"]["epoch_fraction"] = plan.epoch_fraction
    # One checkpoint, at the end: a short run restarts rather than resumes.
    data["checkpoint"] = {**data.get("checkpoint", {}), "every": config.epochs}
    data["mlflow"]["tracking_uri"] = resolve_tracking_uri(config.mlflow.tracking_uri)
    data["mlflow"]["run_name"] = f"advise {stage} {policy.label()} lr={lr:g} seed={seed}"
    data["mlflow"]["tags"] = {
        **data["mlflow"].get("tags", {}),
        STAGE_TAG: ADVISE,
        GROUP_TAG: key,
        SELECTED_TAG: json.dumps({"optimizer.lr": lr}),
    }
    return validate_config(data, origin=f"advise run {data['name']!r}")
