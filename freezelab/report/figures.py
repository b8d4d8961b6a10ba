"""The report's figures, one PNG each, drawn on matplotlib's Agg canvas without
pyplot's global state: accuracy against training time with the Pareto front, learning
curves, per-group drift, CKA, and one figure per consequence of not freezing.

>>> paths = draw_figures(directory, records, rows, group_rows(rows))  # doctest: +SKIP
>>> paths["accuracy_vs_time"].name  # doctest: +SKIP
'accuracy_vs_time.png'
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from freezelab.report.rows import by_variant, number_or, pareto_front, time_and_accuracy
from freezelab.report.runs import RunRecord

FIGURES = (
    "accuracy_vs_time",
    "learning_curves",
    "drift",
    "cka",
    "gradient_shock",
    "shift_accuracy",
    "forgetting",
)
# A panel per run: past a dozen they are too small to read, so the best runs are drawn.
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

    # One color per policy and setting, the same in every target variant.
    labels = list(dict.fromkeys(g["label"] for g in groups))
    color_of = {label: _color(i, len(labels)) for i, label in enumerate(labels)}
    gray = (0.5, 0.5, 0.5, 1.0)
    colors = [color_of.get(row["label"], gray) for row in rows]
    paths = {}
    # Labels are policy labels and run names, never math: a regex's "$" stays a "$".
    with matplotlib.rc_context({"text.parse_math": False}):
        figures = {
            "accuracy_vs_time": _accuracy_vs_time(groups, rows, color_of),
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


def _accuracy_vs_time(groups: list[dict[str, Any]], rows: list[dict[str, Any]], color_of) -> Any:
    """A panel per target variant (another task: its settings are compared among
    themselves): each run, each setting's mean and interval, the variant's Pareto front."""
    variants = by_variant(groups)
    figure = _figure(7 if len(variants) == 1 else 5.5 * min(len(variants), 3), 4.5)
    axes = figure.subplots(1, len(variants), squeeze=False)[0]
    metric = _metric(groups)
    gray = (0.5, 0.5, 0.5, 1.0)
    for ax, (variant, members) in zip(axes, variants.items(), strict=True):
        runs = [r for r in rows if r.get("variant", "") == variant]
        ax.scatter(
            [number_or(r["train_time_s"], math.nan) for r in runs],
            [number_or(r.get(metric), math.nan) for r in runs],
            color=[color_of.get(r["label"], gray) for r in runs],
            s=12,
            alpha=0.45,
            zorder=2,
        )
        front = pareto_front(time_and_accuracy(members))
        for i, group in enumerate(members):
            x, y = number_or(group["train_time_s"], math.nan), group["score"]
            error = None
            if group["ci95_low"] is not None:
                error = [[y - group["ci95_low"]], [group["ci95_high"] - y]]
            ax.errorbar(
                [x],
                [y],
                yerr=error,
                fmt="o",
                color=color_of[group["label"]],
                markeredgecolor="black" if i in front else "none",
                markersize=7,
                capsize=3,
                zorder=3,
            )
            ax.annotate(
                group["label"], (x, y), textcoords="offset points", xytext=(6, 4), fontsize=8
            )
        if len(front) > 1:
            xs = [members[i]["train_time_s"] for i in front]
            ys = [members[i]["score"] for i in front]
            ax.step(
                xs, ys, where="post", linestyle="--", color="gray", label="Pareto front", zorder=1
            )
            ax.legend(loc="lower right", fontsize=8)
        times = [t for t, _ in time_and_accuracy(members) if 0 < t < math.inf]
        if times and max(times) / min(times) > 20:
            ax.set_xscale("log")
        ax.set_xlabel("training time per run (s, cost/train_s)")
        if variant:
            ax.set_title(f"target {variant!r}", fontsize=9)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(f"{metric} of the model each run hands over")
    repeats = max(g["n"] for g in groups) > 1
    figure.suptitle(
        "Accuracy against training compute"
        + (": mean and 95% interval per setting, dots are runs" if repeats else "")
    )
    return figure


def _learning_curves(records: list[RunRecord], rows: list[dict[str, Any]], colors) -> Any:
    """val_acc and train_loss per epoch, a row of panels per target variant."""
    variants = list(dict.fromkeys(row.get("variant", "") for row in rows))
    figure = _figure(11, 4.5 if len(variants) == 1 else 3.5 * len(variants))
    grid = figure.subplots(len(variants), 2, squeeze=False)
    for variant, axes in zip(variants, grid, strict=True):
        labelled = set()
        for record, row, color in zip(records, rows, colors, strict=True):
            if row.get("variant", "") != variant:
                continue
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
            ax.set_title(key + (f" (target {variant!r})" if variant else ""), fontsize=9)
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


def _metric(groups: list[dict[str, Any]]) -> str:
    """The verdict metric of the settings (``rows.verdict_metric``)."""
    return groups[0]["metric"] if groups else "val_acc"


def _shift_accuracy(groups: list[dict[str, Any]], color_of) -> Any:
    """(2): the verdict metric on the target and under each shift or extra set, per policy."""
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
        metric = _metric(groups)
        if name is None:
            drawn = _bars_with_intervals(ax, members, metric, color_of)
            title = metric
        else:
            drawn = _bars_with_intervals(ax, members, f"eval/{name}", color_of)
            title = f"{metric}/{name}"
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
