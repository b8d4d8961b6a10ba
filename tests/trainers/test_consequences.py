"""Each consequence of not freezing, measured on a case where its value is known:
input shifts, forgetting of the source task, surgical fine-tuning, and AdaBN."""

import pytest
import timm
import torch
from safetensors.torch import load_file

from freezelab.policies import PolicyError, apply, from_dict
from freezelab.policies.apply import adapt_norm_statistics
from freezelab.trainers.config import ConfigError, DataConfig
from freezelab.trainers.data import build_datasets, build_eval_sets
from freezelab.trainers.launch import run_training
from freezelab.trainers.models import build_for_config
from freezelab.trainers.shifts import ShiftedImages, parse_shift

SOURCE = {"kind": "digits", "classes": [5, 6, 7], "train_per_class": 30, "val_fraction": 0.3}


# -- input shifts ------------------------------------------------------------------


def _digits(**fields):
    model = timm.create_model("test_resnet", num_classes=3)
    config = DataConfig(kind="digits", classes=[0, 1, 2], input_size=16, **fields)
    return config, model


def test_invert_twice_is_the_identity_and_once_is_not():
    config, model = _digits()
    _, val, _ = build_datasets(config, model)
    invert = parse_shift("invert")
    twice = ShiftedImages(ShiftedImages(val, invert, 0, *_norm(model)), invert, 0, *_norm(model))
    once = ShiftedImages(val, invert, 0, *_norm(model))
    for index in range(5):
        assert torch.allclose(twice[index][0], val[index][0], atol=1e-5)
        assert not torch.allclose(once[index][0], val[index][0], atol=1e-2)
        assert twice[index][1] == val[index][1]


def _norm(model):
    cfg = timm.data.resolve_data_config({}, model=model)
    return cfg["mean"], cfg["std"]


@pytest.mark.parametrize(
    "shift", ["rotate:30", "gaussian_noise:0.2", "blur:1", "contrast:0.5", "invert"]
)
def test_each_shift_is_deterministic_changes_the_images_and_keeps_the_labels(shift):
    config, model = _digits(eval_shifts=[shift])
    _, val, _ = build_datasets(config, model)
    first = build_eval_sets(config, model, val)[shift]
    again = build_eval_sets(config, model, val)[shift]
    assert len(first) == len(val) and first.targets == val.targets
    changed = 0
    for index in range(8):
        image, label = first[index]
        assert torch.equal(image, again[index][0]) and label == val[index][1]
        changed += not torch.allclose(image, val[index][0], atol=1e-3)
    assert changed >= 6


def test_neutral_shifts_change_nothing():
    pixels = torch.rand(3, 8, 8)
    for text in ("rotate:0", "gaussian_noise:0", "blur:0", "contrast:1"):
        assert torch.allclose(parse_shift(text)(pixels, seed=1), pixels, atol=1e-6), text


@pytest.mark.parametrize(
    ("shifts", "message"),
    [
        (["rotate"], "rotate needs a value"),
        (["invert:2"], "invert takes no value"),
        (["blur:-1"], "must be >= 0"),
        (["rotate:x"], "'x' is not a number"),
        (["sharpen:2"], "unknown shift 'sharpen'"),
        (["rotate:30", "rotate:30.0"], "eval_shifts repeat ['rotate:30']"),
    ],
)
def test_bad_shifts_are_named(tiny_config, shifts, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        tiny_config(data={"eval_shifts": shifts})


def test_an_eval_set_must_exist_and_have_the_training_classes(tiny_config, tmp_path):
    from freezelab.trainers.preflight import check_run

    config = tiny_config(data={"eval_sets": {"ood": str(tmp_path / "missing")}})
    with pytest.raises(Exception, match=r"data.eval_sets.ood: .*missing' does not exist"):
        check_run(config)


def test_the_loop_reports_accuracy_under_each_shift_and_on_an_image_folder(tiny_config, tmp_path):
    from PIL import Image

    # An out-of-distribution set the user has: the three classes, as image files.
    for label in ("0", "1", "2"):
        (tmp_path / "ood" / label).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (16, 16), (40 * i, 80, 200)).save(
                tmp_path / "ood" / label / f"{i}.png"
            )
    config = tiny_config(
        epochs=4,
        optimizer={"lr": 0.02},
        metrics={"eval_every": 2},
        data={"eval_shifts": ["invert", "rotate:90"], "eval_sets": {"ood": str(tmp_path / "ood")}},
    )
    outcome = run_training(config)
    first, second, third, fourth = outcome.history
    for epoch in (first, third):  # not evaluation epochs
        assert not any(k.startswith("shifted/") for k in epoch)
    for epoch in (second, fourth):
        for name in ("invert", "rotate:90", "ood"):
            assert 0.0 <= epoch[f"shifted/val_acc/{name}"] <= 1.0
    # 9 images of 3 classes: the accuracy is a multiple of 1/9
    assert round(fourth["shifted/val_acc/ood"] * 9, 6) == round(fourth["shifted/val_acc/ood"] * 9)
    # The model learned the digits (well above chance), and inverted digits are not
    # digits it has seen: its accuracy falls.
    assert fourth["val_acc"] > 0.6
    assert fourth["shifted/val_acc/invert"] < fourth["val_acc"] - 0.2


def test_a_shifted_task_trains_on_shifted_images(tiny_config):
    plain = run_training(tiny_config(name="plain", epochs=1))
    inverted = run_training(tiny_config(name="inv", epochs=1, data={"shift": "invert"}))
    assert plain.metrics["train_loss"] != inverted.metrics["train_loss"]


# -- forgetting --------------------------------------------------------------------


def test_forgetting_of_head_only_is_exactly_zero_and_full_fine_tuning_forgets(tiny_config):
    results = {}
    for policy in ({"type": "head_only"}, {"type": "full"}):
        config = tiny_config(
            name=policy["type"],
            policy=policy,
            epochs=3,
            optimizer={"lr": 0.2},
            forgetting={"source": SOURCE, "every": 2},
        )
        outcome = run_training(config)
        results[policy["type"]] = outcome
        history = outcome.history
        assert "source_probe_acc" not in history[0]  # probed at epochs 2 and 3 only
        assert {"source_probe_acc", "forgetting"} <= history[1].keys() & history[2].keys()
        last = history[-1]
        assert last["forgetting"] == last["source_probe_acc_start"] - last["source_probe_acc"]
    assert results["head_only"].metrics["forgetting"] == 0.0
    full = results["full"].metrics
    assert full["source_probe_acc"] != full["source_probe_acc_start"]


def test_forgetting_survives_a_resume(tiny_config):
    from faults import CrashAfterEpoch, Interrupted

    from freezelab.trainers.location import RunLocation

    fields = dict(epochs=3, forgetting={"source": SOURCE})
    straight = run_training(tiny_config(name="straight", **fields)).metrics
    config = tiny_config(name="crashed", **fields)
    where = RunLocation.of(config)
    with pytest.raises(Interrupted):
        run_training(config, reporter=CrashAfterEpoch(0, where.local_checkpoint_dir, 2))
    resumed = run_training(config).metrics
    for key in ("source_probe_acc_start", "source_probe_acc", "forgetting"):
        assert resumed[key] == straight[key], key


# -- surgical fine-tuning ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("policy", "trained"),
    [
        ({"type": "surgical", "groups": ["stem", "layer1"]}, ["stem", "layer1", "head"]),
        ({"type": "surgical", "first": 2, "last": 3}, ["layer2", "layer3", "head"]),
        ({"type": "surgical", "first": 0}, ["stem", "head"]),
    ],
)
def test_surgical_trains_exactly_its_groups(tiny_config, policy, trained):
    config = tiny_config(name="surgical", policy=policy, epochs=1)
    model = build_for_config(config)
    plan = config.policy.plan(model, 0)
    assert [g.name for g in plan.trainable_groups()] == trained
    start = model.state_dict()
    end = load_file(run_training(config).weights_file)
    for group in plan.groups:
        for name in group.param_names:
            changed = not torch.equal(end[name], start[name])
            if group.name in trained and name.endswith("weight") and "bn" not in name:
                assert changed, name
            if group.name not in trained:
                assert not changed, name


@pytest.mark.parametrize(
    ("policy", "message"),
    [
        ({"type": "surgical", "groups": ["stem", "layer2"]}, "not one contiguous range"),
        ({"type": "surgical", "groups": ["layer9"]}, "'layer9' is not a backbone group"),
        ({"type": "surgical", "groups": ["head"]}, "'head' is not a backbone group"),
        ({"type": "surgical", "first": 3, "last": 7}, "index 7 is past the model's 5"),
        ({"type": "surgical", "first": 2, "last": 1}, "last=1 is before first=2"),
        ({"type": "surgical"}, "set either groups or first"),
        ({"type": "surgical", "groups": ["stem"], "first": 0}, "set either groups or first"),
    ],
)
def test_bad_surgical_ranges_are_named(policy, message):
    model = timm.create_model("test_resnet", num_classes=2)
    with pytest.raises(PolicyError, match=message):
        from_dict(policy).plan(model, 0)


# -- AdaBN ---------------------------------------------------------------------------


def test_bn_adapt_changes_running_statistics_and_no_parameter():
    model = timm.create_model("test_resnet", num_classes=2)
    plan = from_dict({"type": "head_only", "bn": "adapt"}).plan(model, 0)
    apply(model, plan)
    model.train()
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    batches = [torch.randn(8, 3, 32, 32) * 3 + 1 for _ in range(3)]
    assert adapt_norm_statistics(model, plan, batches) > 0
    for name, param in model.named_parameters():
        assert torch.equal(param, params[name]), name
    means = [n for n in buffers if n.endswith("running_mean")]
    assert all(not torch.equal(model.get_buffer(n), buffers[n]) for n in means)
    # a cumulative average over the 3 batches: the first layer's mean is the inputs' mean
    bn1 = model.bn1
    expected = torch.cat([model.conv1(b) for b in batches]).mean((0, 2, 3))
    assert torch.allclose(bn1.running_mean, expected, atol=1e-3)
    assert bn1.momentum == 0.1 and not bn1.training  # restored, and pinned in eval mode


def test_a_bn_adapt_run_trains_only_the_head_and_keeps_the_feature_cache(tiny_config):
    frozen = tiny_config(name="frozen", policy={"type": "head_only"}, epochs=2)
    adapt = tiny_config(name="adapt", policy={"type": "head_only", "bn": "adapt"}, epochs=2)
    start = build_for_config(frozen).state_dict()
    plain, adapted = run_training(frozen), run_training(adapt)
    weights = load_file(adapted.weights_file)
    for name, tensor in weights.items():
        if name.endswith("running_mean") or name.endswith("running_var"):
            assert not torch.equal(tensor, start[name]), name
        elif not name.startswith("fc.") and not name.endswith("num_batches_tracked"):
            assert torch.equal(tensor, start[name]), name
    assert adapted.history[1]["feature_cache"] == 1  # statistics fixed within the phase
    assert adapted.metrics["trainable_params"] == plain.metrics["trainable_params"]
