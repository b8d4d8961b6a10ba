"""The runs table a study's page opens on: its fine-tuning runs, grouped by target
variant, best first, with the verdict metric and the cost as columns.

MLflow 3.17's UI takes only the search, the sort and the filters from a page's URL
(``searchFilter``, ``orderByKey``, ``orderByAsc``, ...); columns and grouping it reads
from a shared view, an experiment tag ``mlflow.sharedViewState.<key>`` that
``?viewStateShareKey=<key>`` opens (what its "Share" button writes). A study saves one
view under its own key (``save_study_view``) and prints the page that opens it.

>>> view = study_view("transfer-study-6047aa3e", "test_acc")
>>> view["searchFilter"]
"tags.`freezelab.study` = 'transfer-study-6047aa3e' AND tags.`freezelab.stage` = 'finetune'"
>>> view["orderByKey"], view["groupBy"]["groupByKeys"]
('metrics.`test_acc`', [{'mode': 'tag', 'groupByData': 'freezelab.variant'}])
"""

from __future__ import annotations

import json
from typing import Any

from freezelab.mlflow.tracking import FINETUNE, STAGE_TAG, STUDY_TAG, VARIANT_TAG
from freezelab.trainers.metric_names import mlflow_name

# The experiment tag that holds a shared view of the runs table, by its key.
SHARED_VIEW_TAG = "mlflow.sharedViewState."
# What a run costs, as the tables and the summary state it: seconds of training.
COST_METRIC = mlflow_name("train_time_s")


def view_key(study_tag: str) -> str:
    """The key of a study's view: one per study, the same when it is resumed."""
    return f"freezelab-{study_tag}"


def study_view(study_tag: str, metric: str, variants: bool = True) -> dict[str, Any]:
    """The view of a study's fine-tuning runs: its selection and pretraining runs and
    every other study left out, sorted by ``metric`` (best first), grouped by target
    variant (``variants``), with ``metric``, val_acc and the cost as columns."""
    columns = [f"metrics.`{m}`" for m in dict.fromkeys([metric, "val_acc", COST_METRIC])]
    view: dict[str, Any] = {
        "searchFilter": (
            f"tags.`{STUDY_TAG}` = '{study_tag}' AND tags.`{STAGE_TAG}` = '{FINETUNE}'"
        ),
        "orderByKey": f"metrics.`{metric}`",
        "orderByAsc": False,
        "startTime": "ALL",
        "lifecycleFilter": "Active",
        "selectedColumns": columns,
        "groupBy": None,
    }
    if variants:
        view["groupBy"] = {
            # A group's row shows its best run's numbers.
            "aggregateFunction": "max",
            "groupByKeys": [{"mode": "tag", "groupByData": VARIANT_TAG}],
        }
    return view


def save_study_view(client: Any, experiment_id: str, key: str, view: dict[str, Any]) -> None:
    """Store ``view`` in the experiment under ``key`` (replacing an older one)."""
    client.set_experiment_tag(experiment_id, SHARED_VIEW_TAG + key, json.dumps(view))


def has_view(client: Any, experiment_id: str, key: str) -> bool:
    return SHARED_VIEW_TAG + key in client.get_experiment(experiment_id).tags
