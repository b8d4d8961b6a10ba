"""The study parent's description: a table per target variant first, and under MLflow's
8,000 characters for any study size."""

from __future__ import annotations

import pytest

from freezelab.report.description import (
    DESCRIPTION_LIMIT,
    SUMMARY_ARTIFACT,
    study_description,
    summary_markdown,
    variant_winners,
)
from freezelab.report.rows import group_rows
from freezelab.study_config import load_study

# The built-in study's policies, as their labels read.
LABELS = [
    "full",
    "head_only",
    "last_n(n=1)",
    "surgical(groups=[stem,layer1])",
    "gradual(every=2)",
    "lp_ft(probe_epochs=3, ft_lr_factor=0.5)",
]


def _rows(variants: list[str], labels: list[str], seeds: int = 3) -> list[dict]:
    """Finished runs of every (variant, policy, seed), each policy a little better
    than the next, each variant's times growing with the policy's depth."""
    rows = []
    for v, variant in enumerate(variants):
        for p, label in enumerate(labels):
            for seed in range(seeds):
                rows.append(
                    {
                        "run_id": f"{v}-{p}-{seed}",
                        "run_name": f"{label} · {variant} · seed={seed}",
                        "variant": variant,
                        "policy": label,
                        "setting": "optimizer.lr=0.01",
                        "setting_key": f"{variant}/{label}",
                        "label": f"{label} [optimizer.lr=0.01]",
                        "status": "FINISHED",
                        "seed": seed,
                        "started": v,
                        "val_acc": 0.9 - 0.05 * p + 0.01 * seed,
                        "test_acc": 0.88 - 0.05 * p + 0.01 * seed,
                        "best_val_acc": 0.95,
                        "train_time_s": 10.0 / (p + 1),
                        "images_per_s": 100.0,
                        "trainable_share": 1.0,
                        "backbone_drift": 0.1,
                        "cka": None,
                        "history": {},
                    }
                )
    return rows


def test_a_three_variant_study_opens_on_a_table_per_variant():
    variants = ["new-digits", "new-digits-inverted", "new-digits-noisy"]
    groups = group_rows(_rows(variants, LABELS))
    summary = "\n\n".join(f"Paragraph {i}: " + "words " * 150 for i in range(12))
    text = study_description(groups, summary)
    assert len(text) <= DESCRIPTION_LIMIT < 8000
    lines = text.splitlines()
    # Each variant: a heading that names the winner, then the table, best first.
    starts = [i for i, line in enumerate(lines) if line.startswith("**")]
    assert [lines[i].split("**")[1] for i in starts] == variants
    assert starts[0] == 0
    for start in starts:
        assert lines[start].endswith("full [optimizer.lr=0.01] won on test_acc")
        assert lines[start + 2] == "| policy | test_acc | cost/train_s per run |"
        table = lines[start + 4 : start + 4 + len(LABELS)]
        assert [row.split(" | ")[0] for row in table] == [
            f"| {label} [optimizer.lr=0.01]" for label in LABELS
        ]
        # The verdict metric with its interval over the three seeds, and the cost.
        assert "(95% interval, n=3)" in table[0] and table[0].endswith("| 10.00 |")
    # The words follow as far as they fit; the rest is the artifact.
    assert "Paragraph 0:" in text and "Paragraph 11:" not in text
    assert text.endswith(
        f"the artifact {SUMMARY_ARTIFACT}; the report with its figures: report/index.html."
    )
    whole = summary_markdown("study", groups, summary)
    assert "Paragraph 11:" in whole and whole.count("| policy |") == 3


@pytest.mark.parametrize("variants, labels", [(40, 6), (3, 80)])
def test_any_study_fits_under_mlflows_limit(variants, labels):
    names = [f"target-{v}" for v in range(variants)]
    policies = [f"policy_{p}_with_a_long_label(alpha={p}, beta=0.5)" for p in range(labels)]
    groups = group_rows(_rows(names, policies, seeds=2))
    text = study_description(groups, "A summary.")
    assert len(text) <= DESCRIPTION_LIMIT
    assert text.startswith("**target-0**: ")
    if labels > 6:  # the tables shortened: each says how many more the artifact holds
        assert f"more in {SUMMARY_ARTIFACT}) | | |" in text


def test_each_variant_has_its_winner():
    groups = group_rows(_rows(["a", "b"], LABELS[:2], seeds=1))
    winners = variant_winners(groups)
    assert list(winners) == ["a", "b"]
    assert {w["policy"] for w in winners.values()} == {"full"}
    assert winners["a"]["metric"] == "test_acc"


def test_the_built_in_study_names_its_runs_short():
    from freezelab.study_config import LABEL_TAG, finetune_configs, short_names

    study = load_study(None)
    names = short_names(study)
    assert names["new-digits"] == "new-digits" and names["new-digits-inverted"] == "inverted"
    assert names["gradual(every=2)"] == "gradual"
    configs = finetune_configs(study, "tag")
    shown = [c.mlflow.run_name for c in configs]
    assert len(set(shown)) == len(shown)  # still tells every run apart
    assert max(len(name) for name in shown) <= 32
    inverted = next(
        c for c in configs if c.mlflow.tags.get("freezelab.variant", "").endswith("inverted")
    )
    assert inverted.mlflow.run_name.startswith("full · inverted · ")
    assert inverted.mlflow.tags[LABEL_TAG].startswith("full new-digits-inverted ")


def test_two_policies_of_one_type_keep_their_fields_in_short_names():
    from freezelab.study_config import short_names

    study = load_study(None, ["policies=[{type: last_n, n: 1}, {type: last_n, n: 2}]"])
    names = short_names(study)
    assert names["last_n(n=1)"] == "last_n(1)" and names["last_n(n=2)"] == "last_n(2)"
