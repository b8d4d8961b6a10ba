"""One MLflow run per training run, opened and closed on the driver: ``TrackedRun``.

``start`` creates the run (params, tags, datasets, the resolved config and the policy;
a tag says whether the classifier of the starting weights is kept, ``head_init_tags``),
or reopens it: a rerun of the same name and storage resumes the same MLflow run, as it
resumes training. ``callback`` is what logs each epoch from the Train controller;
``finish`` logs the plan of each phase, the wall time, the model and its registration,
and closes the run. ``train_tracked`` (``tracked.py``) puts the three together.

>>> tracked = TrackedRun.start(config)           # doctest: +SKIP
>>> tracked.finish(config, outcome, wall_time_s=12.5)  # doctest: +SKIP
'models:/m-...'
"""

from __future__ import annotations

import json
import logging
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from freezelab.mlflow.callback import MlflowMetricsCallback
from freezelab.mlflow.models import (
    global_step_of,
    is_registered,
    link_final_metrics,
    log_checkpoint_model,
    logged_model_uri,
    register,
)
from freezelab.mlflow.store import RUN_KEY_TAG, experiment_id_for, find_run_by_key, log_datasets
from freezelab.mlflow.tracking import (
    dataset_inputs,
    head_init_tags,
    resolve_tracking_uri,
    run_params,
    run_tags,
)
from freezelab.redact import redact_uri
from freezelab.trainers.location import RunLocation
from freezelab.trainers.metric_names import mlflow_name
from freezelab.trainers.models import build_for_config

log = logging.getLogger(__name__)

# The reason a run diverged (``trainers/divergence.py``), set only on such runs; the
# ``diverged`` metric (0/1) is on every run.
DIVERGED_TAG = "freezelab.diverged"
WALL = mlflow_name("wall_time_s")  # the run's wall clock, logged once at the end


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
            tags = {**run_tags(config), **head_init_tags(config), RUN_KEY_TAG: key}
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
        """Log the phases, the wall time, the reason a diverged run diverged
        (``DIVERGED_TAG``), the model and its registration; close the run. Returns the
        logged model's URI (None without a checkpoint)."""
        import mlflow

        client = mlflow.MlflowClient(tracking_uri=self.tracking_uri)
        model_uri = None
        try:
            last = int(outcome.metrics.get("epoch", 0)) if outcome is not None else 0
            logged = client.get_metric_history(self.run_id, WALL)
            if (
                wall_time_s is not None
                and outcome is not None
                and not outcome.already_complete
                and not any(m.step == last for m in logged)
            ):
                client.log_metric(self.run_id, WALL, wall_time_s, step=last)
            reason = outcome.metrics.get("diverged_reason") if outcome is not None else None
            if reason:
                client.set_tag(self.run_id, DIVERGED_TAG, reason)
            self._log_phases(client, config)
            if config.mlflow.log_model and outcome is not None and outcome.checkpoint_dir:
                # Finishing again (a retry, `freezelab sync`, a rerun of a finished run)
                # reuses the model logged then.
                model_uri = logged_model_uri(client, self.experiment_id, self.run_id, last)
                if model_uri is None:
                    model_uri = log_checkpoint_model(
                        self.tracking_uri, self.run_id, config, outcome.checkpoint_dir, step=last
                    )
                else:  # linked then, unless that finish stopped between the two
                    link_final_metrics(
                        client,
                        self.run_id,
                        model_uri.removeprefix("models:/"),
                        last,
                        global_step_of(outcome.checkpoint_dir),
                    )
                name = config.mlflow.register_as
                if name and not is_registered(client, name, model_uri):
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
