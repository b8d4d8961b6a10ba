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
from freezelab.report.rows import (
    by_variant,
    group_rows,
    number_or,
    pareto_front,
    table_row,
    time_and_accuracy,
)
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


# -- figures (matplotlib's Agg canvas, no pyplot state) --------------------------------

FIGURES = (
    "accuracy_vs_time",
    "learning_curves",
    "drift",
    "cka",
    "gradient_shock",
    "shift_accuracy",
    "forgetting",
)
MAX_DRIFT_PANELS = 12


def draw_figures(
    directory: Path,
    records: list[RunRecord],
    rows: list[dict[str, Any]],
    groups: list[dict[str, Any]],
) -> dict[str, Path]:
    """One PNG per figure in ``FIGURES``. ``records`` and ``rows`` align (one per run);
    ``groups`` are the settings (``group_rows``), and each setting has one color."""
    import matplotlib

    color_of = {g["label"]: _color(i, len(groups)) for i, g in enumerate(groups)}
    gray = (0.5, 0.5, 0.5, 1.0)
    colors = [color_of.get(row["label"], gray) for row in rows]
    paths = {}
    # Labels are policy labels and run names, never math: a regex's "$" stays a "$".
    with matplotlib.rc_context({"text.parse_math": False}):
        figures = {
            "accuracy_vs_time": _accuracy_vs_time(groups, rows, colors),
            "learning_curves": _learning_curves(records, rows, colors),
            "drift": _drift(records, [_run_label(row, rows) for row in rows]),
            "cka": _similarity(groups, [color_of[g["label"]] for g in groups]),
            "gradient_shock": _gradient_shock(rows, colors),
            "shift_accuracy": _shift_accuracy(groups, color_of),
            "forgetting": _forgetting(groups, color_of),
        }
        for name, figure in figures.items():
            paths[name] = directory / f"{name}.png"
            figure.savefig(paths[name], dpi=100)
    return paths


def _run_label(row: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    """The setting's label, and the run's seed (else its name) when the setting repeats."""
    if sum(r["label"] == row["label"] for r in rows) == 1:
        return row["label"]
    return row["label"] + (f" seed={row['seed']}" if row["seed"] else f" [{row['run_name']}]")


def _figure(width: float, height: float):
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        message = "freezelab report draws with matplotlib: pip install matplotlib"
        raise ImportError(message) from None
    figure = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _color(index: int, count: int):
    import matplotlib

    return matplotlib.colormaps["tab10" if count <= 10 else "tab20"](index % 20)


def _accuracy_vs_time(groups: list[dict[str, Any]], rows: list[dict[str, Any]], colors) -> Any:
    figure = _figure(7, 4.5)
    ax = figure.add_subplot()
    ax.scatter(
        [number_or(r["train_time_s"], math.nan) for r in rows],
        [number_or(r["val_acc"], math.nan) for r in rows],
        color=colors,
        s=12,
        alpha=0.45,
        zorder=2,
    )
    front = pareto_front(time_and_accuracy(groups))
    for i, group in enumerate(groups):
        x, y = number_or(group["train_time_s"], math.nan), group["val_acc"]
        error = None
        if group["ci95_low"] is not None:
            error = [[y - group["ci95_low"]], [group["ci95_high"] - y]]
        ax.errorbar(
            [x],
            [y],
            yerr=error,
            fmt="o",
            color=_color(i, len(groups)),
            markeredgecolor="black" if i in front else "none",
            markersize=7,
            capsize=3,
            zorder=3,
        )
        ax.annotate(group["label"], (x, y), textcoords="offset points", xytext=(6, 4), fontsize=8)
    if len(front) > 1:
        xs = [groups[i]["train_time_s"] for i in front]
        ys = [groups[i]["val_acc"] for i in front]
        ax.step(xs, ys, where="post", linestyle="--", color="gray", label="Pareto front", zorder=1)
        ax.legend(loc="lower right", fontsize=8)
    times = [t for t, _ in time_and_accuracy(groups) if 0 < t < math.inf]
    if times and max(times) / min(times) > 20:
        ax.set_xscale("log")
    ax.set_xlabel("training time per run (s, train_time_s)")
    ax.set_ylabel("val_acc at the last epoch")
    repeats = max(g["n"] for g in groups) > 1
    ax.set_title(
        "Accuracy against training compute"
        + (": mean and 95% interval per setting, dots are runs" if repeats else "")
    )
    ax.grid(alpha=0.3)
    return figure


def _learning_curves(records: list[RunRecord], rows: list[dict[str, Any]], colors) -> Any:
    figure = _figure(11, 4.5)
    axes = figure.subplots(1, 2)
    labelled = set()
    for record, row, color in zip(records, rows, colors, strict=True):
        # One legend entry per setting; its repeats share the color.
        label = None if row["label"] in labelled else row["label"]
        labelled.add(row["label"])
        for ax, key in zip(axes, ("val_acc", "train_loss"), strict=True):
            series = record.series(key)
            ax.plot(
                [e + 1 for e, _ in series],
                [v for _, v in series],
                marker=".",
                color=color,
                label=label,
                alpha=0.8,
            )
    for ax, key in zip(axes, ("val_acc", "train_loss"), strict=True):
        _epoch_axis(ax)
        ax.set_title(key)
    axes[0].legend(fontsize=7, loc="best")
    return figure


def _drift(records: list[RunRecord], labels: list[str]) -> Any:
    import matplotlib

    shown = records[:MAX_DRIFT_PANELS]
    columns = min(3, len(shown))
    lines = -(-len(shown) // columns)
    figure = _figure(4.2 * columns, 3.2 * lines)
    figure.suptitle("Relative L2 drift of each layer group from its starting weights")
    axes = figure.subplots(lines, columns, squeeze=False).flatten()
    palette = matplotlib.colormaps["viridis"]
    for ax, record, label in zip(axes, shown, labels, strict=False):
        backbone = [g for g in record.groups if g not in record.head_groups]
        # The head starts from scratch and moves far more than any backbone group:
        # on its own (right) axis it does not flatten the backbone's curves.
        head_ax = ax.twinx() if backbone and len(backbone) < len(record.groups) else ax
        for j, group in enumerate(backbone):
            series = record.series(f"drift/{group}")
            ax.plot(
                [e + 1 for e, _ in series],
                [v for _, v in series],
                marker=".",
                color=palette(j / max(1, len(backbone) - 1)),
                label=group,
            )
        for group in (g for g in record.groups if g in record.head_groups):
            series = record.series(f"drift/{group}")
            name = f"{group} (right axis)" if head_ax is not ax else group
            head_ax.plot(
                [e + 1 for e, _ in series],
                [v for _, v in series],
                marker=".",
                color="gray",
                linestyle="--",
                label=name,
            )
        if not record.groups:
            ax.text(0.5, 0.5, "no drift/ metrics", ha="center", transform=ax.transAxes)
        ax.set_title(label, fontsize=9)
        _epoch_axis(ax)
        for axis in {ax, head_ax}:
            axis.set_ylim(bottom=0)  # drift is a distance: 0 means untouched
        handles = ax.get_legend_handles_labels()
        if head_ax is not ax:
            more = head_ax.get_legend_handles_labels()
            handles = (handles[0] + more[0], handles[1] + more[1])
        if handles[0]:
            ax.legend(*handles, fontsize=6, loc="upper left")
    for ax in axes[len(shown) :]:
        ax.set_visible(False)
    return figure


def _gradient_shock(rows: list[dict[str, Any]], colors) -> Any:
    """(4): the backbone's gradient norm over its first trained steps, one line per run."""
    figure = _figure(7, 4.2)
    ax = figure.add_subplot()
    labelled = set()
    for row, color in zip(rows, colors, strict=True):
        steps = row.get("backbone_grad_steps") or []
        if not steps:
            continue
        label = None if row["label"] in labelled else row["label"]
        labelled.add(row["label"])
        ax.plot(range(1, len(steps) + 1), steps, marker=".", color=color, label=label, alpha=0.8)
    if labelled:
        from matplotlib.ticker import FuncFormatter, NullFormatter

        ax.legend(fontsize=7, loc="best")
        ax.set_yscale("log")
        # Plain numbers: math text is off for the labels' sake.
        ax.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
        ax.yaxis.set_minor_formatter(NullFormatter())
    else:
        _no_data(ax, "no early gradient norms (metrics.gradients) or no policy trains the backbone")
    ax.set_xlabel("step since the backbone started to train")
    ax.set_ylabel("L2 norm of the backbone's gradient")
    ax.set_title("Gradient shock: the backbone's first trained steps")
    ax.grid(alpha=0.3)
    return figure


def _bars_with_intervals(ax: Any, groups: list[dict[str, Any]], key: str, color_of) -> bool:
    shown = [g for g in groups if g["best_of_policy"] and g.get(key) is not None]
    for position, group in enumerate(shown):
        interval = group["ci95"].get(key)
        error = (
            None if interval is None else [[group[key] - interval[0]], [interval[1] - group[key]]]
        )
        ax.barh(position, group[key], xerr=error, color=color_of[group["label"]], capsize=3)
    ax.set_yticks(range(len(shown)), [g["label"] for g in shown], fontsize=8)
    ax.invert_yaxis()
    return bool(shown)


def _shift_accuracy(groups: list[dict[str, Any]], color_of) -> Any:
    """(2): val_acc on the target and under each shift or extra set, per policy."""
    evaluations = sorted({n for g in groups for n in g.get("evaluations", [])})
    variants = by_variant(groups)
    panels = [(v, None) for v in variants] + [(v, n) for v in variants for n in evaluations]
    columns = min(3, len(panels))
    lines = -(-len(panels) // columns)
    figure = _figure(4.4 * columns, 0.5 + 0.35 * len(groups) * lines + 1.2 * lines)
    figure.suptitle("Accuracy on the target and under each shift (best setting of each policy)")
    axes = figure.subplots(lines, columns, squeeze=False).flatten()
    for ax, (variant, name) in zip(axes, panels, strict=False):
        members = variants[variant]
        if name is None:
            drawn = _bars_with_intervals(ax, members, "val_acc", color_of)
            title = "val_acc"
        else:
            drawn = _bars_with_intervals(ax, members, f"eval/{name}", color_of)
            title = f"val_acc/{name}"
        ax.set_title(title + (f" (target {variant!r})" if variant else ""), fontsize=9)
        ax.set_xlim(0, 1.0)
        ax.grid(alpha=0.3, axis="x")
        if not drawn:
            _no_data(ax, "not measured")
    for ax in axes[len(panels) :]:
        ax.set_visible(False)
    return figure


def _forgetting(groups: list[dict[str, Any]], color_of) -> Any:
    """(3): forgetting of the source task per policy and target variant, with intervals."""
    from matplotlib.ticker import MaxNLocator

    variants = by_variant(groups)
    figure = _figure(5.5 * len(variants), 1.0 + 0.45 * max(len(v) for v in variants.values()))
    figure.suptitle("Forgetting of the source task, through the backbone's features")
    axes = figure.subplots(1, len(variants), squeeze=False)[0]
    for ax, (variant, members) in zip(axes, variants.items(), strict=True):
        if not _bars_with_intervals(ax, members, "forgetting", color_of):
            _no_data(ax, "not measured: give the runs forgetting.source")
        ax.axvline(0, color="black", linewidth=0.8)
        ax.xaxis.set_major_locator(MaxNLocator(5))
        ax.set_xlabel("probe accuracy, start minus end (0: nothing lost)")
        ax.set_title(f"target {variant!r}" if variant else "target", fontsize=9)
        ax.grid(alpha=0.3, axis="x")
    return figure


def _no_data(ax: Any, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, fontsize=9)


def _epoch_axis(ax: Any) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.grid(alpha=0.3)


def _similarity(groups: list[dict[str, Any]], colors: list) -> Any:
    figure = _figure(11, 0.9 + 0.4 * len(groups))
    axes = figure.subplots(1, 2, sharey=True)
    positions = list(range(len(groups)))[::-1]  # best setting on top
    for ax, key, title in (
        (axes[0], "cka", "backbone CKA, start vs fine-tuned (1 = unchanged)"),
        (axes[1], "backbone_drift", "final backbone drift (mean of non-head groups)"),
    ):
        for position, group, color in zip(positions, groups, colors, strict=True):
            value = group[key]
            if value is None or math.isnan(value):
                ax.text(0, position, " n/a", va="center", fontsize=8)
            else:
                ax.barh(position, value, color=color)
                ax.text(value, position, f" {value:.4f}", va="center", fontsize=8)
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3, axis="x")
    axes[0].set_xlim(0, 1.15)
    axes[0].set_yticks(positions, [g["label"] for g in groups], fontsize=8)
    return figure


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
