"""Many training runs as Ray Tune trials: the one way freezelab runs a group of configs,
for a sweep (``sweep/run.py``) and for a study's fine-tuning runs (``study.py``).

Each trial is a Tune function that trains one config with MLflow tracking around it,
nested under the group's parent run. How a trial gets its config is the caller's: a
``TrialSource`` turns Tune's ``trial`` entry into a tracked ``TrainConfig``. What the
group shares is here: how many trials fit the cluster at once and what each holds
(``plan_trials``), where they may run, the trial function, and the Tuner that runs,
shows and resumes them (``fit_trials``).

>>> plan = plan_trials(base, max_concurrent=None, group="sweep 'grid'")  # doctest: +SKIP
>>> grid = fit_trials(source, plan, {"trial": tune.grid_search(trials)}, ...)  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Protocol

from freezelab.env import verbose
from freezelab.errors import ConfigError
from freezelab.redact import redact_text, redact_uri
from freezelab.trainers.launch import worker_env_vars, worker_resources
from freezelab.trainers.location import RunLocation

log = logging.getLogger(__name__)

# What a trial that only drives a TorchTrainer holds: its workers hold the real resources.
TRIAL_CPU = 0.01


class TrialSource(Protocol):
    """How the trials of a group get their configs (picklable: Tune ships it to the
    trials and saves it with the group's state)."""

    def config_for(self, trial: dict[str, Any]) -> Any:
        """The tracked ``TrainConfig`` of Tune's ``trial`` entry."""

    def swept(self, trial: dict[str, Any]) -> tuple[str, ...]:
        """The config keys this group varies, logged as params of each run."""

    def label(self, trial: dict[str, Any]) -> str:
        """The trial's name on the console."""

    def finished(self, config: Any, tracked: Any) -> None:
        """Called in the trial's process after its run ended (the study keeps its row)."""


@dataclass(frozen=True)
class TrialPlan:
    """How a group's trials run: what one trial's Tune function holds, how many run at
    once, what each Train worker holds, and the config overrides that make it so."""

    trial_resources: dict[str, float]
    concurrent: int
    per_worker: dict[str, float]
    in_process: bool  # each trial trains in its own process (no Train worker group)
    pin_to: str | None  # the node every trial must run on (a sqlite MLflow store's)
    overrides: tuple[str, ...]

    def describe(self, workers: int) -> str:
        if self.in_process:
            return f"each trial {self.trial_resources}, training in its own process"
        return f"each trial {self.trial_resources} + {workers} worker(s) x {self.per_worker}"

    def placement(self) -> Any:
        """The Tune resources of one trial, pinned to ``pin_to`` when set."""
        if self.pin_to is None:
            return self.trial_resources
        from ray import tune

        return tune.PlacementGroupFactory(
            [self.trial_resources], bundle_label_selector=[{"ray.io/node-id": self.pin_to}]
        )


def in_process(base) -> bool:
    """True when each trial trains in its own process (``num_workers`` 0 or 1): one CPU
    worker (or none) and no explicit worker resources, on local or remote storage.
    Multi-worker and GPU trials keep a Ray Train worker group."""
    scaling = base.scaling
    return scaling.num_workers <= 1 and not scaling.use_gpu and scaling.resources_per_worker is None


def plan_trials(base, max_concurrent: int | None, group: str) -> TrialPlan:
    """Size a group's trials for the cluster Ray is connected to (check it first:
    shared storage, tracking reachable from where trials log). ``base`` is one trial's
    config; every trial of the group asks for the same resources."""
    pin_to = check_cluster_for_trials(base)
    # On a cluster whose MLflow file pins trials to one node, workers go anywhere.
    local = in_process(base) and pin_to is None
    trial_resources, concurrent, per_worker = trial_resources_for(
        base, max_concurrent, group, local
    )
    if local:
        # The trial's own process trains (num_workers: 0), with no Train controller and
        # worker group to start per trial; its torch threads share its CPUs, so that
        # trials side by side do not oversubscribe the machine.
        overrides = ["scaling.num_workers=0"]
        threads = max(1, int(trial_resources["CPU"] + 1e-9))
    else:
        if base.scaling.num_workers == 0:
            overrides = ["scaling.num_workers=1"]  # pinned: a worker that can go anywhere
        else:
            overrides = []
        overrides += [
            f"scaling.resources_per_worker={json.dumps(per_worker)}",
            # Trials run in processes of their own: the driver's network settings
            # (GLOO_SOCKET_IFNAME, ...) reach their workers through the config.
            f"scaling.env_vars={json.dumps(worker_env_vars(base))}",
        ]
        threads = max(1, int(per_worker.get("CPU", 1.0) + 1e-9))
    if base.performance.torch_threads is None:
        overrides.append(f"performance.torch_threads={threads}")
    return TrialPlan(trial_resources, concurrent, per_worker, local, pin_to, tuple(overrides))


def trial_resources_for(
    base, max_concurrent: int | None, group: str, local: bool = False
) -> tuple[dict[str, float], int, dict[str, float]]:
    """Resources of one trial's Tune function, how many trials run at once, and the
    resources of each Train worker.

    A trial that trains in its own process (``local``, see ``in_process``) takes a
    share of the CPUs: one CPU when the cluster has whole CPUs, whatever the cap on
    trials at once.
    Otherwise the trial only drives a TorchTrainer: it takes a sliver of a CPU and no
    GPU, and its workers hold the real resources. Unless ``resources_per_worker`` is
    set, a CPU worker gets what is left of its trial's share, so trials and workers
    never wait on each other (the quiet deadlock of 1 CPU per trial plus 1 per worker on
    2 CPUs).
    """
    import ray

    totals = ray.cluster_resources()
    if local:
        # A CPU each, however many run at once (max_concurrent only caps how many): a
        # run's torch threads, and so its numbers, never depend on the runs beside it.
        cpus = totals.get("CPU", 1.0)
        fits = max(1, int(cpus))
        concurrent = min(fits, max_concurrent) if max_concurrent else fits
        return {"CPU": round(cpus / fits, 3)}, concurrent, {}
    workers = max(1, base.scaling.num_workers)
    if base.scaling.resources_per_worker is None and not base.scaling.use_gpu:
        cpus = totals.get("CPU", 1.0)
        concurrent = max(1, int(cpus // workers))
        if max_concurrent:
            concurrent = min(concurrent, max_concurrent)
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
                f"{group}: one trial ({workers} workers x {per_worker}) does not fit "
                f"this cluster ({totals})"
            )
        concurrent = min(max_concurrent or fits, fits)
    return {"CPU": TRIAL_CPU}, concurrent, per_worker


def check_cluster_for_trials(base) -> str | None:
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


def run_trial(
    trial_config: dict[str, Any],
    trials: TrialSource,
    parent_run_id: str | None,
) -> None:
    """The Tune function of every trial: train its config, tracked and nested under the
    group's parent run, reporting each epoch to Tune."""
    from ray.tune.integration.ray_train import TuneReportCallback

    from freezelab.mlflow.tracked import train_tracked

    if not verbose():
        # The group's driver shows each trial's epochs and end; a trial's own INFO lines
        # (its MLflow run, its checkpoints) would repeat them from every trial.
        logging.getLogger("freezelab").setLevel(logging.WARNING)
    trial = trial_config.get("trial", trial_config)
    config = trials.config_for(trial)
    # In the trial's own process the loop reports to Tune from this thread, each report
    # taken before the next epoch; Ray's callback would queue them for the session, and
    # a report queued last could be lost when the function returns.
    forward = _TuneReport() if config.scaling.num_workers == 0 else TuneReportCallback()
    # The group's driver checked the configs and the cluster once, before its first
    # trial, and shows the trials' progress from what Tune receives.
    tracked = train_tracked(
        config,
        callbacks=[forward],
        parent_run_id=parent_run_id,
        swept=trials.swept(trial),
        progress=False,
    )
    if tracked.outcome.already_complete:
        # A retried or resumed trial whose Train run had finished: replay its epochs.
        from ray import tune

        for metrics in tracked.outcome.history:
            tune.report(metrics)
    trials.finished(config, tracked)


class _TuneReport:
    """Each epoch's report to Tune, from a trial that trains in its own process (the
    loop's reporter calls it after every report, as Ray Train calls its callbacks)."""

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any):
        from ray import tune

        tune.report(dict(metrics[0]))


def fit_trials(
    trials: TrialSource,
    plan: TrialPlan,
    param_space: dict[str, Any],
    *,
    name: str,
    storage_path: str,
    parent_run_id: str | None,
    resume: bool,
    epochs: int,
    count: int | None,
    kind: str = "sweep",
    metric: str = "val_acc",
    mode: str = "max",
    search_alg: Any = None,
    scheduler: Any = None,
    num_samples: int = 1,
) -> Any:
    """Run (or, with ``resume``, continue) the group's trials as the Tune experiment
    ``name`` under ``storage_path``; return Tune's ``ResultGrid``. A resumed group keeps
    its finished trials and reruns the others, each resuming its own Train run.
    ``count`` is the number of trials the display expects (None: unknown)."""
    from ray import tune
    from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback

    from freezelab.sweep.progress import TrialProgress

    trainable = tune.with_resources(
        tune.with_parameters(run_trial, trials=trials, parent_run_id=parent_run_id),
        plan.placement(),
    )
    directory = RunLocation(storage_path, name).directory
    if resume:
        log.info(f"resuming {kind} {name!r} from {redact_uri(directory)}")
        tuner = tune.Tuner.restore(
            directory, trainable, resume_errored=True, param_space=param_space
        )
    else:
        tuner = tune.Tuner(
            trainable,
            param_space=param_space,
            tune_config=tune.TuneConfig(
                metric=metric,
                mode=mode,
                search_alg=search_alg,
                scheduler=scheduler,
                num_samples=num_samples,
                max_concurrent_trials=plan.concurrent,
                # A trial's process (torch, MLflow and freezelab imported) trains the
                # next trial too: starting one costs seconds, as much as a short run.
                reuse_actors=True,
            ),
            run_config=tune.RunConfig(
                name=name,
                storage_path=storage_path,
                # freezelab's display of the trials; Tune's own tables with -v.
                callbacks=[
                    TrialProgress(
                        f"{kind} {name!r}", count, epochs, _TrialLabel(trials), error_line
                    ),
                    # Tune's own result files (its analysis reads them), without its
                    # TensorBoard files: MLflow has every metric, and the driver's CPU
                    # goes to the trials.
                    CSVLoggerCallback(),
                    JsonLoggerCallback(),
                ],
                verbose=1 if verbose() else 0,
            ),
        )
    # The loggers are those of the callbacks above: without this, Tune adds its
    # TensorBoard logger to them (the callbacks of a restored group included).
    with quiet_tune(), _environ(TUNE_DISABLE_AUTO_CALLBACK_LOGGERS="1"):
        return tuner.fit()


@contextlib.contextmanager
def _environ(**values: str) -> Iterator[None]:
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@dataclass(frozen=True)
class _TrialLabel:
    """A trial's label on the console, from Tune's config of it (picklable)."""

    trials: TrialSource

    def __call__(self, trial_config: dict[str, Any]) -> str:
        return self.trials.label(trial_config.get("trial", trial_config))


@contextlib.contextmanager
def quiet_tune() -> Iterator[None]:
    """Tune's own console output only with -v: its trial tables and its experiment header
    (printed by its newer console output at any verbosity, so the older one is chosen,
    which is silent at verbosity 0) and its INFO lines."""
    if verbose():
        yield
        return
    tune_logger = logging.getLogger("ray.tune")
    level = tune_logger.level
    tune_logger.setLevel(logging.WARNING)
    try:
        with _environ(RAY_AIR_NEW_OUTPUT="0"):
            yield
    finally:
        tune_logger.setLevel(level)


def trial_outcomes(grid) -> list[dict[str, Any]]:
    """Each trial of a ``ResultGrid``: its ``trial`` entry, last metrics, epochs run,
    time and error line (None when it finished)."""
    outcomes = []
    for result in grid:
        if result.config is None:
            continue
        metrics = result.metrics or {}
        outcomes.append(
            {
                "trial": result.config.get("trial", result.config),
                "metrics": metrics,
                "epochs": int(metrics.get("training_iteration", 0)),
                "time_s": round(float(metrics.get("time_total_s", math.nan)), 1),
                "error": None if result.error is None else error_line(result.error),
            }
        )
    return outcomes


def error_line(error: BaseException | str) -> str:
    """The line that says what went wrong: Ray wraps a trial's exception in lines about
    the actor and the traceback, and the exception itself comes last."""
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    named = [line for line in lines if re.match(r"^[\w.]+(Error|Exception)\b", line)]
    fallback = (error or "error") if isinstance(error, str) else type(error).__name__
    return redact_text(named[-1] if named else lines[-1] if lines else fallback)[:200]


def require_fits(config, group: str) -> None:
    """Refuse a group whose every trial asks for more than any node has (GPUs on a
    machine without one, more CPUs per worker than a node holds), before anything
    starts. The nodes are those of the Ray this process is connected to, else this
    machine, where a local Ray would start."""
    import ray

    if ray.is_initialized():
        nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    else:
        nodes = [_this_machine()]
    workers = max(1, config.scaling.num_workers)
    need = dict(config.scaling.resources_per_worker or {})
    if config.scaling.use_gpu:
        need.setdefault("GPU", 1.0)
    for resource, amount in need.items():
        largest = max((node.get(resource, 0.0) for node in nodes), default=0.0)
        total = sum(node.get(resource, 0.0) for node in nodes)
        if amount > largest + 1e-9 or amount * workers > total + 1e-9:
            raise ConfigError(
                f"{group}: each run asks for {workers} worker(s) x {{{resource}: {amount:g}}}, "
                f"which no run can get: the {'cluster' if ray.is_initialized() else 'machine'} "
                f"has {total:g} {resource} in all and at most {largest:g} on one node"
            )


def _this_machine() -> dict[str, float]:
    import torch

    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"CPU": float(cpus or 1), "GPU": float(torch.cuda.device_count())}
