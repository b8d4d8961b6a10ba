"""The training loop in one process (num_workers: 0, no Ray Train): policies, metrics,
checkpoints, resume, and the frozen-feature cache."""

from pathlib import Path

import pytest
import torch
from faults import CrashAfterEpoch, Interrupted
from safetensors.torch import load_file

from freezelab.trainers import checkpoint as ckpt
from freezelab.trainers.launch import run_training
from freezelab.trainers.location import RunLocation
from freezelab.trainers.models import build_for_config


def _weights(outcome):
    return load_file(outcome.weights_file)


POLICIES = [
    {"type": "full"},
    {"type": "head_only"},
    {"type": "last_n", "n": 1},
    {"type": "patterns", "include": ["layer4.*"]},
    {"type": "gradual", "every": 1},
    {"type": "lp_ft", "probe_epochs": 1},
    {"type": "bitfit", "include_norm": True},
    {"type": "progressive_freeze", "start": 1, "every": 1},
]


@pytest.mark.parametrize("policy", POLICIES, ids=lambda p: p["type"])
def test_each_policy_trains_exactly_its_plan(tiny_config, policy):
    config = tiny_config(name=f"p-{policy['type']}", policy=policy)
    outcome = run_training(config)
    start = build_for_config(config).state_dict()
    end = _weights(outcome)
    model = build_for_config(config)
    trained_at_some_epoch = set()
    for epoch in range(config.epochs):
        trained_at_some_epoch |= config.policy.plan(model, epoch).trainable_param_names
    for name, tensor in end.items():
        if name in trained_at_some_epoch and name.endswith("weight") and "bn" not in name:
            assert not torch.equal(tensor, start[name]), f"{name} should have trained"
        elif name in dict(model.named_parameters()) and name not in trained_at_some_epoch:
            assert torch.equal(tensor, start[name]), f"{name} is frozen and must not change"
    metrics = outcome.metrics
    assert metrics["epoch"] == config.epochs - 1
    for key in (
        "train_loss",
        "train_acc",
        "val_loss",
        "val_acc",
        "epoch_time_s",
        "images_per_s",
        "trainable_params",
        "frozen_params",
        "phase",
        "peak_memory_mb",
        "lr/head",
    ):
        assert key in metrics, key
    plan = config.policy.plan(model, config.epochs - 1)
    assert metrics["trainable_params"] == plan.trainable_params
    assert metrics["frozen_params"] == plan.total_params - plan.trainable_params
    for group in plan.groups:
        drift = metrics[f"drift/{group.name}"]
        if not any(n in trained_at_some_epoch for n in group.param_names):
            assert drift == 0.0
        else:
            assert drift > 0.0


def test_frozen_batchnorm_keeps_its_statistics(tiny_config):
    config = tiny_config(
        name="bn", policy={"type": "head_only"}, performance={"feature_cache": False}
    )
    outcome = run_training(config)
    start = build_for_config(config).state_dict()
    end = _weights(outcome)
    running = [k for k in end if k.endswith("running_mean")]
    assert running and all(torch.equal(end[k], start[k]) for k in running)

    config = tiny_config(
        name="bn-train",
        policy={"type": "head_only", "bn": "train"},
        performance={"feature_cache": False},
    )
    end = _weights(run_training(config))
    assert any(not torch.equal(end[k], start[k]) for k in running)


def test_val_metrics_cover_the_whole_validation_set(tiny_config):
    from freezelab.trainers.data import build_datasets

    config = tiny_config(name="val", epochs=1)
    outcome = run_training(config)
    model = build_for_config(config)
    ckpt.load_model_weights(outcome.checkpoint_dir, model)
    _, val_set, _ = build_datasets(config.data, model)
    model.eval()
    with torch.no_grad():
        images = torch.stack([val_set[i][0] for i in range(len(val_set))])
        labels = torch.tensor([val_set[i][1] for i in range(len(val_set))])
        accuracy = (model(images).argmax(1) == labels).float().mean().item()
    assert outcome.metrics["val_acc"] == pytest.approx(accuracy)


def test_checkpoint_holds_config_policy_and_safetensors(tiny_config):
    config = tiny_config(name="ck", policy={"type": "lp_ft", "probe_epochs": 1})
    outcome = run_training(config)
    directory = Path(outcome.checkpoint_dir)
    state = ckpt.read_state(directory)
    assert state["epoch"] == 1
    assert state["config"]["name"] == "ck"
    assert state["policy"] == config.policy.to_dict()
    assert (directory / "model.safetensors").is_file()
    optimizer_state = ckpt.load_optimizer_state(directory)
    assert "fc.weight" in optimizer_state and "momentum_buffer" in optimizer_state["fc.weight"]


@pytest.mark.parametrize(
    "policy",
    [
        {"type": "full"},
        {"type": "lp_ft", "probe_epochs": 2, "ft_lr_factor": 0.5},
        {"type": "gradual", "every": 1},
    ],
    ids=lambda p: p["type"],
)
def test_interrupted_and_resumed_run_ends_with_identical_weights(tiny_config, policy):
    epochs = 4
    reference = _weights(run_training(tiny_config(name="straight", policy=policy, epochs=epochs)))

    config = tiny_config(name="interrupted", policy=policy, epochs=epochs)
    where = RunLocation.of(config)
    crash = CrashAfterEpoch(1, where.local_checkpoint_dir, config.checkpoint.keep)
    with pytest.raises(Interrupted):
        run_training(config, reporter=crash)
    assert where.latest_checkpoint() is not None
    resumed = run_training(config)
    assert resumed.metrics["epoch"] == epochs - 1
    weights = _weights(resumed)
    assert weights.keys() == reference.keys()
    for name in reference:
        assert torch.equal(weights[name], reference[name]), name


def test_a_complete_run_is_not_trained_again(tiny_config, capsys):
    config = tiny_config(name="once", epochs=1)
    first = run_training(config)
    again = run_training(config)
    assert again.already_complete
    assert again.checkpoint_dir == first.checkpoint_dir
    assert "already complete" in capsys.readouterr().out


def test_feature_cache_equals_recomputation(tiny_config):
    policy = {"type": "head_only"}
    cached = run_training(tiny_config(name="cached", policy=policy, epochs=3))
    plain = run_training(
        tiny_config(name="plain", policy=policy, epochs=3, performance={"feature_cache": False})
    )
    assert cached.metrics["feature_cache"] == 1 and plain.metrics["feature_cache"] == 0
    a, b = _weights(cached), _weights(plain)
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-5)
    assert cached.metrics["val_acc"] == pytest.approx(plain.metrics["val_acc"])
    assert cached.metrics["train_loss"] == pytest.approx(plain.metrics["train_loss"], rel=1e-4)


def test_feature_cache_stays_off_with_augmentation(tiny_config):
    config = tiny_config(name="aug", policy={"type": "head_only"}, data={"augment": True}, epochs=2)
    assert run_training(config).metrics["feature_cache"] == 0


def test_lp_ft_switches_lr_and_groups_at_the_boundary(tiny_config):
    config = tiny_config(
        name="lpft",
        policy={"type": "lp_ft", "probe_epochs": 1, "ft_lr_factor": 0.1},
        schedule={"name": "constant"},
    )
    metrics = run_training(config).metrics
    assert metrics["phase"] == "finetune"
    assert metrics["lr/head"] == pytest.approx(0.05 * 0.1)
    assert metrics["lr/stem"] == pytest.approx(0.05 * 0.1)


def test_cost_metrics_add_up_over_epochs_and_follow_what_trains(tiny_config):
    full = run_training(tiny_config(name="cost-full", policy={"type": "full"}, epochs=2))
    head = run_training(
        tiny_config(
            name="cost-head",
            policy={"type": "head_only"},
            epochs=2,
            performance={"feature_cache": False},
        )
    )
    for outcome in (full, head):
        first, last = outcome.history
        assert (
            0
            < first["train_time_s"]
            < last["train_time_s"]
            <= sum(h["epoch_time_s"] for h in outcome.history)
        )
        assert last["train_images"] == 2 * first["train_images"] > 0
        assert last["train_flops"] == 2 * first["train_flops"] > 0
    assert full.metrics["trainable_share"] == 1.0
    assert 0 < head.metrics["trainable_share"] < 0.2
    # A frozen backbone computes no weight gradients: fewer FLOPs per image.
    assert head.metrics["train_flops"] < 0.7 * full.metrics["train_flops"]


def test_the_epoch_that_fills_the_feature_cache_counts_the_backbone(tiny_config):
    outcome = run_training(tiny_config(name="cost-cache", policy={"type": "head_only"}, epochs=2))
    first, second = outcome.history
    assert (first["feature_cache"], second["feature_cache"]) == (0, 1)
    # Filling the cache runs the backbone; the cached epoch trains the head alone.
    assert first["train_flops"] > 10 * (second["train_flops"] - first["train_flops"]) > 0


# -- data.epoch_fraction ---------------------------------------------------------------


def test_epoch_fraction_trains_each_epoch_on_its_share_and_costs_it(tiny_config):
    from freezelab.trainers.optim import lr_factor

    # 72 training rows (3 classes x 24), batches of 12: 6 steps an epoch, 3 with half.
    common = {"policy": {"type": "full"}, "epochs": 3, "batch_size": 12}
    whole = run_training(tiny_config(name="whole", **common))
    half = run_training(tiny_config(name="half", data={"epoch_fraction": 0.5}, **common))
    for epoch, (w, h) in enumerate(zip(whole.history, half.history, strict=True), start=1):
        assert w["train_images"] == 72 * epoch
        assert h["train_images"] == 36 * epoch  # ceil(0.5 * 72) per epoch
        assert h["train_flops"] == pytest.approx(w["train_flops"] / 2, rel=1e-9)
    # The LR schedule's progress counts the subset's steps: epoch e's last step is step
    # 3e + 2 at 3 steps per epoch (at the whole set's 6 it would read as half as far).
    config = tiny_config(name="half", data={"epoch_fraction": 0.5}, **common)
    for epoch, metrics in enumerate(half.history):
        factor = lr_factor(config.schedule, (3 * epoch + 2) / 3, config.epochs)
        assert metrics["lr/head"] == pytest.approx(config.optimizer.lr * factor)


def test_epoch_fraction_turns_the_feature_cache_off(tiny_config):
    config = tiny_config(
        name="frac-cache", policy={"type": "head_only"}, data={"epoch_fraction": 0.5}
    )
    assert [h["feature_cache"] for h in run_training(config).history] == [0, 0]


def test_epoch_fraction_resumes_to_identical_weights(tiny_config):
    common = {
        "policy": {"type": "lp_ft", "probe_epochs": 2},
        "epochs": 4,
        "data": {"epoch_fraction": 0.4},
    }
    reference = _weights(run_training(tiny_config(name="frac-straight", **common)))
    config = tiny_config(name="frac-interrupted", **common)
    where = RunLocation.of(config)
    crash = CrashAfterEpoch(2, where.local_checkpoint_dir, config.checkpoint.keep)
    with pytest.raises(Interrupted):
        run_training(config, reporter=crash)
    weights = _weights(run_training(config))
    for name in reference:
        assert torch.equal(weights[name], reference[name]), name


# -- the held-out test set -------------------------------------------------------------

HELD_OUT = {"test_fraction": 0.2, "eval_shifts": ["rotate:90"]}


def _accuracy_and_loss(model, dataset) -> tuple[float, float]:
    with torch.no_grad():
        images = torch.stack([dataset[i][0] for i in range(len(dataset))])
        labels = torch.tensor([dataset[i][1] for i in range(len(dataset))])
        logits = model(images)
    accuracy = (logits.argmax(1) == labels).float().mean().item()
    return accuracy, torch.nn.functional.cross_entropy(logits, labels).item()


def test_the_test_set_is_evaluated_once_at_the_end_on_the_handed_over_model(tiny_config):
    from freezelab.trainers.data import build_splits, build_test_sets

    config = tiny_config(name="held-out", data=HELD_OUT)
    outcome = run_training(config)
    first, last = outcome.history
    tested = ("test_", "shifted/test_")
    assert not [key for key in first if key.startswith(tested)]
    assert {key for key in last if key.startswith(tested)} == {
        "test_acc",
        "test_loss",
        "test_images",
        "shifted/test_acc/rotate:90",
    }
    model = build_for_config(config)
    ckpt.load_model_weights(outcome.checkpoint_dir, model)
    model.eval()
    _, _, test_set, _ = build_splits(config.data, model)
    views = build_test_sets(config.data, model, test_set)
    accuracy, loss = _accuracy_and_loss(model, test_set)
    assert last["test_images"] == len(test_set) == 107
    assert last["test_acc"] == pytest.approx(accuracy)
    assert last["test_loss"] == pytest.approx(loss, rel=1e-5)
    shifted, _ = _accuracy_and_loss(model, views["rotate:90"])
    assert last["shifted/test_acc/rotate:90"] == pytest.approx(shifted)
    assert outcome.metrics["test_acc"] == last["test_acc"]


# Measured, not chosen by: these differ between two runs of the same config.
TIMINGS = ("epoch_time_s", "images_per_s", "train_time_s", "peak_memory_mb")


@pytest.mark.parametrize(
    "policy", [{"type": "full"}, {"type": "head_only"}], ids=lambda p: p["type"]
)
def test_test_labels_change_no_choice(tiny_config, monkeypatch, policy):
    """Labels of the test set replaced (all class 0, which changes the accuracy even of
    a model that predicts one class): every train and val number, and the saved
    weights, stay bit for bit; only the test metrics move (head_only: with the
    frozen-feature cache on, which caches val but not test)."""
    from freezelab.trainers import loop

    plain = run_training(tiny_config(name="labels", policy=policy, data=HELD_OUT))
    build_splits = loop.build_splits

    def with_other_test_labels(data, model):
        train, val, test, num_classes = build_splits(data, model)
        test.targets = [0] * len(test.targets)
        return train, val, test, num_classes

    monkeypatch.setattr(loop, "build_splits", with_other_test_labels)
    swapped = run_training(tiny_config(name="other-labels", policy=policy, data=HELD_OUT))

    assert swapped.metrics["test_acc"] != plain.metrics["test_acc"]
    assert (
        swapped.metrics["shifted/test_acc/rotate:90"] != plain.metrics["shifted/test_acc/rotate:90"]
    )
    for before, after in zip(plain.history, swapped.history, strict=True):
        tested = ("test_", "shifted/test_")
        kept = {k for k in before if k not in TIMINGS and not k.startswith(tested)}
        assert kept == {k for k in after if k not in TIMINGS and not k.startswith(tested)}
        assert {k: before[k] for k in kept} == {k: after[k] for k in kept}
    a, b = _weights(plain), _weights(swapped)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
