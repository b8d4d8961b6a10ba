"""``freezelab report`` against a real sqlite MLflow store and real checkpoints: a sweep
made by hand (a parent run tagged ``freezelab.kind=sweep``, three tiny local-mode runs
nested under it), no Ray cluster."""

from __future__ import annotations

import doctest
import html
import importlib
import math
import shutil
from dataclasses import replace
from types import SimpleNamespace

import mlflow
import numpy as np
import pytest
import torch

from freezelab.api import train
from freezelab.policies import from_dict
from freezelab.report import ReportError, build_report, linear_cka, pareto_front, summarize
from freezelab.report.figures import FIGURES
from freezelab.report.runs import find_weights, load_record, resolve_target
from freezelab.trainers.config import validate_config
from tests.conftest import TINY, merge

EXPERIMENT = "report-tests"
SWEEP = "policy-sweep"
POLICIES = {
    "full": {"type": "full"},
    "head_only": {"type": "head_only"},
    "last_n(n=1)": {"type": "last_n", "n": 1},
}
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """One sweep and its report for the whole module: training is the slow part.

    The runs are ``tiny_config`` runs (the same TINY base), built here because a
    module-scoped fixture cannot use the function-scoped ``tiny_config``.
    """
    root = tmp_path_factory.mktemp("report")
    uri = f"sqlite:///{root}/mlflow.db"
    client = mlflow.MlflowClient(uri)
    # An explicit artifact root: the default is ./mlruns in the working directory.
    experiment_id = client.create_experiment(EXPERIMENT, artifact_location=str(root / "artifacts"))
    parent = client.create_run(
        experiment_id, run_name=SWEEP, tags={"freezelab.kind": "sweep"}
    ).info.run_id
    outcomes = {}
    for label, policy in POLICIES.items():
        name = f"sweep-{policy['type']}"
        config = validate_config(
            merge(
                TINY,
                {
                    "name": name,
                    "storage_path": str(root / "runs"),
                    "policy": policy,
                    "epochs": 2,
                    "mlflow": {
                        "enabled": True,
                        "tracking_uri": uri,
                        "experiment": EXPERIMENT,
                        # Only head_only logs its model: its CKA must come from there.
                        "log_model": policy["type"] == "head_only",
                    },
                },
            )
        )
        outcomes[label] = train(config, parent_run_id=parent)
    client.set_terminated(parent)
    # Where each run's fine-tuned weights are found: full from its checkpoint,
    # head_only from its logged MLflow model, last_n nowhere (its CKA is skipped).
    shutil.rmtree(root / "runs" / "sweep-head_only")
    shutil.rmtree(root / "runs" / "sweep-last_n")
    report = build_report(SWEEP, out_dir=root / "out", tracking_uri=uri)
    rows = {row["policy"]: row for row in report.rows}
    return SimpleNamespace(
        uri=uri, client=client, parent=parent, outcomes=outcomes, report=report, rows=rows
    )


def _history(client, run_id, key):
    return [m.value for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)]


def test_every_figure_is_a_valid_png(sweep):
    from matplotlib.image import imread
    from PIL import Image

    assert sorted(sweep.report.figures) == sorted(FIGURES)
    page = sweep.report.index.read_text()
    for name, path in sweep.report.figures.items():
        assert path.is_file() and path.parent == sweep.report.directory
        assert path.read_bytes()[:8] == PNG_SIGNATURE, name
        with Image.open(path) as image:
            image.verify()
        pixels = imread(path)
        assert pixels.ndim == 3 and pixels.shape[0] > 100 and pixels.shape[1] > 100
        # Embedded, so the page shows its figures inside MLflow's sandboxed view too.
        assert f'data-file="{path.name}"' in page and f'src="{path.name}"' not in page
    assert page.count('src="data:image/png;base64,') == len(FIGURES)


def test_table_matches_the_mlflow_runs(sweep):
    client = sweep.client
    assert set(sweep.rows) == set(POLICIES)
    for label, row in sweep.rows.items():
        run = client.get_run(row["run_id"])
        assert run.info.run_id == sweep.outcomes[label].run_id
        assert run.data.tags["mlflow.parentRunId"] == sweep.parent
        assert run.data.params["policy.type"] == POLICIES[label]["type"]
        metrics = run.data.metrics
        val_acc = _history(client, run.info.run_id, "val_acc")
        assert row["val_acc"] == metrics["val_acc"] == val_acc[-1]
        assert row["best_val_acc"] == metrics["epoch/best_val_acc"] == max(val_acc)
        assert row["epochs_to_best"] == val_acc.index(max(val_acc)) + 1
        assert row["epochs"] == len(val_acc) == 2
        # One definition of cost: the run's last cumulative cost/train_s.
        times = _history(client, run.info.run_id, "cost/train_s")
        assert row["train_time_s"] == pytest.approx(times[-1], rel=1e-12)
        # Images seen over that time: not a mean of per-epoch rates.
        images = _history(client, run.info.run_id, "cost/train_images")
        assert row["images_per_s"] == pytest.approx(images[-1] / times[-1], rel=1e-12)
        assert row["images_per_s"] == pytest.approx(metrics["cost/images_per_s"], rel=1e-12)
        trainable, frozen = metrics["model/trainable_params"], metrics["model/frozen_params"]
        assert row["trainable_share"] == trainable / (trainable + frozen)
        backbone = [v for k, v in metrics.items() if k.startswith("drift/") and k != "drift/head"]
        assert row["backbone_drift"] == pytest.approx(sum(backbone) / len(backbone), rel=1e-12)
    assert sweep.rows["full"]["trainable_share"] == 1.0
    # best first on the handed-over model's accuracy, as the page shows them
    accuracies = [row["val_acc"] for row in sweep.report.rows]
    assert accuracies == sorted(accuracies, reverse=True)


def test_drift_is_zero_for_frozen_groups_and_positive_for_trained_ones(sweep):
    client = sweep.client

    def final_drift(label):
        metrics = client.get_run(sweep.rows[label]["run_id"]).data.metrics
        return {k.removeprefix("drift/"): v for k, v in metrics.items() if k.startswith("drift/")}

    head_only = final_drift("head_only")
    assert set(head_only) == {"stem", "layer1", "layer2", "layer3", "layer4", "head"}
    assert all(head_only[g] == 0.0 for g in head_only if g != "head")
    assert head_only["head"] > 0
    assert sweep.rows["head_only"]["backbone_drift"] == 0.0
    assert all(value > 0 for value in final_drift("full").values())
    last_n = final_drift("last_n(n=1)")
    assert last_n["layer4"] > 0 and last_n["head"] > 0
    assert all(last_n[g] == 0.0 for g in ("stem", "layer1", "layer2", "layer3"))
    assert 0 < sweep.rows["last_n(n=1)"]["backbone_drift"] < sweep.rows["full"]["backbone_drift"]


def test_cka_of_an_untouched_backbone_is_one(sweep):
    head_only, full = sweep.rows["head_only"], sweep.rows["full"]
    assert head_only["cka"] == pytest.approx(1.0, abs=1e-6), head_only["cka_source"]
    assert head_only["cka_source"] == "the run's logged MLflow model"
    assert full["cka_source"].startswith("checkpoint ")
    assert 0 < full["cka"] < 1 - 1e-6


def test_missing_weights_skip_cka_with_a_note(sweep):
    row = sweep.rows["last_n(n=1)"]
    assert row["cka"] is None
    assert "no checkpoint under" in row["cka_source"]
    note = next(n for n in sweep.report.notes if "CKA skipped" in n)
    assert "last_n(n=1)" in note
    assert "CKA skipped" in sweep.report.index.read_text()


def test_a_checkpoint_of_another_config_is_not_used(sweep, tmp_path):
    run = sweep.client.get_run(sweep.rows["full"]["run_id"])
    record = load_record(sweep.client, run, sweep.uri)
    assert find_weights(sweep.client, record, sweep.uri, tmp_path)[0] is not None
    # The same name and storage, but another policy: its checkpoint is not this run's.
    other = record.config.model_copy(update={"policy": from_dict({"type": "head_only"})})
    weights, why = find_weights(sweep.client, replace(record, config=other), sweep.uri, tmp_path)
    assert weights is None and "belongs to another config" in why


def test_linear_cka_identity_orthogonal_and_scale_invariance():
    rng = np.random.default_rng(0)
    for n, p in ((40, 12), (10, 30)):  # both computation paths: n > p and n <= p
        x = rng.normal(size=(n, p))
        q, _ = np.linalg.qr(rng.normal(size=(p, p)))
        assert linear_cka(x, x) == pytest.approx(1.0, abs=1e-12)
        assert linear_cka(x, x @ q) == pytest.approx(1.0, abs=1e-12)
        assert linear_cka(x, 7.5 * x) == pytest.approx(1.0, abs=1e-12)
        assert linear_cka(x, 0.01 * x @ q + 3.0) == pytest.approx(1.0, abs=1e-12)
        y = rng.normal(size=(n, 5))
        assert linear_cka(x, y) == pytest.approx(linear_cka(y, x), abs=1e-12)
        assert 0 <= linear_cka(x, y) < 1
    x = rng.normal(size=(50, 4))
    # not invariant to an anisotropic scaling
    assert linear_cka(x, x * np.array([1.0, 1.0, 1.0, 20.0])) < 0.99
    as_tensor = torch.from_numpy(x).float().reshape(50, 2, 2)
    assert linear_cka(as_tensor, x) == pytest.approx(1.0, abs=1e-6)
    assert math.isnan(linear_cka(np.ones((5, 3)), x[:5]))
    with pytest.raises(ValueError, match="examples"):
        linear_cka(x, x[:10])


def test_summary_names_the_winning_policy(sweep):
    client = sweep.client
    runs = [client.get_run(row["run_id"]) for row in sweep.report.rows]
    winner = max(runs, key=lambda r: r.data.metrics["val_acc"])
    label = next(p for p, row in sweep.rows.items() if row["run_id"] == winner.info.run_id)
    assert sweep.report.summary.startswith("Ranked on val_acc at the last epoch")
    assert f"{label} won: val_acc {winner.data.metrics['val_acc']:.4f} (n=1, no interval)" in (
        sweep.report.summary
    )
    assert "no interval with a single run" in sweep.report.summary
    assert "head_only intact" in sweep.report.summary
    page = sweep.report.index.read_text()
    paragraphs = sweep.report.summary.split("\n\n")
    assert len(paragraphs) == 5 and paragraphs[1].startswith("(1) Compute.")
    for paragraph in paragraphs:  # one <p> each
        assert f"<p>{html.escape(paragraph)}</p>" in page


def test_report_is_logged_on_the_sweep_parent_run(sweep):
    assert sweep.report.logged and sweep.report.parent_run_id == sweep.parent
    logged = {a.path for a in sweep.client.list_artifacts(sweep.parent, "report")}
    expected = {f"report/{name}.png" for name in FIGURES} | {"report/index.html"}
    assert expected <= logged


def test_targets_sweep_by_id_experiment_by_name_and_unknown(sweep, tmp_path, capsys):
    by_id = resolve_target(sweep.client, sweep.parent)
    assert by_id.parent_run_id == sweep.parent and len(by_id.runs) == 3
    report = build_report(EXPERIMENT, out_dir=tmp_path, tracking_uri=sweep.uri, cka=False)
    out = capsys.readouterr().out
    assert f"[freezelab] report: {report.index.resolve()}" in out
    assert report.parent_run_id is None and not report.logged
    assert {row["run_id"] for row in report.rows} == {r["run_id"] for r in sweep.rows.values()}
    with pytest.raises(ReportError, match="no sweep run or experiment named 'nope'"):
        build_report("nope", out_dir=tmp_path, tracking_uri=sweep.uri)


def test_pareto_front():
    points = [(1.0, 0.5), (2.0, 0.9), (3.0, 0.8), (0.5, 0.5), (2.0, 0.7), (math.nan, 1.0)]
    assert pareto_front(points) == [3, 1]
    assert pareto_front([]) == []
    assert pareto_front([(1.0, 0.6), (1.0, 0.6)]) == [0]


@pytest.mark.parametrize(
    "name", ["freezelab.report.rows", "freezelab.report.cka", "freezelab.report.consequences"]
)
def test_docstring_examples(name):
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0


def test_figures_draw_labels_with_dollar_signs_as_text(tmp_path):
    # A patterns policy's regex label holds "$" twice: matplotlib would read it as math
    # text and fail; the report draws every label as plain text.
    from freezelab.report.figures import draw_figures
    from freezelab.report.rows import group_rows, table_row
    from freezelab.report.runs import RunRecord

    label = r"patterns(include=['layer4$', '^fc_$'])"
    record = RunRecord(
        run_id="0" * 32,
        run_name="regex",
        experiment_id="1",
        status="FINISHED",
        policy=label,
        config=None,
        history={
            "val_acc": {0: 0.5, 1: 0.6},
            "train_time_s": {0: 1.0, 1: 2.0},
            "train_images": {0: 10, 1: 20},
            "drift/layer4": {0: 0.1, 1: 0.2},
            "drift/head": {0: 0.3, 1: 0.4},
        },
        groups=["layer4", "head"],
        head_groups=frozenset({"head"}),
    )
    rows = [table_row(record, None, "not computed")]
    paths = draw_figures(tmp_path, [record], rows, group_rows(rows))
    assert all(path.stat().st_size > 0 for path in paths.values())


def _row(policy, lr, seed, val_acc, time=1.0, status="FINISHED"):
    setting = f"optimizer.lr={lr}"
    return {
        "policy": policy,
        "setting": setting,
        "setting_key": f"{policy}|{setting}",
        "label": f"{policy} [{setting}]",
        "run_name": f"{policy}-{lr}-{seed}",
        "run_id": f"{policy}-{lr}-{seed}",
        "seed": str(seed),
        "status": status,
        "val_acc": val_acc,
        "best_val_acc": val_acc,
        "train_time_s": time,
        "images_per_s": 100.0,
        "trainable_share": 0.5,
        "backbone_drift": 0.1,
        "cka": 0.9,
    }


def test_settings_group_seeds_and_each_policy_enters_at_its_best_lr():
    from freezelab.report.rows import group_rows
    from freezelab.stats import summarize as stats

    rows = [
        *(_row("full", 0.1, s, v) for s, v in enumerate([0.50, 0.55, 0.45])),
        *(_row("full", 0.01, s, v, time=2.0) for s, v in enumerate([0.80, 0.82, 0.81])),
        *(_row("head_only", 0.1, s, v) for s, v in enumerate([0.70, 0.71, 0.72])),
        _row("head_only", 0.1, 3, 0.99, status="FAILED"),
    ]
    notes = []
    groups = group_rows(rows, notes)
    assert [g["label"] for g in groups] == [
        "full [optimizer.lr=0.01]",
        "head_only [optimizer.lr=0.1]",
        "full [optimizer.lr=0.1]",
    ]
    expected = stats([0.80, 0.82, 0.81])
    top = groups[0]
    assert top["n"] == 3 and top["val_acc"] == pytest.approx(expected.mean)
    assert (top["ci95_low"], top["ci95_high"]) == pytest.approx(
        (expected.ci95_low, expected.ci95_high)
    )
    assert top["train_time_s"] == 2.0
    # the failed run is no repeat of a result, and the notes say so
    assert groups[1]["n"] == 3 and "head_only-0.1-3 (FAILED)" in notes[0]
    assert [g["best_of_policy"] for g in groups] == [True, True, False]
    assert groups[0]["settings_of_policy"] == 2


def test_summary_says_which_differences_exceed_their_interval():
    from freezelab.report.rows import group_rows

    rows = [
        *(_row("full", 0.01, s, v) for s, v in enumerate([0.80, 0.82, 0.81])),
        *(_row("full", 0.1, s, v) for s, v in enumerate([0.30, 0.31, 0.29])),
        *(_row("head_only", 0.1, s, v) for s, v in enumerate([0.70, 0.71, 0.72])),
        *(_row("bitfit", 0.1, s, v) for s, v in enumerate([0.70, 0.90, 0.80])),
        _row("last_n", 0.1, 0, 0.6),
    ]
    text = summarize(group_rows(rows))
    assert "averaged over each setting's seeds" in text
    assert "Each policy is compared at its own best setting" in text
    assert "full [optimizer.lr=0.01] won: val_acc 0.8100 ± 0.0248 (95% interval, n=3)" in text
    behind = text.split("behind it by more than")[1].split("within the interval")[0]
    within = text.split("within the interval")[1].split("no interval")[0]
    assert "head_only [optimizer.lr=0.1] (-0.1000" in behind and "bitfit" not in behind
    assert "bitfit [optimizer.lr=0.1] (-0.0100" in within
    assert "last_n [optimizer.lr=0.1] (-0.2100)" in text.split("no interval with a single run")[1]
    # the weaker lr of full never enters the comparison
    assert "full [optimizer.lr=0.1]" not in text


def test_report_command_prints_the_settings_and_the_summary(sweep, tmp_path, capsys):
    from freezelab.cli import main

    capsys.readouterr()
    assert main(["report", SWEEP, "--tracking-uri", sweep.uri, "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "val_acc (mean ± ci95)" in out
    assert all(label in out for label in POLICIES)
    assert " ".join(out.split()).count("Ranked on val_acc at the last epoch") == 1
    assert (tmp_path / "index.html").is_file()


def _measured_row(
    policy, seed, val_acc, *, variant="", flops=100.0, forgetting=0.0, grad=None, shifts=None
):
    row = _row(policy, 0.1, seed, val_acc)
    row.update(
        variant=variant,
        setting_key=f"{variant}|{policy}",
        train_flops=flops,
        forgetting=forgetting,
        source_probe_acc=0.9 - forgetting,
        backbone_grad_early=math.nan if grad is None else grad,
        backbone_grad_steps=[] if grad is None else [grad, grad / 2],
        evaluations=shifts or {},
    )
    return row


def test_consequence_paragraphs_cite_the_measured_numbers():
    from freezelab.report.consequences import consequences
    from freezelab.report.rows import by_variant, group_rows

    rows = []
    for seed in range(3):
        for variant, gain in (("plain", 0.05), ("inverted", 0.30)):
            rows += [
                _measured_row(
                    "full",
                    seed,
                    0.6 + gain + 0.01 * seed,
                    variant=variant,
                    flops=200e9,
                    forgetting=0.10 + 0.01 * seed,
                    grad=2.0 + seed,
                    shifts={"invert": 0.5 + 0.01 * seed},
                ),
                _measured_row(
                    "head_only",
                    seed,
                    0.6 + 0.01 * seed,
                    variant=variant,
                    flops=20e9,
                    forgetting=0.0,
                    shifts={"invert": 0.2 + 0.01 * seed},
                ),
                _measured_row(
                    "lp_ft(probe_epochs=1)",
                    seed,
                    0.6,
                    variant=variant,
                    flops=110e9,
                    forgetting=0.02,
                    grad=1.0 + seed,
                ),
            ]
    groups = group_rows(rows)
    compute, shift, forgetting, gradients = (
        " ".join(p.split()) for p in consequences(by_variant(groups))
    )
    assert (
        "(full [optimizer.lr=0.1]) cost 200.0 GFLOP" in compute
        and "head_only [optimizer.lr=0.1] 10.0% of its FLOPs" in compute
    )
    assert "lp_ft(probe_epochs=1) [optimizer.lr=0.1] 55.0% of its FLOPs" in compute
    # full against head_only: +0.05 on the plain target, +0.30 on the inverted one, each with
    # Welch's interval; the variants in the order of their runs
    assert shift.index("On the target 'plain'") < shift.index("On the target 'inverted'")
    assert (
        "(head_only [optimizer.lr=0.1]): +0.0500, 95% interval [+0.0273, +0.0727], a real difference"
        in shift
    )
    assert "+0.0500 on 'plain', +0.3000 on 'inverted'; it was largest on 'inverted'" in shift
    assert "Under invert, full [optimizer.lr=0.1] kept the most (0.5100 ± 0.0248)" in shift
    assert forgetting.index("head_only [optimizer.lr=0.1] 0.0000") < forgetting.index(
        "full [optimizer.lr=0.1] 0.1100 ± 0.0248"
    )
    assert "Under full [optimizer.lr=0.1] the backbone received 1.5x the gradient" in gradients
    assert "head_only" not in gradients  # its backbone never trains: nothing to measure


def test_consequences_say_what_was_not_measured():
    from freezelab.report.consequences import consequences
    from freezelab.report.rows import by_variant, group_rows

    rows = [_row("full", 0.1, 0, 0.8), _row("head_only", 0.1, 0, 0.7)]
    for row in rows:
        row.update(
            variant="",
            train_flops=math.nan,
            forgetting=math.nan,
            source_probe_acc=math.nan,
            backbone_grad_early=math.nan,
            evaluations={},
        )
    text = " ".join(consequences(by_variant(group_rows(rows))))
    assert "Not measured: give the fine-tuning runs forgetting.source" in text
    assert "Not measured: the runs logged no early gradient norms" in text
