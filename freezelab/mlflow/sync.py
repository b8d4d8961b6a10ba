"""Finish MLflow runs from what their run folders hold: ``freezelab sync``.

A run whose tracking server was away at its end leaves ``mlflow_sync.json`` in its
folder (see ``finish_or_defer``); a sweep trial that Tune stopped (ASHA, or the last
epoch reached) never ran its own end. Both are finished here, from the run's final
checkpoint, whose state holds every epoch's metrics: the epochs the run lacks (each
once, in order), the model, the phases, the status. Running it twice changes nothing.

>>> synced = sync("freezelab_runs/")                  # doctest: +SKIP
[freezelab] synced run 1f0c...: 3 epoch(s) written, model models:/m-..., FINISHED
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pyarrow.fs

from freezelab import objectstore
from freezelab.errors import NotFound
from freezelab.mlflow.run import TrackedRun
from freezelab.mlflow.store import experiment_id_for, run_key_filter
from freezelab.mlflow.tracked import SYNC_FILE
from freezelab.mlflow.tracking import ensure_reachable, resolve_tracking_uri
from freezelab.redact import redact_uri
from freezelab.trainers import checkpoint as ckpt
from freezelab.trainers.location import RunLocation

log = logging.getLogger(__name__)


def finish_from_checkpoint(
    config: Any,
    *,
    status: str = "FINISHED",
    wall_time_s: float | None = None,
    tracking_uri: str | None = None,
    only_if_running: bool = False,
    checkpoint: Path | str | None = None,
    run_id: str | None = None,
) -> tuple[str | None, int] | None:
    """Finish the MLflow run of ``config`` (``run_id``, else the run its location
    names) from ``checkpoint`` (else its latest). Returns (model URI, epochs written),
    or None when there is no run or no checkpoint to finish from (or, with
    ``only_if_running``, when the run is already closed)."""
    import mlflow

    uri = tracking_uri or resolve_tracking_uri(config.mlflow.tracking_uri)
    where = RunLocation.of(config)
    checkpoint = checkpoint or where.latest_checkpoint()
    if checkpoint is None:
        return None
    client = mlflow.MlflowClient(tracking_uri=uri)
    if run_id is not None:
        run = client.get_run(run_id)
    else:
        experiment_id = experiment_id_for(client, config.mlflow.experiment)
        found = client.search_runs(
            [experiment_id],
            filter_string=run_key_filter(where.mlflow_key()),
            max_results=1,
        )
        if not found:
            return None
        run = found[0]
    if only_if_running and run.info.status != "RUNNING":
        return None
    experiment_id = run.info.experiment_id
    state = ckpt.read_state(checkpoint)
    outcome = SimpleNamespace(
        metrics=state["metrics"],
        history=state.get("history", []),
        checkpoint_dir=str(ckpt.local_copy(checkpoint)),
        already_complete=False,
    )
    tracked = TrackedRun(uri, run.info.run_id, experiment_id, str(where.pending_metrics_file))
    written = tracked.write_epochs(outcome.history)
    model_uri = tracked.finish(config, outcome, status=status, wall_time_s=wall_time_s)
    return model_uri, written


def sync(path: str | Path, tracking_uri: str | None = None) -> list[str]:
    """Finish every run left for later under ``path`` (a run folder, or a storage
    folder of run folders, local or a URI); returns their MLflow run ids."""
    from mlflow.exceptions import MlflowException

    from freezelab.trainers.config import validate_config

    root = str(path) if objectstore.is_uri(str(path)) else str(Path(path).resolve())
    if objectstore.info(root, "freezelab sync").type != pyarrow.fs.FileType.Directory:
        raise NotFound(f"freezelab sync: {redact_uri(str(path))} is not a folder")
    # The marker of the run folder itself, or of each run folder directly under it.
    markers = [
        file
        for file in objectstore.list_files(root)
        if file.endswith(f"/{SYNC_FILE}") and file[len(root.rstrip("/")) :].count("/") <= 2
    ]
    if not markers:
        log.info(f"nothing to sync under {redact_uri(root)}: every run there is finished in MLflow")
        return []
    synced = []
    for marker in markers:
        record = json.loads(objectstore.read_text(marker))
        checkpoint = str(record["checkpoint"])
        if record.get("checkpoint_in_run"):  # found from the folder given, credentials and all
            checkpoint = objectstore.join(marker.rsplit("/", 1)[0], record["checkpoint_in_run"])
        config = validate_config(ckpt.read_state(checkpoint)["config"], redact_uri(checkpoint))
        uri = tracking_uri or resolve_tracking_uri(config.mlflow.tracking_uri)
        ensure_reachable(uri)
        try:
            # The marker names the run and the checkpoint: sync works from any folder.
            result = finish_from_checkpoint(
                config,
                status=record["status"],
                wall_time_s=record.get("wall_time_s"),
                tracking_uri=uri,
                checkpoint=checkpoint,
                run_id=record["run_id"],
            )
        except MlflowException:
            result = None
        if result is None:
            raise NotFound(
                f"freezelab sync: no MLflow run {record['run_id']} at {redact_uri(uri)} "
                "(pass the server the run was tracked on with --tracking-uri)"
            )
        model_uri, written = result
        objectstore.delete(marker)
        log.info(
            f"synced run {record['run_id']} ({config.name}): {written} epoch(s) "
            f"written, model {model_uri or 'not logged'}, {record['status']}"
        )
        synced.append(record["run_id"])
    return synced
