"""The runs a report is about, read back from MLflow: which runs the argument names,
each run's metric history and resolved config, and where its fine-tuned weights are.

>>> uri = "sqlite:///mlflow.db"
>>> client = mlflow.MlflowClient(uri)                         # doctest: +SKIP
>>> target = resolve_target(client, "policy-sweep")           # doctest: +SKIP
>>> records = [load_record(client, run, uri) for run in target.runs]  # doctest: +SKIP
>>> records[0].best_val_acc, records[0].backbone_drift        # doctest: +SKIP
(0.97, 0.12)
"""

from __future__ import annotations

import json
import math
import re
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from freezelab.errors import FreezelabError
from freezelab.mlflow.models import ready_models
from freezelab.mlflow.tracking import (  # noqa: F401  (VARIANT_TAG: re-exported)
    ADVISE,
    PRETRAIN,
    SELECT,
    STAGE_TAG,
    VARIANT_TAG,
)
from freezelab.redact import redact_uri
from freezelab.trainers import checkpoint as ckpt
from freezelab.trainers.location import RunLocation, config_changes
from freezelab.trainers.metric_names import current_name, current_value, mlflow_name
from freezelab.trainers.shifts import SHIFTED_PREFIX

SWEEP_KIND_TAG = "freezelab.kind"
PARENT_TAG = "mlflow.parentRunId"
GROUP_TAG = "freezelab.group"
DIVERGED_TAG = "freezelab.diverged"  # the reason a run counts as diverged
SELECTED_TAG = "freezelab.select.point"  # a study run's values of select.grid, as JSON
DRIFT_PREFIX = "drift/"
HISTORY_KEYS = tuple(
    mlflow_name(key)
    for key in (
        "val_acc",
        "test_acc",
        "test_loss",
        "train_loss",
        "epoch_time_s",
        "train_time_s",
        "train_images",
        "trainable_params",
        "frozen_params",
        "train_flops",
        "forgetting",
        "source_probe_acc",
        "source_probe_acc_start",
    )
)
# Metric families read whole: evaluations under shifts and on extra sets (of the
# held-out test set too), and the gradient norms of the early steps (at their global step).
HISTORY_PREFIXES = (SHIFTED_PREFIX, "early/grad_norm/")
_RUN_ID = re.compile(r"^[0-9a-f]{32}$")


class ReportError(FreezelabError, ValueError):
    """The report cannot be made as asked: the message says what was looked for."""


@dataclass(frozen=True)
class Target:
    """What the command-line argument names: a sweep's trials or an experiment's runs."""

    name: str
    description: str
    runs: list[Any]
    parent_run_id: str | None = None
    notes: list[str] = field(default_factory=list)


def resolve_target(client: Any, target: str, *, with_pretraining: bool = False) -> Target:
    """A sweep parent run (by id, then by name) or else an experiment (by name), its
    pretraining runs left out (with a note) unless ``with_pretraining``.

    A sweep gives its child runs; an experiment gives all its runs except sweep
    parents. When a sweep and an experiment share the name, the sweep wins (its
    parent run is where the report is logged) and a note says so.
    """
    found = _resolve_target(client, target)
    # A study's selection runs chose a learning rate; the verdict compares other runs.
    found = replace(found, runs=[r for r in found.runs if r.data.tags.get(STAGE_TAG) != SELECT])
    if with_pretraining:
        return found
    kept = [r for r in found.runs if r.data.tags.get(STAGE_TAG) != PRETRAIN]
    if len(kept) == len(found.runs):
        return found
    left_out = ", ".join(r.info.run_name for r in found.runs if r not in kept)
    note = f"pretraining run(s) left out (another task; --with-pretraining shows them): {left_out}"
    return Target(found.name, found.description, kept, found.parent_run_id, [*found.notes, note])


def _resolve_target(client: Any, target: str) -> Target:
    if _RUN_ID.match(target):
        run = _get_run(client, target)
        if run is not None:
            children = _children(client, run)
            if not children and run.data.tags.get(SWEEP_KIND_TAG) != "sweep":
                raise ReportError(f"run {target} is not a sweep's parent run: it has no child runs")
            return _sweep_target(run, children, [])
    experiments = client.search_experiments()
    sweeps = _sweeps_named(client, [e.experiment_id for e in experiments], target)
    experiment = client.get_experiment_by_name(target)
    if experiment is not None and experiment.lifecycle_stage != "active":
        experiment = None
    if sweeps:
        notes = []
        if len(sweeps) > 1:
            notes.append(
                f"{len(sweeps)} sweep runs are named {target!r}: this is the newest, "
                f"{sweeps[0].info.run_id}; pass a run id to report another"
            )
        if experiment is not None:
            notes.append(f"an experiment is also named {target!r}: this report is about the sweep")
        return _sweep_target(sweeps[0], _children(client, sweeps[0]), notes)
    if experiment is None:
        names = ", ".join(sorted(e.name for e in experiments)) or "none"
        raise ReportError(
            f"no sweep run or experiment named {target!r} at {client.tracking_uri} "
            f"(experiments: {names})"
        )
    runs = [
        run
        for run in _search_all(client, experiment.experiment_id)
        # A sweep's parent, and `freezelab advise` runs (nothing trained), are no rows.
        if run.data.tags.get(SWEEP_KIND_TAG) != "sweep" and run.data.tags.get(STAGE_TAG) != ADVISE
    ]
    return Target(experiment.name, f"experiment {experiment.name!r}", runs)


def _sweeps_named(client: Any, experiment_ids: list[str], name: str) -> list[Any]:
    if not experiment_ids:
        return []
    quoted = name.replace("'", "\\'")
    return list(
        client.search_runs(
            experiment_ids,
            filter_string=f"tags.`{SWEEP_KIND_TAG}` = 'sweep' and attributes.run_name = '{quoted}'",
            order_by=["attributes.start_time DESC"],
            max_results=100,
        )
    )


def _sweep_target(parent: Any, children: list[Any], notes: list[str]) -> Target:
    name = parent.info.run_name or parent.info.run_id
    kind = parent.data.tags.get(GROUP_TAG, "sweep")  # a sweep or a study
    return Target(
        name, f"{kind} {name!r} (run {parent.info.run_id})", children, parent.info.run_id, notes
    )


def _get_run(client: Any, run_id: str) -> Any | None:
    from mlflow.exceptions import MlflowException

    try:
        return client.get_run(run_id)
    except MlflowException:
        return None


def _children(client: Any, parent: Any) -> list[Any]:
    return _search_all(
        client,
        parent.info.experiment_id,
        filter_string=f"tags.`{PARENT_TAG}` = '{parent.info.run_id}'",
    )


def _search_all(client: Any, experiment_id: str, filter_string: str = "") -> list[Any]:
    runs, token = [], None
    while True:
        page = client.search_runs(
            [experiment_id],
            filter_string=filter_string,
            max_results=1000,
            order_by=["attributes.start_time ASC"],
            page_token=token,
        )
        runs += list(page)
        token = page.token
        if not token:
            return runs


@dataclass
class RunRecord:
    """One training run as MLflow holds it; ``history[key][epoch]`` is a metric value."""

    run_id: str
    run_name: str
    experiment_id: str
    status: str
    policy: str
    config: Any | None  # the TrainConfig from the run's config.yaml, None if unreadable
    history: dict[str, dict[int, float]]
    groups: list[str]  # layer groups with a drift metric, input to output
    head_groups: frozenset[str]
    notes: list[str] = field(default_factory=list)
    params: dict[str, str] = field(default_factory=dict)  # the run's MLflow params
    variant: str = ""  # the study's target variant (tag freezelab.variant)
    start_time: int = 0  # ms since the epoch
    diverged_reason: str | None = None  # why the run counts as diverged (tag), None if not
    selected: str | None = None  # a study run's values chosen on val, as "lr=0.02"

    @property
    def test_acc(self) -> float:
        """The held-out test split's accuracy of the model the run hands over (NaN
        without a test split)."""
        return self.last("test_acc")

    def series(self, key: str) -> list[tuple[int, float]]:
        return sorted(self.history.get(key, {}).items())

    def last(self, key: str) -> float:
        values = self.series(key)
        return values[-1][1] if values else math.nan

    @property
    def epochs(self) -> int:
        return len(self.series("val_acc"))

    @property
    def val_acc(self) -> float:
        """The last epoch's val_acc: the accuracy of the model the run hands over."""
        return self.last("val_acc")

    @property
    def best_val_acc(self) -> float:
        return max((v for _, v in self.series("val_acc")), default=math.nan)

    @property
    def epochs_to_best(self) -> int | None:
        """Epochs trained when val_acc first reached its best (1 = after the first)."""
        best = self.best_val_acc
        return next((epoch + 1 for epoch, v in self.series("val_acc") if v == best), None)

    @property
    def train_time_s(self) -> float:
        """The training passes' time (README, "What a run costs"); for runs from before
        the metric existed, the sum of the epochs' times."""
        values = [v for _, v in self.series(mlflow_name("train_time_s"))]
        if values:
            return values[-1]
        values = [v for _, v in self.series(mlflow_name("epoch_time_s"))]
        return sum(values) if values else math.nan

    @property
    def images_per_s(self) -> float:
        """Images seen over the training passes' time: not a mean of per-epoch rates,
        which cached epochs would inflate."""
        images = [v for _, v in self.series(mlflow_name("train_images"))]
        if images and self.train_time_s > 0:
            return images[-1] / self.train_time_s
        return math.nan

    @property
    def trainable_share(self) -> float:
        """Trainable parameters over all parameters, at the last epoch."""
        trainable = self.last(mlflow_name("trainable_params"))
        frozen = self.last(mlflow_name("frozen_params"))
        total = trainable + frozen
        return trainable / total if total > 0 else math.nan

    @property
    def backbone_drift(self) -> float:
        """Mean over the non-head groups of their drift at the last epoch."""
        values = [self.last(DRIFT_PREFIX + g) for g in self.groups if g not in self.head_groups]
        return sum(values) / len(values) if values else math.nan


def load_record(client: Any, run: Any, tracking_uri: str) -> RunRecord:
    """Read a run's metric histories (one value per epoch) and its config."""
    notes: list[str] = []
    # Read under today's names: a run logged before the metrics had sections
    # (``train_time_s``, ``val_acc/<shift>``) reads as one logged now.
    logged = {
        k: current_name(k)
        for k in run.data.metrics
        if current_name(k) in HISTORY_KEYS
        or current_name(k).startswith((DRIFT_PREFIX, *HISTORY_PREFIXES))
    }
    history: dict[str, dict[int, float]] = {}
    # A run resumed across the rename holds both names: today's wins at a shared step.
    for k, name in sorted(logged.items(), key=lambda item: item[0] == item[1]):
        points = _history(client, run.info.run_id, k)
        history.setdefault(name, {}).update(
            {step: current_value(k, value) for step, value in points.items()}
        )
    keys = list(history)
    config = _load_config(run.info.run_id, tracking_uri, notes)
    drifted = [k.removeprefix(DRIFT_PREFIX) for k in keys if k.startswith(DRIFT_PREFIX)]
    order, head = _layout(config, notes) if config is not None else ([], frozenset({"head"}))
    groups = [g for g in order if g in drifted] + sorted(g for g in drifted if g not in order)
    return RunRecord(
        run_id=run.info.run_id,
        run_name=run.info.run_name or run.info.run_id,
        experiment_id=run.info.experiment_id,
        status=run.info.status,
        policy=policy_label(config, run.data.params),
        config=config,
        history=history,
        groups=groups,
        head_groups=head,
        notes=notes,
        params=dict(run.data.params),
        variant=run.data.tags.get(VARIANT_TAG, ""),
        start_time=run.info.start_time or 0,
        diverged_reason=run.data.tags.get(DIVERGED_TAG),
        selected=_selected(run.data.tags.get(SELECTED_TAG)),
    )


def _selected(point: str | None) -> str | None:
    """A study run's values chosen on val (tag ``freezelab.select.point``), as ``lr=0.02``."""
    if not point:
        return None
    return ", ".join(f"{k.rsplit('.', 1)[-1]}={v}" for k, v in json.loads(point).items()) or None


def _history(client: Any, run_id: str, key: str) -> dict[int, float]:
    by_step: dict[int, tuple[int, float]] = {}
    for metric in client.get_metric_history(run_id, key):
        # An epoch logged twice (a replayed fallback file) keeps its latest value.
        if metric.step not in by_step or metric.timestamp >= by_step[metric.step][0]:
            by_step[metric.step] = (metric.timestamp, metric.value)
    return {step: value for step, (_, value) in by_step.items()}


def _load_config(run_id: str, tracking_uri: str, notes: list[str]) -> Any | None:
    import mlflow

    from freezelab.trainers.config import validate_config

    try:
        with tempfile.TemporaryDirectory() as tmp:
            path = mlflow.artifacts.download_artifacts(
                run_id=run_id, artifact_path="config.yaml", dst_path=tmp, tracking_uri=tracking_uri
            )
            data = yaml.safe_load(Path(path).read_text())
        return validate_config(data, "config.yaml")
    except Exception as err:  # an old or foreign run: report its metrics all the same
        notes.append(f"config.yaml unreadable ({type(err).__name__}: {err}); no CKA")
        return None


# Layer layouts depend only on (model, classes, unit): one model build per layout.
_LAYOUTS: dict[str, tuple[list[str], frozenset[str]]] = {}


def _layout(config: Any, notes: list[str]) -> tuple[list[str], frozenset[str]]:
    """The model's layer groups at the policy's unit, input to output, and the head's."""
    from freezelab.policies import layer_groups
    from freezelab.trainers.models import build_for_config

    model, data = config.model.model_dump(mode="json"), config.data.model_dump(mode="json")
    key = json.dumps([model, data, config.policy.unit])
    if key not in _LAYOUTS:
        try:
            groups = layer_groups(build_for_config(config, with_weights=False), config.policy.unit)
        except Exception as err:
            notes.append(f"model not buildable here ({err}); 'head' taken as the head group")
            return [], frozenset({"head"})
        _LAYOUTS[key] = ([g.name for g in groups], frozenset(g.name for g in groups if g.is_head))
    return _LAYOUTS[key]


def head_groups_of(config: Any) -> frozenset[str]:
    """The names of the head's layer groups of ``config``'s model."""
    return _layout(config, [])[1]


def policy_label(config: Any | None, params: dict[str, str]) -> str:
    """The policy's type and its non-default fields: ``last_n(n=2)``."""
    if config is None:
        return params.get("policy") or params.get("policy.type", "?")
    return config.policy.label()


def find_weights(
    client: Any, record: RunRecord, tracking_uri: str, scratch: Path
) -> tuple[Path | None, str]:
    """The run's fine-tuned weights and where they came from, or None and why not.

    First the newest checkpoint under the config's ``storage_path/name`` that was
    written by this config, then the weights logged beside the run's MLflow model.
    """
    config = record.config
    if config is None:
        return None, "no config"
    tried = []
    where = RunLocation.of(config)
    directory = where.latest_checkpoint()
    if directory is None:
        tried.append(f"no checkpoint under {where.key}")
    elif not _written_by(directory, config):
        tried.append(f"the checkpoint {redact_uri(str(directory))} belongs to another config")
    else:
        # A checkpoint on object storage is read from a local copy.
        shown = redact_uri(str(directory))
        return ckpt.local_copy(directory) / ckpt.MODEL_FILE, f"checkpoint {shown}"
    try:
        path = _logged_weights(client, record, tracking_uri, scratch)
    except Exception as err:  # a store without logged models, a model without the file
        tried.append(f"logged model unusable ({type(err).__name__}: {err})")
    else:
        if path is not None:
            return path, "the run's logged MLflow model"
        tried.append("no logged MLflow model with its weights")
    return None, "; ".join(tried)


def _written_by(directory: Path | str, config: Any) -> bool:
    # A name reused with another config would give a CKA of the wrong run.
    saved = ckpt.read_state(directory).get("config") or {}
    return not config_changes(saved, config.to_dict())


def _logged_weights(
    client: Any, record: RunRecord, tracking_uri: str, scratch: Path
) -> Path | None:
    from freezelab.trainers.artifacts import download_weights

    models = ready_models(
        client,
        record.experiment_id,
        record.run_id,
        order_by=[{"field_name": "creation_time", "ascending": False}],
    )
    if not models:
        return None
    # Read later with weights_only=True: the logged model is never unpickled as code.
    destination = scratch / record.run_id
    destination.mkdir(parents=True, exist_ok=True)
    return Path(download_weights(models[0].model_uri, tracking_uri, dst_path=destination))
