"""``freezelab report``: a sweep's (or an experiment's) runs as one HTML page with
figures, written to a directory and logged on the sweep's parent run.

>>> report = build_report("policy-sweep", tracking_uri="sqlite:///mlflow.db")  # doctest: +SKIP
[freezelab] report: freezelab_reports/policy-sweep/index.html
>>> report.rows[0]["policy"], report.figures["accuracy_vs_time"].name          # doctest: +SKIP
('full', 'accuracy_vs_time.png')
"""

from __future__ import annotations

import json
import logging
import math
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from freezelab import objectstore
from freezelab.redact import redact_uri
from freezelab.report.cka import backbone_cka
from freezelab.report.figures import MAX_DRIFT_PANELS, draw_figures
from freezelab.report.rows import group_rows, number_or, table_row
from freezelab.report.runs import (
    ReportError,
    RunRecord,
    find_weights,
    load_record,
    resolve_target,
)
from freezelab.report.summary import summarize_variants, val_acc_with_interval

log = logging.getLogger(__name__)

DEFAULT_ROOT = "freezelab_reports"
REPORT_ARTIFACT_PATH = "report"


@dataclass(frozen=True)
class Report:
    directory: Path
    index: Path
    figures: dict[str, Path]
    rows: list[dict[str, Any]]  # one per run, best first
    settings: list[dict[str, Any]]  # one per setting (repeats grouped), best first
    summary: str
    notes: list[str]
    parent_run_id: str | None
    logged: bool
    location: str | None = None  # where index.html was written: a path, or a URI (--out)


def build_report(
    target: str,
    out_dir: str | Path | None = None,
    tracking_uri: str | None = None,
    *,
    cka: bool = True,
    cka_samples: int = 64,
    with_pretraining: bool = False,
) -> Report:
    """Write ``index.html`` and its figures for ``target`` (a sweep parent run's name
    or id, or an experiment name) and log them on the sweep's parent run.

    ``out_dir`` is a local folder or a URI (``s3://bucket/reports/x``): there the
    report is written locally first, then copied, and the URI is checked first."""
    from freezelab.mlflow.compare import settings_of
    from freezelab.mlflow.tracking import open_store, resolve_tracking_uri, ui_page

    if out_dir is not None and objectstore.is_uri(str(out_dir)):
        objectstore.require_writable(str(out_dir), "--out")  # before any work
    uri = resolve_tracking_uri(tracking_uri)
    client = open_store(uri)
    found = resolve_target(client, target, with_pretraining=with_pretraining)
    notes = list(found.notes)
    records = []
    for run in found.runs:
        record = load_record(client, run, uri)
        if record.epochs == 0:
            notes.append(f"run {record.run_name}: no val_acc logged, left out")
            continue
        records.append(record)
    if not records:
        raise ReportError(f"{found.description} has no run with val_acc metrics to report")
    remote = out_dir is not None and objectstore.is_uri(str(out_dir))
    if remote:
        # Written here first (the figures, MLflow's upload), then copied to the URI.
        directory = Path(tempfile.mkdtemp(prefix="freezelab-report-"))
    else:
        directory = Path(out_dir) if out_dir else Path(DEFAULT_ROOT) / _slug(found.name)
    directory.mkdir(parents=True, exist_ok=True)

    similarity = _similarities(client, records, uri, cka_samples) if cka else {}
    # Settings within each target variant: what defines a variant labels no setting.
    settings = {}
    for variant in dict.fromkeys(r.variant for r in records):
        found_settings = settings_of({r.run_id: r.params for r in records if r.variant == variant})
        settings.update(
            {
                run_id: (json.dumps([variant, key]), label)
                for run_id, (key, label) in found_settings.items()
            }
        )
    rows = sorted(
        (
            table_row(r, *similarity.get(r.run_id, (None, "CKA not computed")), settings[r.run_id])
            for r in records
        ),
        key=lambda row: (-number_or(row["val_acc"], -math.inf), number_or(row["train_time_s"])),
    )
    groups = group_rows(rows, notes)
    by_id = {r.run_id: r for r in records}
    ordered = [by_id[row["run_id"]] for row in rows]
    for record in ordered:
        notes += [f"run {record.run_name} ({record.policy}): {n}" for n in record.notes]
    notes += [
        f"run {row['run_name']} ({row['policy']}): CKA skipped: {row['cka_source']}"
        for row in rows
        if row["cka"] is None and cka
    ]
    if len(rows) > MAX_DRIFT_PANELS:
        notes.append(f"the drift figure shows the best {MAX_DRIFT_PANELS} of {len(rows)} runs")
    for row in rows:
        row["mlflow_url"] = ui_page(uri, by_id[row["run_id"]].experiment_id, row["run_id"])
    figures = draw_figures(directory, ordered, rows, groups)
    summary = summarize_variants(groups)
    index = directory / "index.html"
    index.write_text(html_page(found.description, rows, groups, figures, summary, notes))
    (directory / "report.json").write_text(
        json.dumps(
            {
                "target": found.description,
                "settings": _json_safe(groups),
                "rows": _json_safe(rows),
                "summary": summary,
                "notes": notes,
            },
            indent=2,
        )
    )
    location = str(index.resolve())
    if remote:
        objectstore.copy_tree(str(directory), str(out_dir))
        location = objectstore.join(str(out_dir), index.name)
        log.info(f"report: {redact_uri(location)} (a local copy in {directory})")
    else:
        log.info(f"report: {location}")
    logged = _log_on_parent(client, found.parent_run_id, directory)
    return Report(
        directory,
        index,
        figures,
        rows,
        groups,
        summary,
        notes,
        found.parent_run_id,
        logged,
        location,
    )


def _similarities(
    client: Any, records: list[RunRecord], uri: str, samples: int
) -> dict[str, tuple[float | None, str]]:
    results: dict[str, tuple[float | None, str]] = {}
    starting: dict = {}
    with tempfile.TemporaryDirectory() as scratch:
        for record in records:
            weights, source = find_weights(client, record, uri, Path(scratch))
            if weights is None:
                results[record.run_id] = (None, source)
                continue
            try:
                value = backbone_cka(
                    record.config, str(weights), max_samples=samples, cache=starting
                )
            except Exception as err:  # a report with a gap beats no report
                results[record.run_id] = (None, f"{type(err).__name__}: {err}")
                continue
            results[record.run_id] = (value, source)
    return results


# -- the page ----------------------------------------------------------------------

# (key, header, format) of the settings table: one row per policy and setting.
SETTING_COLUMNS = (
    ("label", "policy [setting]", str),
    ("n", "runs", "{}"),
    ("mean_ci95", "val_acc (mean ± 95% interval)", str),
    ("std", "std", "{:.4f}"),
    ("best_val_acc", "best-epoch val_acc (mean)", "{:.4f}"),
    ("train_time_s", "training time (s, mean)", "{:.2f}"),
    ("images_per_s", "images/s", "{:.0f}"),
    ("trainable_share", "trainable share", "{:.2%}"),
    ("backbone_drift", "backbone drift (final)", "{:.4f}"),
    ("cka", "backbone CKA", "{:.4f}"),
)
# ... and of the runs table: one row per run.
COLUMNS = (
    ("label", "policy [setting]", str),
    ("seed", "seed", str),
    ("run_name", "run", str),
    ("val_acc", "val_acc", "{:.4f}"),
    ("best_val_acc", "best val_acc", "{:.4f}"),
    ("epochs_to_best", "epochs to best", "{}"),
    ("train_time_s", "training time (s)", "{:.2f}"),
    ("images_per_s", "images/s", "{:.0f}"),
    ("trainable_share", "trainable share", "{:.2%}"),
    ("backbone_drift", "backbone drift (final)", "{:.4f}"),
    ("cka", "backbone CKA", "{:.4f}"),
    ("status", "status", str),
    ("run_id", "MLflow run", str),
)
CAPTIONS = {
    "accuracy_vs_time": "Accuracy against training compute; the dashed line is the Pareto front.",
    "learning_curves": "Learning curves: validation accuracy and training loss per epoch.",
    "drift": "Feature drift: how far each layer group moved from its starting weights "
    "(dashed: the head).",
    "cka": "How much of the starting representation each setting kept: linear CKA of the "
    "classifier's input on a fixed validation batch, and the final backbone drift.",
    "gradient_shock": "(4) The gradient the backbone receives in its first trained steps: "
    "under full fine-tuning from a random head, under lp_ft after the probe.",
    "shift_accuracy": "(2) Accuracy on the target's validation set and under each shift or "
    "extra evaluation set (data.eval_shifts, data.eval_sets), with 95% intervals.",
    "forgetting": "(3) Forgetting: a linear probe on the backbone's features of the source "
    "task, its accuracy at the start minus at the end of each run, with 95% intervals.",
}


def html_page(
    title: str,
    rows: list[dict[str, Any]],
    groups: list[dict[str, Any]],
    figures: dict[str, Path],
    summary: str,
    notes: list[str],
) -> str:
    """One self-contained page: the figures are embedded as data URIs, so the page
    shows them wherever it is opened, MLflow's sandboxed artifact view included."""
    import base64
    from html import escape

    from freezelab.mlflow.tracking import LOCAL_UI

    shown = [{**g, "mean_ci95": val_acc_with_interval(g)} for g in groups]
    images = "".join(
        f'<figure><img src="data:image/png;base64,{base64.b64encode(path.read_bytes()).decode()}"'
        f' alt="{escape(name)}" data-file="{escape(path.name)}">'
        f"<figcaption>{escape(CAPTIONS.get(name, name))}</figcaption></figure>\n"
        for name, path in figures.items()
    )
    noted = "".join(f"<li>{escape(note)}</li>" for note in notes) or "<li>none</li>"
    paragraphs = "".join(f"<p>{escape(text)}</p>" for text in summary.split("\n\n"))
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>freezelab report: {escape(title)}</title>
<style>
body {{ font-family: sans-serif; max-width: 1150px; margin: 2em auto; color: #222; }}
table {{ border-collapse: collapse; font-size: 0.9em; }}
th, td {{ border: 1px solid #ccc; padding: 4px 8px; text-align: right; }}
td:first-child, th {{ text-align: left; }}
img {{ max-width: 100%; }} figure {{ margin: 1.5em 0; }} figcaption {{ color: #555; }}
</style></head><body>
<h1>freezelab report: {escape(title)}</h1>
<h2>Summary</h2><div id="summary">{paragraphs}</div>
<h2>Policies and settings</h2>
<p>One row per policy and setting (the values of the params that vary, the seed aside),
best first. val_acc is the last epoch's, the accuracy of the model a run hands over; its
95% interval is Student's t over the setting's finished runs.</p>
{_table("settings", SETTING_COLUMNS, shown)}
<h2>Runs</h2>
{_table("runs", COLUMNS, rows)}
<p>Each MLflow run links to its page in the MLflow UI: the tracking server's, or for a local
store the address of <code>mlflow ui</code> ({escape(LOCAL_UI)}).</p>
<p>Training time is <code>train_time_s</code>, the sum of the training passes; the trainable
share is that of the last epoch; backbone drift is the mean over the non-head layer groups of
their relative L2 drift at the last epoch.</p>
<h2>Figures</h2>
{images}<h2>Notes</h2><ul>{noted}</ul>
</body></html>
"""


def _table(name: str, columns: tuple, rows: list[dict[str, Any]]) -> str:
    from html import escape

    head = "".join(f"<th>{escape(header)}</th>" for _, header, _ in columns)

    def cell(row: dict[str, Any], key: str, fmt: Any) -> str:
        text = escape(_format(row.get(key), fmt))
        if key == "run_id" and row.get("mlflow_url"):
            # The run's page in the MLflow UI (a new tab: MLflow shows this page framed).
            url = escape(row["mlflow_url"])
            return f'<td><a href="{url}" target="_blank" rel="noopener">{text}</a></td>'
        return f"<td>{text}</td>"

    body = "".join(
        "<tr>" + "".join(cell(row, key, fmt) for key, _, fmt in columns) + "</tr>\n" for row in rows
    )
    return f'<table id="{name}"><thead><tr>{head}</tr></thead><tbody>\n{body}</tbody></table>'


def _format(value: Any, fmt: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return fmt(value) if callable(fmt) else fmt.format(value)


def _log_on_parent(client: Any, parent_run_id: str | None, directory: Path) -> bool:
    if parent_run_id is None:
        log.info("report not logged to MLflow: the runs have no sweep parent run")
        return False
    try:
        client.log_artifacts(parent_run_id, str(directory), artifact_path=REPORT_ARTIFACT_PATH)
    except Exception as err:  # the local report stands even when the store is down
        log.warning(f"report not logged on run {parent_run_id}: {err}")
        return False
    log.info(f"report logged on run {parent_run_id} under {REPORT_ARTIFACT_PATH}/")
    return True


def _json_safe(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    # NaN is not JSON: a missing number is null.
    return [
        {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in row.items()}
        for row in rows
    ]


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.=-]+", "_", name).strip("._") or "report"
