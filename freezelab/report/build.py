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
from freezelab.report.page import html_page
from freezelab.report.rows import diverged_rows, group_rows, number_or, table_row
from freezelab.report.runs import (
    ReportError,
    RunRecord,
    find_weights,
    load_record,
    resolve_target,
)
from freezelab.report.summary import summarize_variants

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
    summary = summarize_variants(groups, diverged_rows(rows))
    index = directory / "index.html"
    study_url = _study_url(client, uri, found.parent_run_id)
    index.write_text(html_page(found.description, rows, groups, figures, summary, notes, study_url))
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


def _study_url(client: Any, uri: str, parent_run_id: str | None) -> str | None:
    """The MLflow page of a study's runs (its saved view), when the target is a study
    that saved one."""
    from freezelab.mlflow.tracking import STUDY_TAG, ui_page
    from freezelab.mlflow.views import has_view, view_key

    if parent_run_id is None:
        return None
    parent = client.get_run(parent_run_id)
    study = parent.data.tags.get(STUDY_TAG)
    experiment_id = parent.info.experiment_id
    if not study or not has_view(client, experiment_id, view_key(study)):
        return None
    return ui_page(uri, experiment_id, view=view_key(study))


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
