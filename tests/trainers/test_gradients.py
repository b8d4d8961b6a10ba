"""Gradient shock, the question's fourth consequence: per-group gradient norms, from the
meter alone (known values) and through the loop and MLflow (local mode)."""

from __future__ import annotations

import json
import math

import mlflow
import pytest
import timm
import torch

from freezelab.mlflow.tracked import train_tracked
from freezelab.policies import apply, from_dict
from freezelab.trainers.gradients import GradientMeter
from freezelab.trainers.launch import run_training


def _model_and_plan(policy):
    torch.manual_seed(0)
    model = timm.create_model("test_resnet", num_classes=3)
    plan = from_dict(policy).plan(model, 0)
    apply(model, plan)
    return model, plan


def _backward(model, seed):
    torch.manual_seed(seed)
    model.zero_grad(set_to_none=True)
    model(torch.randn(4, 3, 32, 32)).logsumexp(1).sum().backward()


def test_the_meter_gives_each_group_its_gradient_norm_and_frozen_groups_zero():
    model, plan = _model_and_plan({"type": "last_n", "n": 1})
    meter = GradientMeter(model, plan, early_steps=1)
    params = dict(model.named_parameters())
    expected = []
    for step in range(2):
        _backward(model, step)
        norms, relative = {}, {}
        for group in plan.groups:
            names = [n for n in group.param_names if n in plan.trainable_param_names]
            grad = math.sqrt(sum(float(params[n].grad.double().pow(2).sum()) for n in names))
            weight = math.sqrt(sum(float(params[n].detach().double().pow(2).sum()) for n in names))
            norms[group.name] = grad
            relative[group.name] = grad / weight if weight else 0.0
        expected.append((norms, relative))
        meter.measure(step=step)
    # float32 norms per tensor: equal to float64 sums to float32's precision
    metrics = meter.epoch_metrics()
    trainable = {g.name for g in plan.trainable_groups()}
    assert trainable and len(trainable) < len(plan.groups)
    for group in plan.groups:
        mean = sum(e[0][group.name] for e in expected) / 2
        mean_relative = sum(e[1][group.name] for e in expected) / 2
        if group.name in trainable:
            assert metrics[f"grad_norm/{group.name}"] == pytest.approx(mean, rel=1e-6)
            assert metrics[f"rel_grad_norm/{group.name}"] == pytest.approx(mean_relative, rel=1e-6)
            assert mean > 0
        else:  # a frozen group's gradient is exactly zero
            assert metrics[f"grad_norm/{group.name}"] == 0.0
            assert metrics[f"rel_grad_norm/{group.name}"] == 0.0
    (early,) = meter.early_metrics()  # early_steps=1: the first step only
    assert early["step"] == 0
    assert early["grad_norm/head"] == pytest.approx(expected[0][0]["head"], rel=1e-6)
    # the next epoch starts from zero
    assert meter.epoch_metrics()["grad_norm/head"] == 0.0 and meter.early_metrics() == []


def test_the_loop_reports_gradient_norms_and_the_early_steps_of_each_phase(tiny_config):
    config = tiny_config(
        name="shock",
        epochs=2,
        policy={"type": "lp_ft", "probe_epochs": 1},
        metrics={"early_steps": 3},
        performance={"feature_cache": False},
    )
    outcome = run_training(config)
    probe, finetune = outcome.history
    # The probe trains the head only; fine-tuning reaches the whole backbone.
    assert probe["grad_norm/head"] > 0 and probe["grad_norm/stem"] == 0.0
    assert finetune["grad_norm/stem"] > 0 and finetune["grad_norm/head"] > 0
    steps_per_epoch = -(-outcome.history[0]["train_images"] // config.batch_size)
    first, second = (json.loads(h["early_steps"]) for h in outcome.history)
    # the first three steps of the run, then the first three of the fine-tuning phase
    assert [row["step"] for row in first] == [0, 1, 2]
    assert [row["step"] for row in second] == [steps_per_epoch + i for i in range(3)]
    assert all(row["grad_norm/stem"] == 0.0 for row in first)
    assert all(row["grad_norm/stem"] > 0.0 for row in second)


def test_gradient_norms_can_be_switched_off(tiny_config):
    config = tiny_config(name="quiet", epochs=1, metrics={"gradients": False})
    metrics = run_training(config).metrics
    assert not any(k.startswith(("grad_norm/", "rel_grad_norm/")) for k in metrics)
    assert "early_steps" not in metrics


def test_mlflow_charts_the_early_steps_at_their_global_step(tiny_config, tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    config = tiny_config(
        name="shock-tracked",
        epochs=2,
        policy={"type": "lp_ft", "probe_epochs": 1},
        metrics={"early_steps": 2},
        mlflow={"enabled": True, "tracking_uri": uri, "experiment": "shock"},
    )
    tracked = train_tracked(config)
    client = mlflow.MlflowClient(uri)
    history = client.get_metric_history(tracked.run_id, "early/grad_norm/head")
    steps_per_epoch = -(-tracked.outcome.history[0]["train_images"] // config.batch_size)
    assert sorted(m.step for m in history) == [0, 1, steps_per_epoch, steps_per_epoch + 1]
    epochs = client.get_metric_history(tracked.run_id, "grad_norm/layer1")
    assert [m.value for m in sorted(epochs, key=lambda m: m.step)][0] == 0.0
    # the JSON of the early steps is no metric of its own
    run = client.get_run(tracked.run_id)
    assert "early_steps" not in run.data.metrics
    # The model (of epoch 1) has the run's final metrics, not the early step 1's norm.
    (model,) = client.search_logged_models(
        experiment_ids=[run.info.experiment_id],
        filter_string=f"source_run_id = '{tracked.run_id}'",
    )
    linked = {m.key: (m.value, m.step) for m in model.metrics}
    last = max(history, key=lambda m: m.step)
    assert linked["early/grad_norm/head"] == (last.value, steps_per_epoch + 1)
    assert {key: value for key, (value, _) in linked.items()} == run.data.metrics
