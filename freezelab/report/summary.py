"""What ``freezelab report`` and the study say in words: the summary of each target
variant (the winner, which differences its runs settle, its cost, what each policy
kept, then the consequences), and the settings table for the terminal.

>>> groups = group_rows(rows)  # doctest: +SKIP
>>> print(format_settings(groups))  # doctest: +SKIP
>>> print(summarize_variants(groups))  # doctest: +SKIP
full won: val_acc 0.8100 ± 0.0248 (95% interval, n=3), ...
>>> score_with_interval({"score": 0.81, "ci95_low": None, "n": 1})
'0.8100 (n=1, no interval)'
"""

from __future__ import annotations

import math
from typing import Any

from freezelab.report.consequences import consequences
from freezelab.report.rows import by_variant, number_or, pareto_front, time_and_accuracy
from freezelab.stats import difference, with_interval

# CKA at or above this counts as "the representation kept intact" in the summary.
INTACT_CKA = 0.999


def summarize_variants(
    groups: list[dict[str, Any]], diverged: list[dict[str, Any]] | None = None
) -> str:
    """:func:`summarize` of each target variant, then the four consequences.
    ``diverged``: the runs flagged diverged (``rows.diverged_rows``), which the
    statistics left out; each variant's summary names its own."""
    variants = by_variant(groups)
    texts = []
    for name, members in variants.items():
        text = (f"On the target '{name}': " if len(variants) > 1 else "") + summarize(members)
        left_out = [r for r in diverged or [] if r.get("variant", "") == name]
        if left_out:
            text += (
                f" Left out of this ranking and of the consequences below, as diverged "
                f"({len(left_out)} run(s)): "
                + "; ".join(
                    f"{r['label']} seed {r['seed']}: {r.get('diverged_reason')}" for r in left_out
                )
                + "."
            )
        texts.append(text)
    return "\n\n".join([*texts, *consequences(variants)])


def summarize(groups: list[dict[str, Any]]) -> str:
    """A few sentences from the settings (``group_rows``, best first): the winner and
    its interval, which differences its runs settle, its cost, what each policy kept.

    Each policy enters at its own best setting (say, its best learning rate).
    """
    best = [g for g in groups if g["best_of_policy"]]
    winner = best[0]
    metric = winner["metric"]
    repeated = max(g["n"] for g in groups) > 1
    if metric == "test_acc":
        opening = (
            "Ranked on test_acc, the held-out test split's accuracy of the model each run "
            "hands over (no choice read it: every choice was made on val_acc)"
        )
    else:
        opening = (
            "Ranked on val_acc at the last epoch, the accuracy of the model each run hands over"
        )
    sentences = [
        opening
        + (", averaged over each setting's seeds." if repeated else " (one run per setting).")
    ]
    tuned = [g for g in best if g["settings_of_policy"] > 1]
    if tuned:
        sentences.append(
            "Each policy is compared at its own best setting, chosen on mean val_acc"
            + (
                "."
                if metric == "test_acc"
                else " (the same numbers it is ranked on: an optimistic choice; give the "
                "data a test split, data.test_fraction, for an unbiased verdict)."
            )
        )
    selected = [g for g in best if g.get("selected")]
    if selected:
        edge = [g["label"] for g in selected if "edge" in g["selected"]]
        sentences.append(
            "Each policy trained at its own values, chosen on val_acc by runs of their own "
            "before these: "
            + ", ".join(f"{g['policy']} {g['selected'].split(' (')[0]}" for g in selected)
            + "."
            + (
                f" At the edge of its grid: {', '.join(edge)} (the best value may lie "
                "beyond: widen the grid)."
                if edge
                else ""
            )
        )
    sentences.append(
        f"{winner['label']} won: {metric} {score_with_interval(winner)}, "
        f"{_seconds(winner['train_time_s'])} of training per run "
        f"({_rate(winner['images_per_s'])}), with "
        f"{_percent(winner['trainable_share'])} of the parameters trainable."
    )
    if len(best) > 1:
        sentences.append(_differences(winner, best[1:]))
    fastest = min(best, key=lambda g: number_or(g["train_time_s"]))
    if fastest is winner:
        sentences.append("The winner was also the fastest policy.")
    elif number_or(winner["train_time_s"], 0) > 0 and number_or(fastest["train_time_s"], 0) > 0:
        sentences.append(
            f"The cost of winning: {winner['train_time_s'] / fastest['train_time_s']:.1f}x the "
            f"training time of the fastest policy, {fastest['label']} "
            f"({_seconds(fastest['train_time_s'])}, {metric} {fastest['score']:.4f})."
        )
    if len(best) > 1:
        front = pareto_front(time_and_accuracy(best))
        names = ", ".join(best[i]["label"] for i in front)
        sentences.append(f"On the accuracy/compute Pareto front: {names}.")
    sentences.append(_kept(best))
    return " ".join(sentences)


def format_settings(groups: list[dict[str, Any]], fmt: str = "table") -> str:
    """The settings table for the terminal: the page's first table."""
    from freezelab.console import Column, format_table

    shown = [{**g, "mean_ci95": score_with_interval(g, short=True)} for g in groups]
    metric = groups[0]["metric"] if groups else "val_acc"
    columns = [
        Column("label", "policy [setting]", max_width=56),
        Column("n"),
        Column("mean_ci95", f"{metric} (mean ± ci95)"),
        Column("train_time_s", "train_s", fmt="{:.1f}"),
        Column("trainable_share", "trainable", fmt="{:.1%}"),
        Column("backbone_drift", "drift", fmt="{:.3f}"),
        Column("cka", "cka", fmt="{:.3f}"),
    ]
    return format_table(shown, columns, fmt)


def score_with_interval(group: dict[str, Any], short: bool = False) -> str:
    """A setting's mean verdict metric and its 95% interval, as the summary, the page's
    table and (``short``, for a terminal's width) the terminal's table write it."""
    if short:
        if group["ci95_low"] is None:
            return f"{group['score']:.4f}"
        return f"{group['score']:.4f} ± {(group['ci95_high'] - group['ci95_low']) / 2:.4f}"
    return with_interval(group["score"], group["ci95_low"], group["ci95_high"], group["n"])


def _differences(winner: dict[str, Any], others: list[dict[str, Any]]) -> str:
    """Which policies trail the winner by more than the 95% interval of the difference
    (Welch's t), which are within it, and which have too few runs to say."""
    behind, within, single = [], [], []
    for group in others:
        found = difference(winner["values"], group["values"])
        if found.settled is None:
            single.append(f"{group['label']} ({-found.delta:+.4f})")
            continue
        text = (
            f"{group['label']} ({-found.delta:+.4f}, interval "
            f"[{-found.ci95_high:+.4f}, {-found.ci95_low:+.4f}])"
        )
        (behind if found.settled else within).append(text)
    parts = []
    if behind:
        parts.append(
            "behind it by more than the 95% interval of the difference: " + "; ".join(behind)
        )
    if within:
        parts.append("within the interval, so not told apart by these runs: " + "; ".join(within))
    if single:
        parts.append(
            "no interval with a single run (give the study or sweep `seeds: [0, 1, 2]`): "
            + "; ".join(single)
        )
    return "Against the winner, " + "; ".join(parts) + "."


def _kept(groups: list[dict[str, Any]]) -> str:
    parts = []
    for group in groups:
        drift, cka = number_or(group["backbone_drift"], math.nan), group["cka"]
        measured = cka is not None and not math.isnan(cka)
        if not measured:
            amount = "intact" if drift == 0 else "changed"
        elif cka >= INTACT_CKA:
            amount = "intact"
        else:
            amount = "mostly" if cka >= 0.9 else "partly" if cka >= 0.5 else "little of it"
        details = [f"CKA {cka:.4f}" if measured else "no CKA"]
        details.append("no drift data" if math.isnan(drift) else f"backbone drift {drift:.4f}")
        parts.append(f"{group['label']} {amount} ({', '.join(details)})")
    return "Starting representation kept: " + "; ".join(parts) + "."


def _seconds(value: float | None) -> str:
    value = number_or(value, math.nan)
    if math.isnan(value):
        return "an unknown time"
    return f"{value:.3g} s" if value < 10 else f"{value:.0f} s"


def _percent(share: float | None) -> str:
    return "?" if share is None or math.isnan(share) else f"{100 * share:.1f}%"


def _rate(images_per_s: float | None) -> str:
    value = number_or(images_per_s, math.nan)
    return "images/s unknown" if math.isnan(value) else f"{value:.0f} images/s"
