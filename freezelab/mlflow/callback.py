"""Per-epoch metrics into MLflow from one process: the Train controller.

Ray's ``MLflowLoggerCallback`` is a Tune callback and ``setup_mlflow`` runs inside
the workers; neither fits a Ray Train V2 run, whose ``RunConfig`` takes only
``ray.train.UserCallback``. This callback runs on the controller (once per report,
not once per worker) and logs rank 0's metrics with ``step=epoch``.

Every epoch is logged exactly once: epochs already in the run (a resumed run, or a
worker group restarted from an older checkpoint, as in Ray issue 48664) are skipped.
A tracking server lost mid-run never stops training: the metrics wait in memory and
are retried at the next report, and every pending batch is also appended to a local
JSON-lines file whose path is printed.
"""

from __future__ import annotations

import json
import logging
import time
import warnings
from pathlib import Path
from typing import Any

from ray.train import UserCallback

from freezelab import objectstore
from freezelab.mlflow.tracking import ensure_reachable
from freezelab.redact import redact_text, redact_uri
from freezelab.trainers.metric_names import LR, mlflow_name
from freezelab.trainers.reporting import metric_points

log = logging.getLogger(__name__)


class MlflowMetricsCallback(UserCallback):
    def __init__(self, tracking_uri: str, run_id: str, fallback_file: str):
        self.tracking_uri = tracking_uri
        self.run_id = run_id
        self.fallback_file = fallback_file
        self._logged_epochs: set[int] | None = None
        self._pending: dict[int, dict[str, float]] = {}
        self._warned = False

    def after_report(self, run_context, metrics: list[dict[str, Any]], checkpoint) -> None:
        rank0 = metrics[0] if metrics else {}
        if "epoch" not in rank0:
            return
        self._pending[int(rank0["epoch"])] = rank0
        self.flush()

    def flush(self) -> bool:
        """Write pending epochs; True when nothing is left pending."""
        if not self._pending:
            return True
        try:
            # A quick probe first: MLflow's HTTP client retries a dead server for
            # minutes, which would stall every report of the run. (A sqlite store
            # fails fast on its own.)
            if self.tracking_uri.startswith(("http://", "https://")):
                ensure_reachable(self.tracking_uri, timeout_s=3.0)
            client = self._client()
            if self._logged_epochs is None:
                self._logged_epochs = logged_epochs(client, self.run_id)

            for epoch in sorted(self._pending):
                if epoch not in self._logged_epochs:
                    log_epoch(client, self.run_id, self._pending[epoch])
                    self._logged_epochs.add(epoch)
                del self._pending[epoch]
            if self._warned:
                log.info(f"MLflow reachable again: metrics up to date in run {self.run_id}")
                self._warned = False
            return True
        except Exception as err:  # a lost tracking server must never stop training
            self._spill(err)
            return False

    def _client(self):
        import mlflow

        return mlflow.MlflowClient(tracking_uri=self.tracking_uri)

    def _spill(self, err: Exception) -> None:
        lines = "".join(
            json.dumps(
                {
                    "run_id": self.run_id,
                    "epoch": epoch,
                    "metrics": {k: v for k, v in values.items() if k != "epoch"},
                }
            )
            + "\n"
            for epoch, values in sorted(self._pending.items())
        )
        path = self.fallback_file
        try:
            _append(path, lines)
        except OSError as spill_error:  # the metrics stay pending in memory all the same
            path = f"memory only ({redact_uri(path)}: {type(spill_error).__name__})"
        message = (
            f"MLflow at {redact_uri(self.tracking_uri)} is unreachable "
            f"({type(err).__name__}: {redact_text(str(err))}); "
            f"training goes on. {len(self._pending)} pending epoch(s) will be retried at the next "
            f"report and are saved in {redact_uri(path)}"
        )
        warnings.warn(message, RuntimeWarning, stacklevel=2)
        log.warning(f"{message}")
        self._warned = True


def _append(path: str, text: str) -> None:
    """Append to a local file; on object storage, which cannot append, rewrite the
    (small) object with ``text`` added."""
    if not objectstore.is_uri(path):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as out:
            out.write(text)
        return
    try:
        before = objectstore.read_text(path)
    except FileNotFoundError:
        before = ""
    objectstore.write_text(path, before + text)


# Health checks and bookkeeping: run-level tags in MLflow, not charts of a constant.
AS_TAGS = ("nodes", "world_size", "replicas_in_sync", "feature_cache")
# The metric logged last with each epoch: the mark that the epoch is in.
EPOCH_MARK = mlflow_name("epoch")


def epoch_metrics(report: dict[str, Any]) -> list[Any]:
    """The MLflow metrics of one epoch's report: its numbers at ``step=epoch``, and the
    early steps' gradient norms (``early_steps``, JSON) at their global steps.

    The LRs of the groups are one ``lr/all`` when they are all equal (``lr/<group>`` when
    they differ); ``AS_TAGS`` are tags (``epoch_tags``), except a replica check that
    failed, which is charted too so that the epoch shows.
    """
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    points = metric_points(report)
    rates = {value for key, value, _ in points if key.startswith("lr/")}
    tags = {mlflow_name(key) for key in AS_TAGS}
    metrics = []
    for key, value, step in points:
        if key in tags and not (key == mlflow_name("replicas_in_sync") and value == 0):
            continue
        if key.startswith("lr/") and len(rates) == 1:
            continue
        metrics.append(Metric(key, value, now, step))
    if len(rates) == 1:
        metrics.append(Metric(LR, rates.pop(), now, int(report["epoch"])))
    # Logged first, so MLflow's compare view picks val_acc as its default metric.
    return sorted(metrics, key=lambda m: m.key not in LEAD)


# The metrics a user compares runs by first.
LEAD = ("val_acc", mlflow_name("train_time_s"))


def epoch_tags(report: dict[str, Any]) -> dict[str, str]:
    """``AS_TAGS`` of one epoch's report as ``freezelab.<key>`` tags (the last epoch's
    value stays; a failed replica check also stays a metric)."""
    return {f"freezelab.{k}": str(int(report[k])) for k in AS_TAGS if k in report}


def log_epoch(client, run_id: str, report: dict[str, Any]) -> None:
    """Log one epoch's report; its ``run/epoch`` metric last, as the mark that it is in.

    A batch is one transaction of the store (one request to a server): an epoch that
    fits in one batch (at most 1000 values) is written with its mark at once."""
    from mlflow.entities import Metric, RunTag

    epoch = int(report["epoch"])
    mark = Metric(EPOCH_MARK, epoch, int(time.time() * 1000), epoch)
    batch = [*epoch_metrics(report), mark]
    tags = [RunTag(k, v) for k, v in epoch_tags(report).items()]
    for start in range(0, len(batch), 1000):  # log_batch takes at most 1000 per call
        client.log_batch(
            run_id, metrics=batch[start : start + 1000], tags=tags if start == 0 else []
        )


def logged_epochs(client, run_id: str) -> set[int]:
    """Epochs whose metrics the run already has (its ``run/epoch`` metric's steps, and
    ``epoch``'s, the mark of runs logged before the metrics had sections)."""
    return {
        int(m.step)
        for mark in (EPOCH_MARK, "epoch")
        for m in client.get_metric_history(run_id, mark)
    }
