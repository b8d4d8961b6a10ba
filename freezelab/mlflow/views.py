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
>>> [s["name"] for s in view["compareRunSections"]][:3]
['Model metrics', 'cost', 'shifted/test_acc']
>>> [c["metricKey"] for c in view["compareRunCharts"]][:2]
['test_acc', 'val_acc']

The same view orders the page's chart mode (``&compareRunsMode=CHART``): the metrics a
run is judged by first, then the cost, then the diagnostics' sections collapsed. MLflow
otherwise sorts its sections alphabetically with the unprefixed metrics last; it keeps a
view's order when ``isAccordionReordered`` is set, and adds a chart for each metric the
view does not list to the section of its name (a section of its own when none has it).
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


# Chart sections in the order the chart mode shows them: (name, shown expanded). A
# section holds the metrics whose name up to the last "/" is its name; MLflow names the
# unprefixed metrics' section "Model metrics" (``trainers/metric_names.py``).
CHART_SECTIONS = (
    ("Model metrics", True),
    ("cost", True),
    ("shifted/test_acc", False),
    ("shifted/val_acc", False),
    ("forgetting", False),
    ("model", False),
    ("epoch", False),
    ("drift", False),
    ("grad_norm", False),
    ("rel_grad_norm", False),
    ("early/grad_norm", False),
    ("early/rel_grad_norm", False),
    ("lr", False),
    ("run", False),
    ("run/train_images", False),
)
# The charts listed first in their section: the verdict metric comes before these.
LEAD_CHARTS = ("val_acc", "val_loss", "train_loss", COST_METRIC, "cost/gflops")


def chart_layout(metric: str) -> dict[str, Any]:
    """The chart mode's sections (``CHART_SECTIONS``) and its first charts: ``metric``,
    then ``LEAD_CHARTS``, as line charts over the epochs."""
    sections = [
        {"uuid": f"freezelab-{name}", "name": name, "display": shown, "isReordered": True}
        for name, shown in CHART_SECTIONS
    ]
    charts = []
    for key in dict.fromkeys([metric, *LEAD_CHARTS]):
        section = key.rpartition("/")[0] or "Model metrics"
        charts.append(
            {
                "uuid": f"freezelab-chart-{key}",
                "type": "LINE",
                "metricSectionId": f"freezelab-{section}",
                "metricKey": key,
                "selectedMetricKeys": [key],
                "deleted": False,
                "isGenerated": False,
                "runsCountToCompare": 10,
                "lineSmoothness": 0,
                "scaleType": "linear",
                "xAxisScaleType": "linear",
                "xAxisKey": "step",
                "selectedXAxisMetricKey": "",
                "yAxisKey": "metric",
                "yAxisExpressions": [],
                "range": {},
                "ignoreOutliers": False,
                "useGlobalXaxisKey": True,
                "useGlobalLineSmoothing": True,
            }
        )
    return {
        "isAccordionReordered": True,
        "compareRunSections": sections,
        "compareRunCharts": charts,
    }


def view_key(study_tag: str) -> str:
    """The key of a study's view: one per study, the same when it is resumed."""
    return f"freezelab-{study_tag}"


def study_view(study_tag: str, metric: str, variants: bool = True) -> dict[str, Any]:
    """The view of a study's fine-tuning runs: its selection and pretraining runs and
    every other study left out, sorted by ``metric`` (best first), grouped by target
    variant (``variants``), with ``metric``, val_acc and the cost as columns; its chart
    mode in ``chart_layout``'s order."""
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
        **chart_layout(metric),
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
