"""The transfer study behind `freezelab demo`, shrunk to seconds (local mode)."""

from pathlib import Path

from freezelab.study import format_study, run_study

SMALL = [
    "base.model.name=test_resnet",
    "base.scaling.num_workers=0",
    "base.batch_size=32",
    "pretrain.epochs=1",
    "finetune.epochs=2",
    "policies=[{type: full}, {type: head_only}]",
]


def test_study_pretrains_then_compares_policies_and_writes_a_report(tmp_path, capsys):
    rows = run_study(None, overrides=SMALL)
    out = capsys.readouterr().out
    assert [r["policy"] for r in rows] == ["full", "head_only"]
    head_only = rows[1]
    assert head_only["backbone_drift"] == 0.0 and head_only["trainable_pct"] < 1.0
    assert rows[0]["backbone_drift"] > 0.0 and rows[0]["trainable_pct"] == 100.0
    assert "transfer study" in out and "head_only" in out
    reports = list(Path("freezelab_reports").glob("*/index.html"))
    assert len(reports) == 1
    assert "report of the study:" in out and reports[0].name in out
    assert Path("mlflow.db").is_file()


def test_format_study_lists_each_policy():
    text = format_study(
        "t",
        [
            {
                "policy": "full",
                "val_acc": 0.5,
                "best_val_acc": 0.6,
                "wall_s": 1.0,
                "trainable_pct": 100.0,
                "backbone_drift": 0.1,
            }
        ],
    )
    assert "full" in text and "0.600" in text
