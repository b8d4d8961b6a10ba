"""Each policy at its own learning rate: the selection stage's configs, choices and the
verdict that reads them (the study end to end is in ``test_study.py``)."""

import json
import math

import pytest
from small_study import SMALL_STUDY

from freezelab.errors import ConfigError
from freezelab.report.rows import group_rows, verdict_metric
from freezelab.report.summary import summarize_variants
from freezelab.study import finetune_configs, load_study, run_study
from freezelab.study_selection import GROUP_TAG, POINT_TAG, choose, points

SELECT = "select={grid: {optimizer.lr: [0.005, 0.02, 0.08]}, grace_epochs: 1}"


def test_selection_runs_one_per_value_on_their_own_seed_and_verdict_runs_at_the_choice():
    study = load_study(None, [*SMALL_STUDY, "seeds=[0, 1]", SELECT])
    selecting = finetune_configs(study, "t", selecting=True)
    # 2 variants x 2 policies x 3 rates, each once, on select.seed
    assert len(selecting) == 12 and {c.seed for c in selecting} == {100}
    assert {c.mlflow.tags["freezelab.stage"] for c in selecting} == {"select"}
    assert not any(c.mlflow.log_model for c in selecting)
    groups = {}
    for config in selecting:
        groups.setdefault(config.mlflow.tags[GROUP_TAG], []).append(config)
    assert len(groups) == 4
    for members in groups.values():
        # the middle of the grid first: ASHA never stops a group's first trial
        assert [c.optimizer.lr for c in members] == [0.02, 0.005, 0.08]
    chosen = {group: _choice({"optimizer.lr": 0.08}) for group in groups}
    verdict = finetune_configs(study, "t", chosen=chosen)
    assert len(verdict) == 8 and {c.optimizer.lr for c in verdict} == {0.08}
    assert {c.seed for c in verdict} == {0, 1}
    assert all(json.loads(c.mlflow.tags[POINT_TAG]) == {"optimizer.lr": 0.08} for c in verdict)


def _choice(point):
    from freezelab.study_selection import Choice

    return Choice(point, 0.5)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("select.seed=0", "select.seed 0 is one of seeds"),
        ("grid={optimizer.lr: [0.1, 0.2]}", "in both grid and select.grid"),
        ("select.grid={optimizer.lr: [0.1]}", "at least 2 values"),
        ("select.grid={seed: [1, 2]}", "the study sets seed itself"),
        ("select.grid={optimizer.lr: [0.1, 0.1]}", "values repeat"),
    ],
)
def test_a_selection_that_cannot_choose_is_refused_with_one_line(override, message):
    with pytest.raises(ConfigError, match=message) as err:
        load_study(None, [*SMALL_STUDY, SELECT, override])
    assert "\n" not in str(err.value).strip()


def test_a_first_rung_at_or_after_the_last_epoch_is_refused_before_anything_runs(
    tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match="select.grace_epochs 2 must be below"):
        run_study(None, [*SMALL_STUDY, SELECT, "select.grace_epochs=2"])
    assert list(tmp_path.iterdir()) == []


class _Config:
    def __init__(self, name, lr):
        from types import SimpleNamespace

        self.name = name
        self.mlflow = SimpleNamespace(tags={POINT_TAG: json.dumps({"optimizer.lr": lr})})


def test_the_choice_is_the_best_run_that_reached_the_last_epoch_without_diverging():
    configs = {"g": [_Config("a", 0.02), _Config("b", 0.005), _Config("c", 0.08)]}
    rows = {
        "a": {"val_acc": 0.70},
        "b": None,  # stopped at a rung, with a higher val_acc then: not a candidate
        "c": {"val_acc": 0.90, "diverged": True, "diverged_reason": "train_loss nan"},
    }
    outcomes = {"b": {"epochs": 2, "metrics": {"val_acc": 0.95}, "error": None}}
    choice = choose(configs, rows, outcomes, epochs=8)["g"]
    assert choice.point == {"optimizer.lr": 0.02} and choice.val_acc == 0.70
    assert {c["run_name"]: c["epochs"] for c in choice.candidates} == {"a": 8, "b": 2, "c": 8}
    # every finished value diverged: the best of them, said so
    rows["a"] = {"val_acc": 0.6, "diverged": True, "diverged_reason": "x"}
    choice = choose(configs, rows, outcomes, epochs=8)["g"]
    assert choice.point == {"optimizer.lr": 0.08} and "diverged" in choice.note
    # none finished: no choice, and the group's verdict runs are not made
    none = choose(configs, {}, {"a": {"epochs": 1, "error": "ValueError: x"}}, epochs=8)["g"]
    assert none.point is None and math.isnan(none.val_acc)


def test_points_put_the_middle_of_the_grid_first():
    from freezelab.study_selection import SelectionConfig

    select = SelectionConfig(grid={"optimizer.lr": [1, 2, 3, 4, 5]})
    assert [p["optimizer.lr"] for p in points(select)] == [3, 2, 4, 1, 5]


def _row(policy, seed, val, test=None, variant="", **extra):
    return {
        "policy": policy,
        "setting": extra.pop("setting", ""),
        "setting_key": json.dumps([variant, policy, extra.pop("key", "")]),
        "label": policy,
        "variant": variant,
        "run_name": f"{policy}-{seed}",
        "run_id": f"{policy}-{seed}",
        "seed": seed,
        "status": "FINISHED",
        "val_acc": val,
        "test_acc": test,
        "best_val_acc": val,
        "train_time_s": 1.0,
        "images_per_s": 1.0,
        "trainable_share": 1.0,
        "backbone_drift": 0.0,
        "cka": None,
        **extra,
    }


def test_the_verdict_ranks_on_test_acc_while_settings_are_chosen_on_val_acc():
    rows = [
        # full: the setting best on val is worse on test; it is the one compared
        *[_row("full", s, 0.9, 0.6, key="lr1", setting="lr=1") for s in range(3)],
        *[_row("full", s, 0.8, 0.95, key="lr2", setting="lr=2") for s in range(3)],
        *[_row("head_only", s, 0.7, 0.7 + s / 100) for s in range(3)],
    ]
    assert verdict_metric(rows) == "test_acc"
    groups = group_rows(rows)
    best = [g for g in groups if g["best_of_policy"]]
    assert [(g["label"], g["setting"]) for g in best] == [("head_only", ""), ("full", "lr=1")]
    assert best[0]["metric"] == "test_acc" and best[0]["score"] == pytest.approx(0.71)
    assert best[0]["values"] == [0.7, 0.71, 0.72]
    text = summarize_variants(groups)
    assert text.startswith("Ranked on test_acc")
    assert "head_only won: test_acc 0.7100" in text
    # without a test split on every run, the verdict falls back to val_acc and says so
    rows[0]["test_acc"] = None
    assert verdict_metric(rows) == "val_acc"


def test_a_diverged_run_is_left_out_of_the_ranking_and_named():
    from freezelab.report.rows import diverged_rows

    reason = "train_loss nan at epoch 2"
    rows = [
        *[_row("full", s, 0.5, 0.5) for s in range(2)],
        _row("head_only", 0, 0.99, 0.99, diverged=True, diverged_reason=reason),
        _row("head_only", 1, 0.4, 0.4),
    ]
    notes = []
    groups = group_rows(rows, notes)
    head_only = next(g for g in groups if g["policy"] == "head_only")
    assert head_only["n"] == 1 and head_only["values"] == [0.4]
    assert groups[0]["policy"] == "full"
    assert any("head_only-0" in n and reason in n for n in notes)
    text = summarize_variants(groups, diverged_rows(rows))
    assert f"as diverged (1 run(s)): head_only seed 0: {reason}" in text


@pytest.mark.ray
def test_a_study_chooses_each_policys_rate_on_val_then_trains_its_seeds_at_it(
    ray_session, tmp_path, monkeypatch, capsys
):
    import mlflow

    from freezelab.report.build import build_report
    from freezelab.study_selection import load_choices
    from freezelab.trainers.location import RunLocation

    monkeypatch.chdir(tmp_path)
    overrides = [
        *SMALL_STUDY,
        "finetune.epochs=3",
        "variants={new-digits: {}}",
        "select={grid: {optimizer.lr: [0.0005, 0.02, 2.0]}, grace_epochs: 1, reduction_factor: 2}",
    ]
    outcome = run_study(None, overrides)
    out = capsys.readouterr().out
    choices = load_choices(RunLocation(str(tmp_path / "freezelab_runs"), outcome.tag))
    assert len(choices) == 2 and all(c.point is not None for c in choices.values())
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = mlflow.MlflowClient(uri)
    runs = client.search_runs(["1"], max_results=100)
    selection = [r for r in runs if r.data.tags.get("freezelab.stage") == "select"]
    assert len(selection) == 6
    by_tags = {(r.data.tags[GROUP_TAG], r.data.tags[POINT_TAG]): r for r in selection}
    for group, choice in choices.items():
        complete = [c for c in choice.candidates if c["epochs"] == 3 and not c.get("diverged")]
        # the choice is the best value among those that trained every epoch
        assert choice.val_acc == max(c["val_acc"] for c in complete)
        for candidate in choice.candidates:
            run = by_tags[(group, json.dumps(candidate["point"], sort_keys=True))]
            if candidate["epochs"] < 3:  # stopped by successive halving, closed as such
                assert run.info.status == "KILLED"
                assert run.data.tags["freezelab.stopped"].startswith(
                    f"after epoch {candidate['epochs']} of 3"
                )
            else:
                assert run.info.status == "FINISHED"
    assert any(c["epochs"] < 3 for ch in choices.values() for c in ch.candidates)
    # the verdict's runs train at their group's choice, on the verdict's seed
    assert len(outcome.rows) == 2
    for row in outcome.rows:
        chosen = choices[row["select_group"]].point["optimizer.lr"]
        assert row["setting"] == f"optimizer.lr={chosen}" and row["seed"] == 0
        assert row["selected"].startswith(f"lr={chosen}")
    assert "each policy's own optimizer.lr, chosen on val_acc" in out
    # the report and compare read the verdict's runs only
    report = build_report(outcome.parent_run_id, out_dir=tmp_path / "r", tracking_uri=uri)
    assert {r["run_id"] for r in report.rows} == {r["run_id"] for r in outcome.rows}
    # the same study again: the choices are read, nothing trains
    again = run_study(None, overrides)
    assert [r["run_id"] for r in again.rows] == [r["run_id"] for r in outcome.rows]
    assert len(client.search_runs(["1"], max_results=100)) == len(runs)


def test_test_labels_cannot_change_a_choice():
    # Every choice reads val_acc only: test_acc shuffled across runs changes the scores,
    # not which setting each policy enters with, nor a selection's choice.
    import random

    rows = [
        *[_row("full", s, 0.9 - s / 100, 0.6, key="lr1", setting="lr=1") for s in range(3)],
        *[_row("full", s, 0.8, 0.9, key="lr2", setting="lr=2") for s in range(3)],
        *[_row("head_only", s, 0.7, 0.7, key="lr1", setting="lr=1") for s in range(3)],
        *[_row("head_only", s, 0.75, 0.5, key="lr2", setting="lr=2") for s in range(3)],
    ]
    chosen = {(g["policy"], g["setting"]) for g in group_rows(rows) if g["best_of_policy"]}
    tests = [r["test_acc"] for r in rows]
    for seed in range(5):
        random.Random(seed).shuffle(tests)
        shuffled = [{**r, "test_acc": t} for r, t in zip(rows, tests, strict=True)]
        groups = group_rows(shuffled)
        assert {(g["policy"], g["setting"]) for g in groups if g["best_of_policy"]} == chosen
    configs = {"g": [_Config("a", 0.02), _Config("b", 0.08)]}
    for test_a, test_b in ((0.1, 0.9), (0.9, 0.1)):
        found = {
            "a": {"val_acc": 0.8, "test_acc": test_a},
            "b": {"val_acc": 0.7, "test_acc": test_b},
        }
        assert choose(configs, found, {}, epochs=8)["g"].point == {"optimizer.lr": 0.02}
