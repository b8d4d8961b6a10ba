"""A study's answer as its parent run states it in MLflow: a short markdown table per
target variant (each policy at its best setting, its verdict metric with the 95%
interval, its cost), then the summary in words as far as MLflow's description holds it.

MLflow cuts a run's description (the tag ``mlflow.note.content``) at 8,000 characters;
``study_description`` stays under ``DESCRIPTION_LIMIT`` for any study: a variant with
more policies than fit shows its best ones and says how many more the artifact holds.

>>> text = study_description(groups, "summary in words")  # doctest: +SKIP
>>> text.splitlines()[0]  # doctest: +SKIP
'**new-digits**: full won on test_acc'
"""

from __future__ import annotations

from typing import Any

from freezelab.report.rows import by_variant
from freezelab.report.summary import score_with_interval

# Under MLflow's 8,000 characters, with room for its own markdown rendering.
DESCRIPTION_LIMIT = 7500
# The artifact of the parent run that holds the whole of what the description shortens.
SUMMARY_ARTIFACT = "summary.md"


def variant_winners(groups: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Each target variant's winning setting: the first of its policies' best settings
    (``group_rows`` orders them by the verdict metric)."""
    return {
        variant: next(g for g in members if g["best_of_policy"])
        for variant, members in by_variant(groups).items()
        if any(g["best_of_policy"] for g in members)
    }


def variant_tables(groups: list[dict[str, Any]], limit: int | None = None) -> list[str]:
    """One markdown table per target variant, its heading first: each policy at its best
    setting, best first; at most ``limit`` rows each, then how many more."""
    tables = []
    for variant, members in by_variant(groups).items():
        best = [g for g in members if g["best_of_policy"]]
        if not best:
            continue
        metric = best[0]["metric"]
        heading = f"**{variant}**: " if variant else ""
        lines = [
            heading + f"{best[0]['label']} won on {metric}",
            "",
            f"| policy | {metric} | cost/train_s per run |",
            "|:--|--:|--:|",
        ]
        shown = best if limit is None else best[:limit]
        for group in shown:
            cost = group.get("train_time_s")
            lines.append(
                f"| {_cell(group['label'])} | {score_with_interval(group)} | "
                + ("-" if cost is None else f"{cost:.2f}")
                + " |"
            )
        if len(shown) < len(best):
            lines.append(f"| ({len(best) - len(shown)} more in {SUMMARY_ARTIFACT}) | | |")
        tables.append("\n".join(lines))
    return tables


def study_description(groups: list[dict[str, Any]], summary: str) -> str:
    """The parent run's description: the tables of ``variant_tables``, then as many of
    the ``summary``'s paragraphs as fit under ``DESCRIPTION_LIMIT`` characters."""
    footer = (
        f"\n\nThe whole summary: the artifact {SUMMARY_ARTIFACT}; the report with its "
        "figures: report/index.html."
    )
    limit = None
    while True:
        text = "\n\n".join(variant_tables(groups, limit))
        if len(text) + len(footer) <= DESCRIPTION_LIMIT or limit == 1:
            break
        longest = max(len([g for g in groups if g["best_of_policy"]]), 2)
        limit = (limit or longest) - 1
    if len(text) + len(footer) > DESCRIPTION_LIMIT:  # more variants than fit, one row each
        text = text[: DESCRIPTION_LIMIT - len(footer) - 4].rsplit("\n", 1)[0] + "\n..."
    for paragraph in summary.split("\n\n"):
        if len(text) + 2 + len(paragraph) + len(footer) > DESCRIPTION_LIMIT:
            break
        text += "\n\n" + paragraph
    return text + footer


def summary_markdown(title: str, groups: list[dict[str, Any]], summary: str) -> str:
    """What the description shortens, whole: every variant's table, every paragraph."""
    return "\n\n".join([f"# {title}", *variant_tables(groups), *summary.split("\n\n")]) + "\n"


def _cell(text: str) -> str:
    return text.replace("|", "\\|")
