"""``freezelab report``: a sweep's (or an experiment's) runs as one HTML page with
figures, written to a directory and logged on the sweep's parent run.

>>> report = build_report("policy-sweep", tracking_uri="sqlite:///mlflow.db")  # doctest: +SKIP
[freezelab] report: freezelab_reports/policy-sweep/index.html
>>> report.rows[0]["policy"], report.figures["accuracy_vs_time"].name          # doctest: +SKIP
('full', 'accuracy_vs_time.png')
"""

from __future__ import annotations

import json
import math
import re
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from freezelab.report.cka import backbone_cka
from freezelab.report.runs import (
    ReportError,
    RunRecord,
    find_weights,
    load_record,
    resolve_target,
)

DEFAULT_ROOT = "freezelab_reports"
REPORT_ARTIFACT_PATH = "report"
# CKA at or above this counts as "the representation kept intact" in the summary.
INTACT_CKA = 0.999


@dataclass(frozen=True)
class Report:
    directory: Path
    index: Path
    figures: dict[str, Path]
    rows: list[dict[str, Any]]  # one per run, best first
    summary: str
    notes: list[str]
    parent_run_id: str | None
    logged: bool


def build_report(
    target: str,
    out_dir: str | Path | None = None,
    tracking_uri: str | None = None,
    *,
    cka: bool = True,
    cka_samples: int = 64,
) -> Report:
    """Write ``index.html`` and its figures for ``target`` (a sweep parent run's name
    or id, or an experiment name) and log them on the sweep's parent run."""
    from freezelab.mlflow.tracking import open_store, resolve_tracking_uri

    uri = resolve_tracking_uri(tracking_uri)
    client = open_store(uri)
    found = resolve_target(client, target)
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
    directory = Path(out_dir) if out_dir else Path(DEFAULT_ROOT) / _slug(found.name)
    directory.mkdir(parents=True, exist_ok=True)

    similarity = _similarities(client, records, uri, cka_samples) if cka else {}
    rows = sorted(
        (table_row(r, *similarity.get(r.run_id, (None, "CKA not computed"))) for r in records),
        key=lambda row: (-_number(row["best_val_acc"], -math.inf), _number(row["train_time_s"])),
    )
    _label_uniquely(rows)
    by_id = {r.run_id: r for r in records}
    ordered = [by_id[row["run_id"]] for row in rows]
    labels = [row["label"] for row in rows]
    for record in ordered:
        notes += [f"run {record.run_name} ({record.policy}): {n}" for n in record.notes]
    notes += [
        f"run {row['run_name']} ({row['policy']}): CKA skipped: {row['cka_source']}"
        for row in rows
        if row["cka"] is None and cka
    ]
    if len(rows) > MAX_DRIFT_PANELS:
        notes.append(f"the drift figure shows the best {MAX_DRIFT_PANELS} of {len(rows)} runs")
    figures = draw_figures(directory, ordered, labels, rows, pareto_front(_points(rows)))
    summary = summarize(rows)
    index = directory / "index.html"
    index.write_text(html_page(found.description, rows, figures, summary, notes))
    (directory / "report.json").write_text(
        json.dumps(
            {
                "target": found.description,
                "rows": _json_safe(rows),
                "summary": summary,
                "notes": notes,
            },
            indent=2,
        )
    )
    print(f"[freezelab] report: {index.resolve()}")
    logged = _log_on_parent(client, found.parent_run_id, directory)
    return Report(directory, index, figures, rows, summary, notes, found.parent_run_id, logged)


def table_row(record: RunRecord, cka: float | None, cka_source: str) -> dict[str, Any]:
    """The report's table row of a run: every number is read from its MLflow metrics."""
    return {
        "policy": record.policy,
        "label": record.policy,
        "run_name": record.run_name,
        "run_id": record.run_id,
        "status": record.status,
        "best_val_acc": record.best_val_acc,
        "epochs_to_best": record.epochs_to_best,
        "epochs": record.epochs,
        "train_time_s": record.train_time_s,
        "images_per_s": record.images_per_s,
        "trainable_share": record.trainable_share,
        "backbone_drift": record.backbone_drift,
        "cka": cka,
        "cka_source": cka_source,
    }


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


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the (cost, accuracy) points no other point beats on both (lower
    cost, higher accuracy), cheapest first. Points with a NaN are never on it.

    >>> pareto_front([(1.0, 0.5), (2.0, 0.9), (3.0, 0.8), (0.5, 0.5)])
    [3, 1]
    """
    valid = [i for i, (c, a) in enumerate(points) if not (math.isnan(c) or math.isnan(a))]
    front, best = [], -math.inf
    for i in sorted(valid, key=lambda i: (points[i][0], -points[i][1])):
        if points[i][1] > best:
            front.append(i)
            best = points[i][1]
    return front


def summarize(rows: list[dict[str, Any]]) -> str:
    """A few sentences from the table: the winner, its cost, what each policy kept.

    ``rows`` are best first (as ``build_report`` sorts them).
    """
    winner = rows[0]
    sentences = [
        f"{winner['label']} won: best val_acc {winner['best_val_acc']:.4f}, reached after "
        f"{winner['epochs_to_best']} of {winner['epochs']} epochs in "
        f"{_seconds(winner['train_time_s'])} of training "
        f"({winner['images_per_s']:.0f} images/s), with "
        f"{_percent(winner['trainable_share'])} of the parameters trainable."
    ]
    ties = [r["label"] for r in rows[1:] if r["best_val_acc"] == winner["best_val_acc"]]
    if ties:
        sentences.append(f"Tied with it on accuracy, but slower: {', '.join(ties)}.")
    elif len(rows) > 1:
        second = rows[1]
        sentences.append(
            f"Runner-up: {second['label']} at {second['best_val_acc']:.4f} "
            f"({second['best_val_acc'] - winner['best_val_acc']:+.4f})."
        )
    fastest = min(rows, key=lambda r: _number(r["train_time_s"]))
    if fastest is winner:
        sentences.append("The winner was also the fastest run.")
    elif winner["train_time_s"] > 0 and fastest["train_time_s"] > 0:
        sentences.append(
            f"The cost of winning: {winner['train_time_s'] / fastest['train_time_s']:.1f}x the "
            f"training time of the fastest run, {fastest['label']} "
            f"({_seconds(fastest['train_time_s'])}, best val_acc {fastest['best_val_acc']:.4f})."
        )
    front = pareto_front(_points(rows))
    if len(rows) > 1:
        names = ", ".join(rows[i]["label"] for i in front)
        sentences.append(f"On the accuracy/compute Pareto front: {names}.")
    sentences.append(_kept(rows))
    return " ".join(sentences)


def _kept(rows: list[dict[str, Any]]) -> str:
    parts = []
    for row in rows:
        drift, cka = row["backbone_drift"], row["cka"]
        measured = cka is not None and not math.isnan(cka)
        if not measured:
            amount = "intact" if drift == 0 else "unmeasured"
        elif cka >= INTACT_CKA:
            amount = "intact"
        else:
            amount = "mostly" if cka >= 0.9 else "partly" if cka >= 0.5 else "little of it"
        details = [f"CKA {cka:.4f}" if measured else "no CKA"]
        details.append("no drift data" if math.isnan(drift) else f"backbone drift {drift:.4f}")
        parts.append(f"{row['label']} {amount} ({', '.join(details)})")
    return "Starting representation kept: " + "; ".join(parts) + "."


# -- figures (matplotlib's Agg canvas, no pyplot state) --------------------------------

FIGURES = ("accuracy_vs_time", "learning_curves", "drift", "cka")
MAX_DRIFT_PANELS = 12


def draw_figures(
    directory: Path,
    records: list[RunRecord],
    labels: list[str],
    rows: list[dict[str, Any]],
    front: list[int],
) -> dict[str, Path]:
    """One PNG per figure in ``FIGURES``; ``records``, ``labels`` and ``rows`` align."""
    import matplotlib

    colors = [_color(i, len(records)) for i in range(len(records))]
    paths = {}
    # Labels are policy labels and run names, never math: a regex's "$" stays a "$".
    with matplotlib.rc_context({"text.parse_math": False}):
        figures = {
            "accuracy_vs_time": _accuracy_vs_time(rows, front, colors),
            "learning_curves": _learning_curves(records, labels, colors),
            "drift": _drift(records, labels),
            "cka": _similarity(rows, colors),
        }
        for name, figure in figures.items():
            paths[name] = directory / f"{name}.png"
            figure.savefig(paths[name], dpi=100)
    return paths


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


def _accuracy_vs_time(rows: list[dict[str, Any]], front: list[int], colors: list) -> Any:
    figure = _figure(7, 4.5)
    ax = figure.add_subplot()
    for i, row in enumerate(rows):
        x, y = _number(row["train_time_s"], math.nan), _number(row["best_val_acc"], math.nan)
        edge = "black" if i in front else "none"
        ax.scatter([x], [y], color=colors[i], s=50, zorder=3, edgecolors=edge)
        ax.annotate(row["label"], (x, y), textcoords="offset points", xytext=(5, 4), fontsize=8)
    if front:
        xs = [rows[i]["train_time_s"] for i in front]
        ys = [rows[i]["best_val_acc"] for i in front]
        ax.step(xs, ys, where="post", linestyle="--", color="gray", label="Pareto front", zorder=2)
        ax.legend(loc="lower right", fontsize=8)
    times = [t for t, _ in _points(rows) if 0 < t < math.inf]
    if times and max(times) / min(times) > 20:
        ax.set_xscale("log")
    ax.set_xlabel("training time (s, train_time_s)")
    ax.set_ylabel("best val_acc")
    ax.set_title("Accuracy against training compute (one point per run)")
    ax.grid(alpha=0.3)
    return figure


def _learning_curves(records: list[RunRecord], labels: list[str], colors: list) -> Any:
    figure = _figure(11, 4.5)
    axes = figure.subplots(1, 2)
    for record, label, color in zip(records, labels, colors, strict=True):
        for ax, key in zip(axes, ("val_acc", "train_loss"), strict=True):
            series = record.series(key)
            ax.plot(
                [e + 1 for e, _ in series],
                [v for _, v in series],
                marker=".",
                color=color,
                label=label,
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


def _epoch_axis(ax: Any) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.grid(alpha=0.3)


def _similarity(rows: list[dict[str, Any]], colors: list) -> Any:
    figure = _figure(11, 0.9 + 0.4 * len(rows))
    axes = figure.subplots(1, 2, sharey=True)
    positions = list(range(len(rows)))[::-1]  # best run on top
    for ax, key, title in (
        (axes[0], "cka", "backbone CKA, start vs fine-tuned (1 = unchanged)"),
        (axes[1], "backbone_drift", "final backbone drift (mean of non-head groups)"),
    ):
        for position, row, color in zip(positions, rows, colors, strict=True):
            value = row[key]
            if value is None or math.isnan(value):
                ax.text(0, position, " n/a", va="center", fontsize=8)
            else:
                ax.barh(position, value, color=color)
                ax.text(value, position, f" {value:.4f}", va="center", fontsize=8)
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3, axis="x")
    axes[0].set_xlim(0, 1.15)
    axes[0].set_yticks(positions, [row["label"] for row in rows], fontsize=8)
    return figure


# -- the page ----------------------------------------------------------------------

COLUMNS = (
    ("label", "policy", str),
    ("run_name", "run", str),
    ("best_val_acc", "best val_acc", "{:.4f}"),
    ("epochs_to_best", "epochs to best", "{}"),
    ("train_time_s", "training time (s)", "{:.2f}"),
    ("images_per_s", "images/s (mean)", "{:.0f}"),
    ("trainable_share", "trainable share", "{:.2%}"),
    ("backbone_drift", "backbone drift (final)", "{:.4f}"),
    ("cka", "backbone CKA", "{:.4f}"),
    ("status", "status", str),
)
CAPTIONS = {
    "accuracy_vs_time": "Accuracy against training compute; the dashed line is the Pareto front.",
    "learning_curves": "Learning curves: validation accuracy and training loss per epoch.",
    "drift": "Feature drift: how far each layer group moved from its starting weights "
    "(dashed: the head).",
    "cka": "How much of the starting representation each run kept: linear CKA of the "
    "classifier's input on a fixed validation batch, and the final backbone drift.",
}


def html_page(
    title: str,
    rows: list[dict[str, Any]],
    figures: dict[str, Path],
    summary: str,
    notes: list[str],
) -> str:
    """A self-contained page; the figures are referenced next to it."""
    from html import escape

    head = "".join(f"<th>{escape(name)}</th>" for _, name, _ in COLUMNS)
    body = "".join(
        "<tr>"
        + "".join(f"<td>{escape(_format(row[key], fmt))}</td>" for key, _, fmt in COLUMNS)
        + "</tr>\n"
        for row in rows
    )
    images = "".join(
        f'<figure><img src="{escape(path.name)}" alt="{escape(name)}">'
        f"<figcaption>{escape(CAPTIONS.get(name, name))}</figcaption></figure>\n"
        for name, path in figures.items()
    )
    noted = "".join(f"<li>{escape(note)}</li>" for note in notes) or "<li>none</li>"
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>freezelab report: {escape(title)}</title>
<style>
body {{ font-family: sans-serif; max-width: 1150px; margin: 2em auto; color: #222; }}
table {{ border-collapse: collapse; font-size: 0.9em; }}
th, td {{ border: 1px solid #ccc; padding: 4px 8px; text-align: right; }}
td:nth-child(-n+2), th {{ text-align: left; }}
img {{ max-width: 100%; }} figure {{ margin: 1.5em 0; }} figcaption {{ color: #555; }}
</style></head><body>
<h1>freezelab report: {escape(title)}</h1>
<h2>Summary</h2><p>{escape(summary)}</p>
<h2>Policies</h2>
<table><thead><tr>{head}</tr></thead><tbody>
{body}</tbody></table>
<p>Training time is the sum of the epochs' <code>epoch_time_s</code>; the trainable share is
that of the last epoch; backbone drift is the mean over the non-head layer groups of their
relative L2 drift at the last epoch.</p>
<h2>Figures</h2>
{images}<h2>Notes</h2><ul>{noted}</ul>
</body></html>
"""


def _format(value: Any, fmt: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return fmt(value) if callable(fmt) else fmt.format(value)


def _points(rows: list[dict[str, Any]]) -> list[tuple[float, float]]:
    return [(_number(r["train_time_s"]), _number(r["best_val_acc"])) for r in rows]


def _label_uniquely(rows: list[dict[str, Any]]) -> None:
    counts: dict[str, int] = {}
    for row in rows:
        counts[row["policy"]] = counts.get(row["policy"], 0) + 1
    for row in rows:
        if counts[row["policy"]] > 1:
            row["label"] = f"{row['policy']} [{row['run_name']}]"


def _log_on_parent(client: Any, parent_run_id: str | None, directory: Path) -> bool:
    if parent_run_id is None:
        print("[freezelab] report not logged to MLflow: the runs have no sweep parent run")
        return False
    try:
        client.log_artifacts(parent_run_id, str(directory), artifact_path=REPORT_ARTIFACT_PATH)
    except Exception as err:  # the local report stands even when the store is down
        print(f"[freezelab] warning: report not logged on run {parent_run_id}: {err}")
        return False
    print(f"[freezelab] report logged on sweep run {parent_run_id} under {REPORT_ARTIFACT_PATH}/")
    return True


def _json_safe(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    # NaN is not JSON: a missing number is null.
    return [
        {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in row.items()}
        for row in rows
    ]


def _number(value: Any, missing: float = math.inf) -> float:
    return missing if value is None or math.isnan(value) else float(value)


def _seconds(value: float) -> str:
    return f"{value:.3g} s" if value < 10 else f"{value:.0f} s"


def _percent(share: float) -> str:
    return "?" if math.isnan(share) else f"{100 * share:.1f}%"


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.=-]+", "_", name).strip("._") or "report"
