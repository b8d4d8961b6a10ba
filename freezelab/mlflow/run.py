"""One MLflow run per training run, opened and closed on the driver.

Tracking wraps the training from above: the driver creates the run (params, tags,
the resolved config and the policy), the Train controller logs each epoch's metrics
(``callback.py``), and the driver closes it with the plan of each phase, the model
and, if asked, a registry alias. A rerun of the same name and storage resumes the
same MLflow run, as it resumes training. ``train_tracked`` does all three:

>>> tracked = train_tracked(config, parent_run_id=None)  # doctest: +SKIP
>>> tracked.outcome.metrics["val_acc"], tracked.run_id   # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import json
import logging
import random
import re
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from freezelab.mlflow.callback import MlflowMetricsCallback
from freezelab.mlflow.tracking import (
    EXPERIMENT_KIND,
    TrackingUnavailable,
    dataset_inputs,
    ensure_reachable,
    resolve_tracking_uri,
    run_params,
    run_tags,
    tracking_uri_set,
)
from freezelab.redact import redact_uri
from freezelab.trainers.launch import TrainOutcome, run_training
from freezelab.trainers.location import RunLocation
from freezelab.trainers.models import build_for_config
from freezelab.trainers.reporting import Reporter

RUN_KEY_TAG = "freezelab.run_key"

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


@dataclass
class TrackedRun:
    tracking_uri: str
    run_id: str
    experiment_id: str
    fallback_file: str

    @classmethod
    def start(
        cls, config: Any, parent_run_id: str | None = None, swept: tuple[str, ...] = ()
    ) -> TrackedRun:
        """Open (or reopen) the run of ``config`` (check ``tracking_available`` first)."""
        import mlflow

        section = config.mlflow
        uri = resolve_tracking_uri(section.tracking_uri)
        client = mlflow.MlflowClient(tracking_uri=uri)
        experiment_id = experiment_id_for(client, section.experiment)
        where = RunLocation.of(config)
        key = where.mlflow_key()
        existing = find_run_by_key(client, experiment_id, key)
        if existing:
            run_id = existing
            client.update_run(run_id, status="RUNNING")
            log.info(f"MLflow: continuing run {run_id} of {config.name!r}")
        else:
            tags = {**run_tags(config), RUN_KEY_TAG: key}
            if parent_run_id:
                tags["mlflow.parentRunId"] = parent_run_id
            run = client.create_run(
                experiment_id, run_name=section.run_name or config.name, tags=tags
            )
            run_id = run.info.run_id
            params = run_params(config, swept)
            from mlflow.entities import Param

            items = [Param(k, v) for k, v in params.items()]
            for start in range(0, len(items), 100):
                client.log_batch(run_id, params=items[start : start + 100])
            log_datasets(client, run_id, dataset_inputs(config))
            with tempfile.TemporaryDirectory() as tmp:
                (Path(tmp) / "config.yaml").write_text(
                    yaml.safe_dump(config.safe_dict(), sort_keys=False)
                )
                (Path(tmp) / "policy.json").write_text(
                    json.dumps(config.policy.to_dict(), indent=2)
                )
                client.log_artifact(run_id, str(Path(tmp) / "config.yaml"))
                client.log_artifact(run_id, str(Path(tmp) / "policy.json"))
            log.info(
                f"MLflow: run {run_id} in experiment {section.experiment!r} at {redact_uri(uri)}"
            )
        return cls(uri, run_id, experiment_id, str(where.pending_metrics_file))

    def callback(self) -> MlflowMetricsCallback:
        return MlflowMetricsCallback(self.tracking_uri, self.run_id, self.fallback_file)

    def write_epochs(self, history: Sequence[dict[str, Any]]) -> int:
        """Log each epoch of ``history`` that the run does not hold yet (those a lost
        server missed), in order; returns how many were written."""
        import mlflow

        from freezelab.mlflow.callback import log_epoch, logged_epochs

        client = mlflow.MlflowClient(tracking_uri=self.tracking_uri)
        logged = logged_epochs(client, self.run_id)
        written = 0
        for metrics in sorted(history, key=lambda m: int(m.get("epoch", -1))):
            if "epoch" not in metrics or int(metrics["epoch"]) in logged:
                continue
            epoch = int(metrics["epoch"])
            log_epoch(client, self.run_id, metrics)
            logged.add(epoch)
            written += 1
        return written

    def finish(
        self,
        config: Any,
        outcome: Any,
        status: str = "FINISHED",
        wall_time_s: float | None = None,
    ) -> str | None:
        """Log the phases, the wall time, the model and its registration; close the run.
        Returns the logged model's URI (None without a checkpoint)."""
        import mlflow

        client = mlflow.MlflowClient(tracking_uri=self.tracking_uri)
        model_uri = None
        try:
            last = int(outcome.metrics.get("epoch", 0)) if outcome is not None else 0
            logged = client.get_metric_history(self.run_id, "wall_time_s")
            if (
                wall_time_s is not None
                and outcome is not None
                and not outcome.already_complete
                and not any(m.step == last for m in logged)
            ):
                client.log_metric(self.run_id, "wall_time_s", wall_time_s, step=last)
            self._log_phases(client, config)
            if config.mlflow.log_model and outcome is not None and outcome.checkpoint_dir:
                # Finishing again (a retry, `freezelab sync`, a rerun of a finished run)
                # reuses the model logged then.
                model_uri = logged_model_uri(client, self.experiment_id, self.run_id, last)
                if model_uri is None:
                    model_uri = log_checkpoint_model(
                        self.tracking_uri, self.run_id, config, outcome.checkpoint_dir, step=last
                    )
                name = config.mlflow.register_as
                if name and not _registered(client, name, model_uri):
                    register(self.tracking_uri, model_uri, name, config.mlflow.alias)
        finally:
            client.set_terminated(self.run_id, status=status)
        return model_uri

    def _log_phases(self, client, config: Any) -> None:
        from freezelab.policies.summary import format_table, summarize_plan

        model = build_for_config(config, with_weights=False)
        with tempfile.TemporaryDirectory() as tmp:
            previous = None
            lines = []
            for epoch in range(config.epochs):
                report = summarize_plan(model, config.policy, config.model.name, epoch=epoch)
                key = json.dumps([report["groups"], report["phase"]])
                if key != previous:
                    lines.append(f"== from epoch {epoch} ==\n{format_table(report)}\n")
                    path = Path(tmp) / f"phase_epoch{epoch:04d}.json"
                    path.write_text(json.dumps(report, indent=2))
                    client.log_artifact(self.run_id, str(path), artifact_path="phases")
                previous = key
            text = Path(tmp) / "phases.txt"
            text.write_text("\n".join(lines))
            client.log_artifact(self.run_id, str(text), artifact_path="phases")


def log_checkpoint_model(
    tracking_uri: str, run_id: str, config: Any, checkpoint_dir: str, step: int = 0
) -> str:
    """Log the checkpoint's model as an MLflow model (a LoggedModel) with a signature
    and an input example, in freezelab's model format (``trainers/model_file.py``):
    ``mlflow.pytorch.load_model`` returns the ``nn.Module``, the weights are stored once,
    and no reader runs code from the file.

    ``step`` is the checkpoint's epoch: MLflow links the run's metrics of that step to
    the model, so the Models tab shows the handed-over model's val_acc, not epoch 0's."""
    import mlflow
    import numpy as np
    import timm
    import torch

    from freezelab import __version__
    from freezelab.trainers import checkpoint as ckpt
    from freezelab.trainers import model_file
    from freezelab.trainers.data import input_size_of, num_classes_of

    model = build_for_config(config, with_weights=False)
    ckpt.load_model_weights(checkpoint_dir, model)
    head = config.model.head.model_dump() if config.model.head else None
    spec = model_file.spec_of(
        config.model.name,
        num_classes_of(config.data),
        head=head,
        in_chans=config.model.in_chans,
        image_size=config.data.input_size,
    )
    model_file.attach_spec(model.eval(), spec)
    example = np.zeros((2, *input_size_of(config.data, model)), dtype=np.float32)
    with torch.no_grad():
        output = model(torch.from_numpy(example)).numpy()
    signature = mlflow.models.infer_signature(example, output)
    # MLflow warns against pickled models: this one's pickle loads nothing but tensors
    # and freezelab's rebuild (model_file.py), so the warning would mislead at every run.
    with (
        tracking_uri_set(tracking_uri),
        mlflow.start_run(run_id=run_id),
        _quiet("mlflow.pytorch"),
    ):
        info = mlflow.pytorch.log_model(
            model,
            # Named as its run, so the Models tab tells the policies apart.
            name=re.sub(r"[/:.%\"']", "_", config.mlflow.run_name or config.name),
            signature=signature,
            input_example=example,
            serialization_format="pickle",
            pickle_module=model_file,
            step=step,
            tags={"freezelab.policy": config.policy.label(), "freezelab.epoch": str(step)},
            pip_requirements=[
                f"torch=={torch.__version__.split('+')[0]}",
                f"timm=={timm.__version__}",
                f"freezelab=={__version__}",
            ],
        )
    return info.model_uri


@contextlib.contextmanager
def _quiet(logger_name: str):
    logger = logging.getLogger(logger_name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def logged_model_uri(client: Any, experiment_id: str, run_id: str, step: int) -> str | None:
    """The URI of the model this run already logged for ``step``, if any."""
    for model in client.search_logged_models(
        experiment_ids=[experiment_id], filter_string=f"source_run_id = '{run_id}'"
    ):
        if model.tags.get("freezelab.epoch") == str(step):
            return model.model_uri
    return None


def registry_client(uri: str) -> Any:
    """A client whose model registry is the tracking store's: without ``registry_uri``,
    MLflow takes the registry of the first tracking URI the process used."""
    import mlflow

    return mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)


def _registered(client: Any, name: str, model_uri: str) -> bool:
    """Whether ``model_uri`` already is a version of registered model ``name``."""
    from mlflow.exceptions import MlflowException

    try:
        versions = registry_client(client.tracking_uri).search_model_versions(f"name = '{name}'")
    except MlflowException:
        return False
    model_id = model_uri.removeprefix("models:/")
    return any(v.source == model_uri or getattr(v, "model_id", None) == model_id for v in versions)


def register(tracking_uri: str, model_uri: str, name: str, alias: str) -> str:
    import mlflow

    with tracking_uri_set(tracking_uri):
        version = mlflow.register_model(model_uri, name)
    registry_client(tracking_uri).set_registered_model_alias(name, alias, version.version)
    log.info(f"MLflow: registered {name} version {version.version} as @{alias}")
    return version.version


def experiment_id_for(client: Any, name: str) -> str:
    """The id of experiment ``name``, created when missing.

    The experiment is marked as model training (MLflow's ``mlflow.experimentKind``),
    so the UI opens it on its runs, not on the GenAI overview.

    With a sqlite store, a new experiment keeps its artifacts in ``mlruns/`` next to
    the database file. MLflow's default is ``./mlruns`` in the current directory, which
    for a Ray job is its temporary working directory: the logged models would be lost.
    """
    experiment = client.get_experiment_by_name(name)
    if experiment:
        if EXPERIMENT_KIND[0] not in experiment.tags:
            client.set_experiment_tag(experiment.experiment_id, *EXPERIMENT_KIND)
        return experiment.experiment_id
    uri = client.tracking_uri
    location = None
    if uri.startswith("sqlite:///"):
        database = Path(uri.removeprefix("sqlite:///")).resolve()
        # The experiment's name as a folder name, never a path out of mlruns/ ("..").
        slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", name).lstrip(".") or "_"
        location = (database.parent / "mlruns" / slug).as_uri()
    from mlflow.exceptions import MlflowException

    try:
        return client.create_experiment(
            name, artifact_location=location, tags=dict([EXPERIMENT_KIND])
        )
    except MlflowException as err:
        # Two runs that start at once (two Ray jobs) both found it missing.
        experiment = client.get_experiment_by_name(name)
        if err.error_code != "RESOURCE_ALREADY_EXISTS" or experiment is None:
            raise
        return experiment.experiment_id


def log_datasets(client: Any, run_id: str, datasets: list[Any], attempts: int = 5) -> None:
    """Record ``datasets`` as the run's inputs.

    MLflow's store looks a dataset up by experiment, name and digest, then inserts it
    when missing. Sweep trials start together and log the same datasets, so two of them
    can both find it missing and the second insert fails on the key. Retried, the
    lookup finds the row the other trial wrote. Inputs describe the run; if the store
    keeps refusing them, the run goes on without them, with a warning.
    """
    from mlflow.exceptions import MlflowException

    for attempt in range(1, attempts + 1):
        try:
            client.log_inputs(run_id, datasets=datasets)
            return
        except MlflowException as err:
            if attempt == attempts:
                log.warning(
                    "MLflow refused the datasets of run %s (%s); the run goes on without them",
                    run_id,
                    str(err).splitlines()[0][:200],
                )
                return
            time.sleep(0.05 * attempt + random.random() * 0.1)


def find_run_by_key(client: Any, experiment_id: str, key: str) -> str | None:
    """The run that freezelab opened for ``key`` (storage path and name), if any: a
    rerun of the same name continues its MLflow run as it continues training."""
    found = client.search_runs(
        [experiment_id], filter_string=f"tags.`{RUN_KEY_TAG}` = '{_quote(key)}'", max_results=1
    )
    return found[0].info.run_id if found else None


def _quote(text: str) -> str:
    return text.replace("'", "\\'")
