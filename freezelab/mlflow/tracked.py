"""A training run wrapped in its MLflow run, from the driver: ``train_tracked``.

Tracking wraps the training from above: the driver opens the run (``run.py``), the
Train controller logs each epoch's metrics (``callback.py``), and the driver closes it
with the plan of each phase, the model and, if asked, a registry alias. A run whose
loss diverged (``trainers/divergence.py``) is named in a warning line here, and tagged
``freezelab.diverged`` with the reason when its MLflow run is closed. A server that
is away at the end is waited for; if it stays away, the run's folder keeps what
``freezelab sync`` needs to finish it later (``sync.py``).

>>> tracked = train_tracked(config, parent_run_id=None)  # doctest: +SKIP
>>> tracked.outcome.metrics["val_acc"], tracked.run_id   # doctest: +SKIP
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from freezelab.mlflow.run import TrackedRun
from freezelab.mlflow.tracking import TrackingUnavailable, ensure_reachable, resolve_tracking_uri
from freezelab.redact import redact_uri
from freezelab.trainers.launch import TrainOutcome, run_training
from freezelab.trainers.location import RunLocation
from freezelab.trainers.reporting import Reporter

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrackedOutcome:
    """A run's outcome and where MLflow keeps it (None when tracking is off)."""

    outcome: TrainOutcome
    run_id: str | None = None
    model_uri: str | None = None
    wall_time_s: float | None = None  # the run's wall clock, start-up included
    experiment_id: str | None = None


def train_tracked(
    config: Any,
    *,
    parent_run_id: str | None = None,
    callbacks: Sequence[Any] = (),
    env_vars: dict[str, str] | None = None,
    reporter: Reporter | None = None,
    overwrite: bool = False,
    tracking: bool | None = None,
    started: float | None = None,
    swept: tuple[str, ...] = (),
    progress: bool = True,
) -> TrackedOutcome:
    """Start the tracked run, train with its callback, finish it with the outcome.

    An unreachable server fails first (unless ``mlflow.required: false``; ``tracking``
    is the answer of an earlier ``tracking_available``), then a name that holds a run
    of another config (``overwrite`` moves that run aside): both before anything is
    created. A run that fails is closed as FAILED. ``started`` (``time.perf_counter()``)
    is when the caller began the run: ``wall_time_s`` counts from there. ``swept``
    names the config keys a sweep varies: they are logged as params too. ``progress``
    shows the epochs on this console (``run_training``).
    """
    started = time.perf_counter() if started is None else started
    if tracking is None:
        tracking = tracking_available(config)
    RunLocation.of(config).claim(config, overwrite=overwrite)
    tracked = (
        TrackedRun.start(config, parent_run_id=parent_run_id, swept=swept) if tracking else None
    )
    if tracked is not None:
        # MLflow first: a callback after it may end the run (Tune stopping a trial).
        callbacks = [tracked.callback(), *callbacks]
    try:
        outcome = run_training(
            config, callbacks=callbacks, env_vars=env_vars, reporter=reporter, progress=progress
        )
    except BaseException as err:
        # SystemExit is Tune stopping a trial that trains in its own process (ASHA, or
        # max_t): not a failure. The run stays open, as when Tune kills a trial's
        # process, and the sweep closes it from its checkpoint.
        if tracked is not None and not isinstance(err, SystemExit):
            try:
                tracked.finish(config, None, status="FAILED")
            except Exception as err:  # the training error is the one to raise
                log.warning(f"MLflow run {tracked.run_id} not closed: {err}")
        raise
    wall_time_s = time.perf_counter() - started
    reason = outcome.metrics.get("diverged_reason")
    if reason:
        # Every run ends here (a single run, a sweep's or a study's trial): one line each.
        log.warning(f"run {config.name} diverged: {reason}")
    if tracked is None:
        return TrackedOutcome(outcome, wall_time_s=wall_time_s)
    model_uri = finish_or_defer(tracked, config, outcome, wall_time_s)
    return TrackedOutcome(outcome, tracked.run_id, model_uri, wall_time_s, tracked.experiment_id)


SYNC_FILE = "mlflow_sync.json"


def finish_or_defer(
    tracked: TrackedRun, config: Any, outcome: Any, wall_time_s: float | None
) -> str | None:
    """Finish the MLflow run: every epoch of the outcome's history that the run lacks,
    then the model, the phases and the status. A server that is away is retried with a
    back-off for ``mlflow.sync_timeout_s``; if it stays away, what a later
    ``freezelab sync`` needs is left in the run's folder and the command is printed.
    Returns the logged model's URI, None when there is none (yet)."""
    where = RunLocation.of(config)
    deadline = time.monotonic() + config.mlflow.sync_timeout_s
    delay = 1.0
    while True:
        try:
            if tracked.tracking_uri.startswith(("http://", "https://")):
                # MLflow's HTTP client retries a dead server for minutes: probe first.
                ensure_reachable(tracked.tracking_uri, timeout_s=3.0)
            tracked.write_epochs(outcome.history)
            model_uri = tracked.finish(config, outcome, wall_time_s=wall_time_s)
        except Exception as err:
            if time.monotonic() + delay > deadline:
                break
            log.info(
                f"MLflow at {redact_uri(tracked.tracking_uri)} unavailable at the "
                f"end of the run ({type(err).__name__}); retrying in {delay:.0f} s"
            )
            time.sleep(delay)
            delay = min(2 * delay, 15.0)
        else:
            where.remove_file(SYNC_FILE)
            return model_uri
    record = {
        "run_id": tracked.run_id,
        "experiment_id": tracked.experiment_id,
        "status": "FINISHED",
        "wall_time_s": wall_time_s,
        # Where the checkpoint is, as shown (no password of a storage URI), and within
        # the run's folder, which `freezelab sync` resolves against the folder it is given.
        "checkpoint": redact_uri(outcome.checkpoint_location),
        "checkpoint_in_run": _within(outcome.checkpoint_location, where.directory),
        "tracking_uri": redact_uri(tracked.tracking_uri),
    }
    where.write_file(SYNC_FILE, json.dumps(record, indent=2))
    command = f"freezelab sync {where.key}"
    if tracked.tracking_uri != redact_uri(tracked.tracking_uri):
        command += " --tracking-uri URI"  # its credentials are never written down
    log.warning(
        f"MLflow at {redact_uri(tracked.tracking_uri)} stayed unavailable "
        f"for {config.mlflow.sync_timeout_s:.0f} s: run {tracked.run_id} is not finished there "
        f"(epochs, model, status). Everything it needs is in {where.key}; when the server is "
        f"back, run:\n  {command}"
    )
    return None


def _within(path: str | None, directory: str) -> str | None:
    """``path`` relative to ``directory``, None when it is not inside it."""
    if path is None or not str(path).startswith(directory.rstrip("/") + "/"):
        return None
    return str(path)[len(directory.rstrip("/")) + 1 :]


def tracking_available(config: Any) -> bool:
    """Whether to track ``config``: False when tracking is off or, with
    ``mlflow.required: false``, unreachable (with a warning); raises
    TrackingUnavailable when it is required and unreachable."""
    if not config.mlflow.enabled:
        return False
    try:
        ensure_reachable(resolve_tracking_uri(config.mlflow.tracking_uri))
    except TrackingUnavailable as err:
        if config.mlflow.required:
            raise
        log.warning(f"{err}; training without MLflow tracking")
        return False
    return True
