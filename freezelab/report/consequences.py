"""The four consequences of not freezing, measured per run and told in words.

The question "what if I don't freeze the pretrained layers?" has four usual answers:
(1) freezing saves compute; (2) not freezing can win when the target data differs from
the pretraining data; (3) training everything can destroy what the pretrained layers
know; (4) most of all while a new, untrained head sends large gradients into them.
Each is a number per run (README, "What the study measures"):

- (1) ``train_flops`` and ``train_time_s``, the run's training cost;
- (2) ``val_acc`` and ``shifted/val_acc/<shift or set>`` (``data.eval_shifts``,
  ``data.eval_sets``), and the study's target variants (``data.shift``); with a
  held-out test set also ``test_acc`` and ``shifted/test_acc/<shift>`` (``test_evaluations``);
- (3) ``forgetting``: the source-task probe's accuracy at the start minus at the end;
- (4) ``backbone_grad_early``: the mean L2 norm of the backbone's gradient over the
  first measured steps in which the backbone trains (``early/grad_norm/<group>``),
  and ``backbone_grad_peak``, its largest value.

``run_measures`` reads them from a run's history (MLflow's, or the loop's own);
``group_measures`` summarizes them per setting; ``consequences`` writes one paragraph
per answer, each policy at its best setting, with 95% intervals where there are repeats.

>>> layer4 = {0: 0.0, 5: 3.0, 6: 1.0, 40: 9.0}  # the backbone trains from step 5 on
>>> history = {"early/grad_norm/layer4": layer4, "early/grad_norm/head": {0: 1.0, 5: 4.0}}
>>> run_measures(history, frozenset({"head"}))["backbone_grad_steps"]
[3.0, 1.0]
"""

from __future__ import annotations

import math
from typing import Any

from freezelab.stats import difference
from freezelab.trainers.metric_names import mlflow_name, mlflow_value
from freezelab.trainers.reporting import history_from_epochs
from freezelab.trainers.shifts import shifted_metric

__all__ = ["consequences", "group_measures", "history_from_epochs", "run_measures"]
from freezelab.stats import summarize as stats_summary

EARLY_PREFIX = "early/grad_norm/"
EVAL_PREFIX = shifted_metric("val", "")
TEST_PREFIX = shifted_metric("test", "")  # the same evaluations on the held-out test split
# Per-run measures that the settings summarize with an interval.
MEASURES = ("train_flops", "forgetting", "source_probe_acc", "backbone_grad_early")
FULL, HEAD_ONLY, LP_FT = "full", "head_only", "lp_ft"


def run_measures(
    history: dict[str, dict[int, float]], head_groups: frozenset[str]
) -> dict[str, Any]:
    """The consequence measures of one run, from its metric history."""

    def last(key: str) -> float:
        values = history.get(key)
        return values[max(values)] if values else math.nan

    # Measures keep the loop's names and units (FLOPs), read from their MLflow names.
    measures: dict[str, Any] = {
        key: last(mlflow_name(key))
        for key in ("forgetting", "source_probe_acc", "source_probe_acc_start")
    }
    measures["train_flops"] = last(mlflow_name("train_flops")) / mlflow_value("train_flops", 1.0)
    measures["evaluations"] = {
        key.removeprefix(EVAL_PREFIX): last(key)
        for key in sorted(history)
        if key.startswith(EVAL_PREFIX)
    }
    # The held-out test set (data.test_fraction or a test/ folder), logged at the last
    # epoch only: NaN and {} for a run without one.
    measures["test_acc"] = last("test_acc")
    measures["test_evaluations"] = {
        key.removeprefix(TEST_PREFIX): last(key)
        for key in sorted(history)
        if key.startswith(TEST_PREFIX)
    }
    backbone = [
        k
        for k in history
        if k.startswith(EARLY_PREFIX) and k.removeprefix(EARLY_PREFIX) not in head_groups
    ]
    steps = sorted({step for key in backbone for step in history[key]})
    norms = {
        step: math.sqrt(sum(history[key].get(step, 0.0) ** 2 for key in backbone)) for step in steps
    }
    # The early steps of the first phase in which the backbone trains: consecutive global
    # steps from the first with a gradient (a later phase's early steps start elsewhere).
    trained: list[float] = []
    previous = -1
    for step in steps:
        if norms[step] > 0 and (not trained or step == previous + 1):
            trained.append(norms[step])
            previous = step
        elif trained:
            break
    measures["backbone_grad_steps"] = trained
    measures["backbone_grad_early"] = sum(trained) / len(trained) if trained else math.nan
    measures["backbone_grad_peak"] = max(trained) if trained else math.nan
    return measures


def group_measures(group: dict[str, Any], runs: list[dict[str, Any]], metric: str = "val_acc"):
    """Add each measure's mean and 95% interval over a setting's runs to ``group``:
    ``group[key]`` (mean, or None) and ``group["ci95"][key]`` ((low, high), or None),
    for ``MEASURES``, every evaluation set (``eval/<name>``: on the test split when the
    verdict ``metric`` is test_acc, else on the val split) and every shifted test set
    (``test_eval/<shift>``)."""
    group.setdefault("ci95", {})
    group.setdefault("measured", {})
    field = "test_evaluations" if metric == "test_acc" else "evaluations"
    names = sorted({name for run in runs for name in run.get(field, {})})
    series = {key: [run.get(key) for run in runs] for key in MEASURES}
    series.update({f"eval/{n}": [run.get(field, {}).get(n) for run in runs] for n in names})
    # The shifted test sets under their own names too, whatever the verdict's split.
    tests = sorted({name for run in runs for name in run.get("test_evaluations", {})})
    series.update(
        {f"test_eval/{n}": [run.get("test_evaluations", {}).get(n) for run in runs] for n in tests}
    )
    for key, values in series.items():
        present = [float(v) for v in values if v is not None and not math.isnan(float(v))]
        group["measured"][key] = present
        if not present:
            group[key], group["ci95"][key] = None, None
            continue
        stats = stats_summary(present)
        group[key] = stats.mean
        group["ci95"][key] = None if stats.ci95_low is None else (stats.ci95_low, stats.ci95_high)
    group["evaluations"] = names
    group["test_evaluations"] = tests


# -- the four paragraphs ----------------------------------------------------------------


def consequences(variants: dict[str, list[dict[str, Any]]]) -> list[str]:
    """One paragraph per consequence, from the settings of each target variant
    (``{variant name: group_rows(...)}``; one variant named "" without variants).
    Each policy enters at its best setting."""
    best = {name: [g for g in groups if g["best_of_policy"]] for name, groups in variants.items()}
    first_name, first = next(iter(best.items()))
    compute = _compute(first)
    if len(best) > 1:
        compute += f" (Measured on the target '{first_name}'.)"
    return [
        compute,
        _shift(best),
        _per_variant("(3) Forgetting of what the pretrained layers knew. ", _forgetting, best),
        _per_variant("(4) The new head's gradients. ", _gradient_shock, best),
    ]


def _per_variant(title: str, paragraph, best: dict[str, list[dict[str, Any]]]) -> str:
    if len(best) == 1:
        return title + paragraph(next(iter(best.values())))
    return title + " ".join(
        f"On the target '{variant}': {paragraph(groups)}" for variant, groups in best.items()
    )


def _compute(groups: list[dict[str, Any]]) -> str:
    full = _policy(groups, FULL)
    text = "(1) Compute. "
    if full is None or not full.get("train_flops"):
        cheapest = min(groups, key=lambda g: _num(g.get("train_time_s"), math.inf))
        return text + (
            f"Without a full run to compare with: the cheapest policy was {cheapest['label']} "
            f"({_seconds(cheapest.get('train_time_s'))} of training per run)."
        )
    parts = []
    for group in sorted(groups, key=lambda g: _num(g.get("train_flops"), math.inf)):
        if group is full or not group.get("train_flops"):
            continue
        parts.append(
            f"{group['label']} {_share(group['train_flops'] / full['train_flops'])} of its FLOPs "
            f"({_seconds(group.get('train_time_s'))})"
        )
    return text + (
        f"Training everything ({full['label']}) cost {full['train_flops'] / 1e9:,.1f} GFLOP and "
        f"{_seconds(full.get('train_time_s'))} of training per run. Against it, "
        + "; ".join(parts)
        + ". FLOPs count what really ran: a frozen layer computes no weight gradient, and a "
        "frozen backbone's features are computed once and cached."
    )


def _shift(best: dict[str, list[dict[str, Any]]]) -> str:
    text = "(2) Data that differs from the pretraining data. "
    parts = []
    for variant, groups in best.items():
        where = f"on the target '{variant}'" if variant else "on the target task"
        full, frozen = _policy(groups, FULL), _policy(groups, HEAD_ONLY)
        winner = groups[0]
        metric = winner["metric"]
        sentence = (
            f"{where.capitalize()}, {winner['label']} ranked first "
            f"({metric} {_mean_ci(winner, metric)})"
        )
        if full is not None and frozen is not None:
            sentence += (
                f"; not freezing ({full['label']}) against freezing the backbone "
                f"({frozen['label']}): {_versus(full['values'], frozen['values'])}"
            )
        parts.append(sentence + ".")
        shifted = [n for n in winner.get("evaluations", [])]
        for name in shifted:
            ranked = sorted(groups, key=lambda g: -_num(g.get(f"eval/{name}"), -math.inf))
            top = ranked[0]
            line = f"Under {name}, {top['label']} kept the most ({_mean_ci(top, f'eval/{name}')})"
            if full is not None and frozen is not None:
                line += ": not freezing against freezing " + _versus(
                    full["measured"].get(f"eval/{name}", []),
                    frozen["measured"].get(f"eval/{name}", []),
                )
            parts.append(line + ".")
    gaps = {}
    for variant, groups in best.items():
        full, frozen = _policy(groups, FULL), _policy(groups, HEAD_ONLY)
        if full is not None and frozen is not None:
            gaps[variant] = full["score"] - frozen["score"]
    if len(gaps) > 1:
        largest = max(gaps, key=lambda v: gaps[v])
        metric = next(iter(best.values()))[0]["metric"]
        parts.append(
            f"The gain of not freezing over freezing the backbone (mean {metric}, full minus "
            "head_only): "
            + ", ".join(f"{gap:+.4f} on '{variant}'" for variant, gap in gaps.items())
            + f"; it was largest on '{largest}'."
        )
    if not parts:
        return text + "Not measured."
    return text + " ".join(parts)


def _forgetting(groups: list[dict[str, Any]]) -> str:
    measured = [g for g in groups if g.get("forgetting") is not None]
    if not measured:
        return "Not measured: give the fine-tuning runs forgetting.source (the pretraining data)."
    start = next((g for g in measured if g.get("source_probe_acc") is not None), None)
    parts = [
        f"{g['label']} {_mean_ci(g, 'forgetting')}"
        for g in sorted(measured, key=lambda g: g["forgetting"])
    ]
    opening = "A linear probe on the backbone's features of the source task"
    if start is not None:
        first = start["source_probe_acc"] + start["forgetting"]
        opening += f" scored {first:.4f} before fine-tuning"
    return (
        opening
        + "; the drop in its accuracy by the end of each run (forgetting, 0 = nothing lost): "
        + "; ".join(parts)
        + "."
    )


def _gradient_shock(groups: list[dict[str, Any]]) -> str:
    measured = [g for g in groups if g.get("backbone_grad_early") is not None]
    if not measured:
        return "Not measured: the runs logged no early gradient norms (metrics.gradients)."
    full, lp_ft = _policy(measured, FULL), _policy(measured, LP_FT)
    parts = [
        f"{g['label']} {_mean_ci(g, 'backbone_grad_early')}"
        for g in sorted(measured, key=lambda g: -g["backbone_grad_early"])
    ]
    sentence = (
        "Mean L2 norm of the gradient reaching the backbone over the first measured "
        "steps in which it trains (a step that starts from a random head comes first under "
        "full fine-tuning, after the probe under lp_ft): " + "; ".join(parts) + "."
    )
    if full is not None and lp_ft is not None and lp_ft["backbone_grad_early"] > 0:
        ratio = full["backbone_grad_early"] / lp_ft["backbone_grad_early"]
        sentence += (
            f" Under {full['label']} the backbone received {ratio:.1f}x the gradient it "
            f"received under {lp_ft['label']}: "
            + _versus(
                full["measured"]["backbone_grad_early"],
                lp_ft["measured"]["backbone_grad_early"],
                digits=3,
            )
            + "."
        )
    return sentence


# -- helpers -------------------------------------------------------------------------------


def _policy(groups: list[dict[str, Any]], policy_type: str) -> dict[str, Any] | None:
    """The best setting of the first policy of this type (``full``, ``lp_ft(...)``)."""
    return next(
        (
            g
            for g in groups
            if g["policy"] == policy_type or g["policy"].startswith(policy_type + "(")
        ),
        None,
    )


def _versus(a: list[float], b: list[float], digits: int = 4) -> str:
    """The difference of means, with Welch's 95% interval when both have repeats."""
    if not a or not b:
        return "not measured for both"
    found = difference(a, b)
    if found.settled is None:
        return f"{found.delta:+.{digits}f} (one run each, no interval)"
    verdict = "a real difference" if found.settled else "within noise"
    return (
        f"{found.delta:+.{digits}f}, 95% interval [{found.ci95_low:+.{digits}f}, "
        f"{found.ci95_high:+.{digits}f}], {verdict}"
    )


def _mean_ci(group: dict[str, Any], key: str) -> str:
    mean = group.get(key)
    if mean is None:
        return "not measured"
    interval = group["ci95"].get(key)
    if interval is None:
        return f"{mean:.4f}"
    return f"{mean:.4f} ± {(interval[1] - interval[0]) / 2:.4f}"


def _num(value: Any, missing: float) -> float:
    return missing if value is None or math.isnan(float(value)) else float(value)


def _seconds(value: Any) -> str:
    value = _num(value, math.nan)
    return "an unknown time" if math.isnan(value) else f"{value:.3g} s"


def _share(value: float) -> str:
    return f"{100 * value:.1f}%"
