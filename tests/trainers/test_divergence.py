"""A run whose loss diverges is flagged, not failed: the pure verdict on a history, and
real runs in one process (num_workers: 0) that diverge or do not."""

import logging
import math

import mlflow
import pytest
from faults import CrashAfterEpoch, Interrupted

from freezelab.api import train
from freezelab.mlflow.run import DIVERGED_TAG
from freezelab.trainers.divergence import chance_loss, divergence_of, threshold
from freezelab.trainers.launch import run_training
from freezelab.trainers.location import RunLocation


def _history(*epochs):
    """``(phase, train_loss)`` per epoch as the loop's history holds them."""
    return [
        {"epoch": epoch, "phase": phase, "train_loss": loss}
        for epoch, (phase, loss) in enumerate(epochs)
    ]


def test_chance_is_the_loss_of_a_uniform_prediction():
    assert chance_loss(5) == pytest.approx(math.log(5))
    assert chance_loss(2) == pytest.approx(0.6931, abs=1e-4)


def test_a_converging_run_is_not_flagged():
    history = _history(("probe", 3.0), ("probe", 1.2), ("fine-tune", 2.5), ("fine-tune", 0.3))
    # Above chance inside a phase (its first epochs, a backbone just unfrozen) is no verdict.
    assert divergence_of(history, 5) is None


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_a_non_finite_loss_at_any_epoch_is_flagged(value):
    history = _history(("main", 1.0), ("main", value), ("main", 0.5))
    assert divergence_of(history, 5) == f"train_loss {value} at epoch 2"


def test_a_phase_that_ends_above_chance_is_flagged_by_name():
    history = _history(("probe", 120.0), ("probe", 97.3), ("fine-tune", 0.9), ("fine-tune", 0.2))
    assert divergence_of(history, 5) == (
        "phase 'probe' ended at train_loss 97.3 > 2 ln(5) = 3.22 (epoch 2)"
    )


def test_the_run_last_epoch_ends_its_phase_only_when_the_run_is_finished():
    history = _history(("main", 0.9), ("main", 3.5))
    assert divergence_of(history, 5, finished=False) is None
    assert divergence_of(history, 5) == (
        "phase 'main' ended at train_loss 3.5 > 2 ln(5) = 3.22 (epoch 2)"
    )
    # Above chance but below twice it: a run that learned little, not one that diverged.
    assert divergence_of(_history(("main", 0.9), ("main", 1.7)), 5) is None
    # Once the next epoch shows another phase, the last one's end is judged.
    later = _history(("probe", 3.5), ("fine-tune", 1.0))
    assert divergence_of(later, 5, finished=False).startswith("phase 'probe' ended")


def test_the_earliest_reason_is_given_whatever_the_order():
    history = _history(("probe", 50.0), ("fine-tune", math.nan))
    assert divergence_of(list(reversed(history)), 5).startswith("phase 'probe' ended")


# -- real runs --------------------------------------------------------------------------


def test_a_normal_run_is_not_flagged(tiny_config):
    outcome = run_training(tiny_config(name="calm", epochs=2), progress=False)
    assert [m["diverged"] for m in outcome.history] == [0, 0]
    assert "diverged_reason" not in outcome.metrics


def test_a_nan_loss_is_flagged_and_the_run_finishes(tiny_config):
    # The source probe reads the backbone's (NaN) features: no traceback either.
    config = tiny_config(
        name="nan",
        epochs=3,
        optimizer={"lr": 1e6},
        forgetting={"source": {"kind": "digits", "classes": [5, 6], "train_per_class": 8}},
    )
    outcome = run_training(config, progress=False)
    assert outcome.metrics["epoch"] == 2 and outcome.checkpoint_dir is not None
    assert all(m["diverged"] == 1 for m in outcome.history)
    assert outcome.metrics["diverged_reason"] == "train_loss nan at epoch 1"
    assert math.isnan(outcome.metrics["source_probe_acc"])


def test_a_head_that_ends_its_phase_above_chance_is_flagged(tiny_config):
    # A learning rate that blows the head's logits up without reaching NaN: the loss stays
    # finite but far above 2 ln(3). The probe phase is judged when the next epoch begins.
    config = tiny_config(
        name="probe-blowup",
        epochs=3,
        optimizer={"lr": 1e4},
        policy={"type": "lp_ft", "probe_epochs": 2},
    )
    outcome = run_training(config, progress=False)
    losses = [m["train_loss"] for m in outcome.history]
    assert all(math.isfinite(loss) for loss in losses[:2]) and losses[1] > threshold(3)
    assert [m["diverged"] for m in outcome.history] == [0, 0, 1]
    assert outcome.metrics["diverged_reason"].startswith(
        f"phase 'probe' ended at train_loss {losses[1]:.4g} > 2 ln(3) = 2.20 (epoch 2)"
    )


def test_a_resumed_run_reaches_the_same_verdict(tiny_config):
    # Interrupted right after the probe's last epoch, whose end only the next epoch
    # shows: the resumed run judges it from the history its checkpoint kept.
    def config(name):
        policy = {"type": "lp_ft", "probe_epochs": 2}
        return tiny_config(name=name, epochs=3, optimizer={"lr": 1e4}, policy=policy)

    straight = run_training(config("straight"), progress=False)
    interrupted = config("interrupted")
    where = RunLocation.of(interrupted)
    crash = CrashAfterEpoch(1, where.local_checkpoint_dir, interrupted.checkpoint.keep)
    with pytest.raises(Interrupted):
        run_training(interrupted, reporter=crash, progress=False)
    resumed = run_training(interrupted, progress=False)
    assert [m["diverged"] for m in resumed.history] == [0, 0, 1]
    assert resumed.metrics["diverged_reason"] == straight.metrics["diverged_reason"]


def test_a_diverged_run_is_tagged_in_mlflow_and_named_on_the_console(tiny_config, tmp_path, caplog):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    mlflow_section = {"enabled": True, "tracking_uri": uri, "experiment": "tests"}
    # freezelab's lines go to its own console handler (logs.py): listen on its logger.
    logging.getLogger("freezelab").addHandler(caplog.handler)
    try:
        with caplog.at_level(logging.WARNING, logger="freezelab"):
            diverged = train(
                tiny_config(name="nan", epochs=2, optimizer={"lr": 1e6}, mlflow=mlflow_section)
            )
            calm = train(tiny_config(name="calm", epochs=2, mlflow=mlflow_section))
    finally:
        logging.getLogger("freezelab").removeHandler(caplog.handler)
    lines = [r.getMessage() for r in caplog.records if "diverged" in r.getMessage()]
    assert lines == ["run nan diverged: train_loss nan at epoch 1"]
    client = mlflow.MlflowClient(uri)
    run = client.get_run(diverged.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags[DIVERGED_TAG] == "train_loss nan at epoch 1"
    assert [m.value for m in client.get_metric_history(diverged.run_id, "run/diverged")] == [1, 1]
    calm_run = client.get_run(calm.run_id)
    assert DIVERGED_TAG not in calm_run.data.tags
    assert calm_run.data.metrics["run/diverged"] == 0
