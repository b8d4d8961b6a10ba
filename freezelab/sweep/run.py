"""Run a sweep on Ray Tune: each trial is a Tune function that fits a ``TorchTrainer``
and forwards its reports with Ray's ``TuneReportCallback`` (the Train V2 way: no
trainer is passed to the Tuner).

>>> from freezelab.sweep.space import load_sweep
>>> outcome = run_sweep(load_sweep("examples/sweep_tiny.yaml"))  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import random
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import yaml

from freezelab import objectstore
from freezelab.console import Column, format_table
from freezelab.env import verbose
from freezelab.errors import ConfigError, FreezelabError
from freezelab.policies import from_dict
from freezelab.redact import redact_text, redact_uri
from freezelab.sweep.space import SweepConfig, is_range, validate_space
from freezelab.trainers.launch import init_ray, worker_env_vars, worker_resources
from freezelab.trainers.location import RunLocation
from freezelab.trainers.preflight import check_storage

log = logging.getLogger(__name__)

RESULT_COLUMNS = (
    "policy",
    "metric",
    "best_val_acc",
    "epochs",
    "stopped_early",
    "time_s",
    "run_name",
)


@dataclass(frozen=True)
class SweepOutcome:
    rows: list[dict[str, Any]]
    best_policy: dict[str, Any]
    best_params: dict[str, Any]
    directory: str
    parent_run_id: str | None
    failed: int = 0  # trials that ended with an error
    best_row: dict[str, Any] | None = None  # the best run of the best setting


def run_sweep(
    sweep: SweepConfig, *, resume: bool = False, address: str | None = None
) -> SweepOutcome:
    from ray import tune

    from freezelab.sweep.progress import TrialProgress

    validate_space(sweep)  # every policy the space can produce, before any trial starts
    base = sweep.trial_config(sweep.space.extreme_policies()[0], {}, f"{sweep.name}-base")
    # A bucket that does not exist or cannot be written fails here, in one line.
    check_storage(base.storage_path)
    directory = RunLocation(base.storage_path, sweep.name).directory
    if resume and not tune.Tuner.can_restore(directory):
        raise ConfigError(f"sweep {sweep.name!r}: nothing to resume at {redact_uri(directory)}")
    if not resume and tune.Tuner.can_restore(directory):
        raise ConfigError(
            f"sweep {sweep.name!r} already exists at {redact_uri(directory)}: pass --resume to continue it, "
            "or choose another name"
        )
    init_ray(address)

    pin_to = _check_cluster(base)
    # On a cluster whose MLflow file pins trials to one node, workers go anywhere.
    local = in_process(base) and pin_to is None
    trial_resources, concurrent, per_worker = trial_resources_for(sweep, base, local)
    if local:
        # One CPU worker: the trial's own process trains (num_workers: 0), with no Train
        # controller and worker group to start per trial.
        overrides = ["scaling.num_workers=0"]
    else:
        overrides = [
            f"scaling.resources_per_worker={json.dumps(per_worker)}",
            # Trials run in processes of their own: the driver's network settings
            # (GLOO_SOCKET_IFNAME, ...) reach their workers through the config.
            f"scaling.env_vars={json.dumps(worker_env_vars(base))}",
        ]
    sweep = sweep.model_copy(update={"overrides": [*sweep.overrides, *overrides]})
    parent = _start_parent(sweep, base)
    from freezelab.mlflow.tracking import source_tags

    trainable = tune.with_resources(
        tune.with_parameters(
            _trial,
            sweep_dict=sweep.model_dump(mode="json"),
            parent_run_id=parent,
            source=source_tags(),
        ),
        _on_node(trial_resources, pin_to) if pin_to else trial_resources,
    )
    param_space, search_alg, num_samples = _search(sweep)
    scheduler = None
    if sweep.asha is not None:
        scheduler = tune.schedulers.ASHAScheduler(
            time_attr="training_iteration",
            max_t=base.epochs,
            grace_period=sweep.asha.grace_period,
            reduction_factor=sweep.asha.reduction_factor,
        )
    grid = param_space.get("trial", {})
    trials = (
        len(grid["grid_search"])
        if isinstance(grid, dict) and "grid_search" in grid
        else num_samples
    )
    if resume:
        log.info(f"resuming sweep {sweep.name!r} from {redact_uri(directory)}")
        tuner = tune.Tuner.restore(
            directory, trainable, resume_errored=True, param_space=param_space
        )
    else:
        tuner = tune.Tuner(
            trainable,
            param_space=param_space,
            tune_config=tune.TuneConfig(
                metric=sweep.metric,
                mode=sweep.mode,
                search_alg=search_alg,
                scheduler=scheduler,
                num_samples=num_samples,
                max_concurrent_trials=concurrent,
            ),
            run_config=tune.RunConfig(
                name=sweep.name,
                storage_path=base.storage_path,
                # freezelab's display of the trials; Tune's own tables with -v.
                callbacks=[
                    TrialProgress(sweep.name, trials, base.epochs, _trial_label, _error_line)
                ],
                verbose=1 if verbose() else 0,
            ),
        )
    each = (
        f"each trial {trial_resources}, training in its own process"
        if local
        else f"each trial {trial_resources} + {base.scaling.num_workers} worker(s) x {per_worker}"
    )
    log.info(
        f"sweep {sweep.name!r}: {sweep.algorithm}, {trials} trial(s), up to "
        f"{concurrent} at once, {each}"
    )
    with _quiet_tune():
        grid = tuner.fit()
    rows = result_rows(grid, sweep, base.epochs)
    print(format_results(rows, sweep))
    if parent is not None:
        _finish_stopped_trials(rows, sweep)
    # The best comes only from trials that finished with the metric; rows are sorted by
    # the last reported value, the one of the model each trial hands over.
    finished = [r for r in rows if r["error"] is None and r["metric"] is not None]
    failed = [r for r in rows if r["error"] is not None]
    if not finished:
        _fail_parent(base, parent)
        first = failed[0]["error"] if failed else f"no trial reported {sweep.metric!r}"
        raise SweepFailed(
            f"sweep {sweep.name!r}: none of its {len(rows)} trial(s) finished; no best policy "
            f"written. First error: {first}"
        )
    best = _best_row(finished, sweep)
    best_params = {k: v for k, v in best["params"].items() if k != "seed"}
    outcome = SweepOutcome(
        rows, best["policy"], best_params, directory, parent, len(failed), best_row=best
    )
    _write_best(outcome, sweep)
    _finish_parent(sweep, base, outcome)
    if failed:
        log.warning(
            f"{len(failed)} of {len(rows)} trial(s) failed (their errors above); "
            "the best policy comes from the trials that finished"
        )
    log.info(
        "best policy (paste as `policy:` into a train config), also in "
        f"{redact_uri(directory)}/best_policy.yaml:"
    )
    print(yaml.safe_dump({"policy": outcome.best_policy}, sort_keys=False).rstrip())
    return outcome


@contextlib.contextmanager
def _quiet_tune() -> Iterator[None]:
    """Tune's own console output only with -v: its trial tables and its experiment header
    (printed by its newer console output at any verbosity, so the older one is chosen,
    which is silent at verbosity 0) and its INFO lines."""
    if verbose():
        yield
        return
    saved = os.environ.get("RAY_AIR_NEW_OUTPUT")
    tune_logger = logging.getLogger("ray.tune")
    level = tune_logger.level
    os.environ["RAY_AIR_NEW_OUTPUT"] = "0"
    tune_logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        tune_logger.setLevel(level)
        if saved is None:
            os.environ.pop("RAY_AIR_NEW_OUTPUT", None)
        else:
            os.environ["RAY_AIR_NEW_OUTPUT"] = saved


class SweepFailed(FreezelabError):
    """Every trial of a sweep failed: there is no best policy."""

    exit_code = 1


def _finish_stopped_trials(rows: list[dict[str, Any]], sweep: SweepConfig) -> None:
    """Close the MLflow runs of trials that Tune stopped (ASHA at a rung, or at max_t as
    the last epoch reports) before their own end could log the model and the status:
    from each trial's last checkpoint, as ``freezelab sync`` does. An early-stopped
    trial ends KILLED, with its model all the same."""
    from freezelab.mlflow.sync import finish_from_checkpoint

    for row in rows:
        if row["error"] is not None:
            continue
        config = tracked_trial_config(sweep, {"policy": row["policy"], "params": row["params"]})
        try:
            finish_from_checkpoint(
                config,
                status="KILLED" if row["stopped_early"] else "FINISHED",
                only_if_running=True,
            )
        except Exception as err:  # the sweep's results stand without this run's model
            log.warning(f"MLflow run of trial {row['run_name']} not closed: {err}")


def _fail_parent(base, parent_run_id: str | None) -> None:
    if parent_run_id is not None:
        from freezelab.mlflow.sweep import fail_group_run

        fail_group_run(base, parent_run_id)


def trial_run_name(sweep_name: str, choice: dict[str, Any]) -> str:
    """Stable per trial config: a retried trial resumes its Train run."""
    digest = hashlib.sha1(json.dumps(choice, sort_keys=True).encode()).hexdigest()[:10]
    return f"{sweep_name}-{choice['policy']['type']}-{digest}"


def trial_label(choice: dict[str, Any]) -> str:
    """A trial's MLflow run name: its policy's label and its params' values, as in
    ``lp_ft(probe_epochs=3) lr=0.01``."""
    label = from_dict(choice["policy"]).label()
    values = " ".join(f"{k.rsplit('.', 1)[-1]}={v}" for k, v in sorted(choice["params"].items()))
    return f"{label} {values}".strip()


def _trial_label(trial_config: dict[str, Any]) -> str:
    return trial_label(_choice(trial_config))


def tracked_trial_config(
    sweep: SweepConfig, choice: dict[str, Any], source: dict[str, str] | None = None
) -> Any:
    """A trial's train config as tracked: its MLflow run named by its policy and params,
    tagged as a trial, with the driver's user and command (``source``: a trial's
    process is a Ray worker, which has none of its own)."""
    from freezelab.mlflow.tracking import STAGE_TAG

    config = sweep.trial_config(
        choice["policy"], choice["params"], trial_run_name(sweep.name, choice)
    )
    tags = {**(source or {}), **config.mlflow.tags, STAGE_TAG: "trial"}
    section = {"tags": tags, "run_name": config.mlflow.run_name or trial_label(choice)}
    return config.model_copy(update={"mlflow": config.mlflow.model_copy(update=section)})


def _trial(
    trial_config: dict[str, Any],
    sweep_dict: dict[str, Any],
    parent_run_id: str | None,
    source: dict[str, str] | None = None,
) -> None:
    from ray.tune.integration.ray_train import TuneReportCallback

    from freezelab.mlflow.run import train_tracked

    sweep = SweepConfig.model_validate(sweep_dict)
    choice = _choice(trial_config)
    config = tracked_trial_config(sweep, choice, source)
    # In the trial's own process the loop reports to Tune from this thread, each report
    # taken before the next epoch; Ray's callback would queue them for the session, and
    # a report queued last could be lost when the function returns.
    forward = _TuneReport() if config.scaling.num_workers == 0 else TuneReportCallback()
    # The sweep checked the space and the cluster once, before its first trial.
    # The sweep's driver shows the trials' progress, from what Tune receives.
    outcome = train_tracked(
        config,
        callbacks=[forward],
        parent_run_id=parent_run_id,
        swept=tuple(choice["params"]),
        progress=False,
    ).outcome
    if outcome.already_complete:
        # A retried or resumed trial whose Train run had finished: replay its epochs.
        from ray import tune

        for metrics in outcome.history:
            tune.report(metrics)


class _TuneReport:
    """Each epoch's report to Tune, from a trial that trains in its own process (the
    loop's reporter calls it after every report, as Ray Train calls its callbacks)."""

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any):
        from ray import tune

        tune.report(dict(metrics[0]))


def _choice(trial_config: dict[str, Any]) -> dict[str, Any]:
    choice = trial_config.get("trial", trial_config)
    return {"policy": dict(choice["policy"]), "params": dict(choice.get("params") or {})}


TRIAL_CPU = 0.01


def in_process(base) -> bool:
    """True when each trial trains in its own process (``num_workers: 0``): one CPU
    worker (or none) and no explicit worker resources, on local or remote storage.
    Multi-worker and GPU trials keep a Ray Train worker group."""
    scaling = base.scaling
    return scaling.num_workers <= 1 and not scaling.use_gpu and scaling.resources_per_worker is None


def trial_resources_for(
    sweep: SweepConfig, base, local: bool = False
) -> tuple[dict[str, float], int, dict[str, float]]:
    """Resources of one trial's Tune function, how many trials run at once, and the
    resources of each Train worker.

    A trial that trains in its own process (``local``, see ``in_process``) takes a
    share of the CPUs.
    Otherwise the trial only drives a TorchTrainer: it takes a sliver of a CPU and no
    GPU, and its workers hold the real resources. Unless ``resources_per_worker`` is
    set, a CPU worker gets what is left of its trial's share, so trials and workers
    never wait on each other (the quiet deadlock of 1 CPU per trial plus 1 per worker on
    2 CPUs).
    """
    import ray

    totals = ray.cluster_resources()
    if local:
        cpus = totals.get("CPU", 1.0)
        concurrent = max(1, int(cpus))
        if sweep.max_concurrent_trials:
            concurrent = min(concurrent, sweep.max_concurrent_trials)
        return {"CPU": round(cpus / concurrent, 3)}, concurrent, {}
    workers = base.scaling.num_workers
    if base.scaling.resources_per_worker is None and not base.scaling.use_gpu:
        cpus = totals.get("CPU", 1.0)
        concurrent = max(1, int(cpus // workers))
        if sweep.max_concurrent_trials:
            concurrent = min(concurrent, sweep.max_concurrent_trials)
        per_worker = {"CPU": round((cpus / concurrent - TRIAL_CPU) / workers, 3)}
    else:
        per_worker = worker_resources(base)  # raises if a worker can never fit
        fits = min(
            int((totals.get(k, 0.0) + 1e-9) // (v * workers + (TRIAL_CPU if k == "CPU" else 0)))
            if v
            else 10**6
            for k, v in per_worker.items()
        )
        if fits < 1:
            raise ConfigError(
                f"sweep {sweep.name!r}: one trial ({workers} workers x {per_worker}) does not fit "
                f"this cluster ({totals})"
            )
        concurrent = min(sweep.max_concurrent_trials or fits, fits)
    return {"CPU": TRIAL_CPU}, concurrent, per_worker


def _check_cluster(base) -> str | None:
    """Check a multi-node cluster (shared storage, tracking reachable from the trials);
    return the node to pin trials to, if any.

    Trials log to MLflow from wherever Tune places them. A sqlite (or other local-file)
    store lives on the driver's node, so the trials are pinned there: each is only the
    thin driver of its TorchTrainer, and its workers still spread over the cluster.
    """
    from freezelab.cluster.checks import alive_nodes, check_cluster, driver_node_id, is_local_store
    from freezelab.mlflow.tracking import resolve_tracking_uri

    uri = resolve_tracking_uri(base.mlflow.tracking_uri)
    pin = len(alive_nodes()) > 1 and base.mlflow.enabled and is_local_store(uri)
    check_cluster(base, logging_nodes="driver" if pin else "all")
    if not pin:
        return None
    node = driver_node_id()
    cpus = next((n["Resources"].get("CPU", 0.0) for n in alive_nodes() if n["NodeID"] == node), 0.0)
    if cpus < TRIAL_CPU:
        raise ConfigError(
            f"mlflow.tracking_uri {uri!r} is a file on the driver's node, where the trials that "
            "log to it would have to run, but that node has no CPU for them. Run a tracking "
            "server (mlflow.tracking_uri: http://HOST:5000) or give the head node a CPU."
        )
    log.info(
        f"MLflow store {uri} is a file on this node: trials run on node "
        f"{node[:12]}, their workers anywhere"
    )
    return node


def _on_node(resources: dict[str, float], node_id: str):
    from ray import tune

    return tune.PlacementGroupFactory(
        [resources], bundle_label_selector=[{"ray.io/node-id": node_id}]
    )


def _search(sweep: SweepConfig):
    from ray import tune

    space = sweep.space
    if sweep.algorithm == "grid":
        trials = [
            {"policy": p, "params": q} for p in space.grid_policies() for q in space.grid_params()
        ]
        return {"trial": tune.grid_search(_per_seed(trials, sweep.seeds))}, None, sweep.num_samples
    if sweep.algorithm == "random":
        rng = random.Random(sweep.seed)
        if sweep.seeds:
            # Drawn up front, so each sample is the same setting under every seed.
            samples = [space.sample(rng) for _ in range(sweep.num_samples)]
            return {"trial": tune.grid_search(_per_seed(samples, sweep.seeds))}, None, 1
        return {"trial": tune.sample_from(lambda _spec: space.sample(rng))}, None, sweep.num_samples
    from ray.tune.search.optuna import OptunaSearch

    searcher = OptunaSearch(
        space=DefineByRun(sweep.space.policies, sweep.space.params),
        metric=sweep.metric,
        mode=sweep.mode,
        seed=sweep.seed,
    )
    return {}, searcher, sweep.num_samples


def _per_seed(trials: list[dict[str, Any]], seeds: list[int] | None) -> list[dict[str, Any]]:
    if not seeds:
        return trials
    return [
        {"policy": t["policy"], "params": {**t["params"], "seed": seed}}
        for t in trials
        for seed in seeds
    ]


class DefineByRun:
    """Optuna's define-by-run space: the policy type decides which fields are sampled.

    A module-level class holding the space as data, not a closure: Tune checkpoints
    its searcher by pickling it, and ``--resume`` restores it with its trials so far.
    """

    def __init__(self, policies: list[dict[str, Any]], params: dict[str, Any]):
        self.policies = [dict(p) for p in policies]
        self.params = dict(params)

    def __call__(self, trial) -> dict[str, Any]:
        index = trial.suggest_categorical("policy_entry", list(range(len(self.policies))))
        entry = self.policies[index]
        policy = {k: _suggest(trial, f"{entry['type']}.{k}.{index}", v) for k, v in entry.items()}
        values = {k: _suggest(trial, f"param.{k}", v) for k, v in self.params.items()}
        return {"policy": policy, "params": values}


def _suggest(trial, name: str, value: Any) -> Any:
    if not is_range(value):
        return value
    kind, spec = next(iter(value.items()))
    if kind == "choice":
        picked = trial.suggest_categorical(name, list(range(len(spec))))
        return spec[picked]
    if kind == "randint":
        return trial.suggest_int(name, int(spec[0]), int(spec[1]))
    return trial.suggest_float(name, float(spec[0]), float(spec[1]), log=kind == "loguniform")


def result_rows(grid, sweep: SweepConfig, epochs: int) -> list[dict[str, Any]]:
    rows = []
    for result in grid:
        if result.config is None:
            continue
        choice = _choice(result.config)
        metrics = result.metrics or {}
        ran = int(metrics.get("training_iteration", 0))
        rows.append(
            {
                "policy": choice["policy"],
                "params": choice["params"],
                "metric": metrics.get(sweep.metric),
                "best_val_acc": metrics.get("best_val_acc"),
                "epochs": ran,
                "stopped_early": ran < epochs and result.error is None,
                "error": None if result.error is None else _error_line(result.error),
                "time_s": round(float(metrics.get("time_total_s", math.nan)), 1),
                "train_time_s": metrics.get("train_time_s"),
                "run_name": trial_run_name(sweep.name, choice),
            }
        )
    sign = -1 if sweep.mode == "max" else 1
    rows.sort(key=lambda r: (r["metric"] is None, sign * (r["metric"] or 0)))
    return rows


def _best_row(finished: list[dict[str, Any]], sweep: SweepConfig) -> dict[str, Any]:
    """The best run of the best setting: settings (policy and params, the seed aside)
    are ranked on the mean of the metric over their seeds; without seeds, each trial is
    a setting of its own."""
    sign = 1 if sweep.mode == "max" else -1
    settings: dict[str, list[dict[str, Any]]] = {}
    for row in finished:
        params = {k: v for k, v in row["params"].items() if k != "seed"}
        settings.setdefault(json.dumps([row["policy"], params], sort_keys=True), []).append(row)
    best = max(
        settings.values(), key=lambda rows: sign * sum(r["metric"] for r in rows) / len(rows)
    )
    return max(best, key=lambda r: sign * r["metric"])


def _error_line(error: BaseException | str) -> str:
    """The line that says what went wrong: Ray wraps a trial's exception in lines about
    the actor and the traceback, and the exception itself comes last."""
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    named = [line for line in lines if re.match(r"^[\w.]+(Error|Exception)\b", line)]
    fallback = (error or "error") if isinstance(error, str) else type(error).__name__
    return redact_text(named[-1] if named else lines[-1] if lines else fallback)[:200]


def format_results(rows: list[dict[str, Any]], sweep: SweepConfig) -> str:
    shown = [
        {
            **r,
            "label": from_dict(r["policy"]).label()
            + (" " + json.dumps(r["params"], separators=(",", ":")) if r["params"] else ""),
            "stopped_early": "yes" if r["stopped_early"] else "no",
            "error": (r["error"] or "")[:80] or None,
        }
        for r in rows
    ]
    columns = [
        Column("label", "policy", max_width=48),
        Column("metric", sweep.metric, fmt="{:.4f}"),
        Column("best_val_acc", "best_acc", fmt="{:.4f}"),
        Column("epochs"),
        Column("stopped_early", "early"),
        Column("time_s"),
    ]
    if any(r["error"] for r in rows):
        columns.append(Column("error"))
    return format_table(shown, columns)


def _write_best(outcome: SweepOutcome, sweep: SweepConfig) -> None:
    """The best policy and the results beside Tune's state: a local folder or a URI."""
    files = {
        "best_policy.json": json.dumps(outcome.best_policy, indent=2),
        "best_policy.yaml": yaml.safe_dump(outcome.best_policy, sort_keys=False),
        "results.json": json.dumps(outcome.rows, indent=2, default=str),
    }
    for name, text in files.items():
        objectstore.write_text(objectstore.join(outcome.directory, name), text)


def _start_parent(sweep: SweepConfig, base) -> str | None:
    if not base.mlflow.enabled:
        return None
    from freezelab.mlflow.sweep import start_sweep_run

    return start_sweep_run(sweep, base)


def _finish_parent(sweep: SweepConfig, base, outcome: SweepOutcome) -> None:
    if outcome.parent_run_id is None:
        return
    from freezelab.mlflow.sweep import finish_sweep_run

    finish_sweep_run(sweep, base, outcome)
