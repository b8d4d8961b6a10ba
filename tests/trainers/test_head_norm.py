"""``model.head_norm: batchnorm``: an affine-free BatchNorm before the classifier, part of
the head for the policies, the loop, the weights files and the logged model."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from freezelab.policies import apply, from_dict
from freezelab.policies.groups import layer_groups
from freezelab.trainers import model_file
from freezelab.trainers.launch import run_training
from freezelab.trainers.models import HeadNorm, build_for_config, build_model

HEADS = [
    ("test_resnet", None),
    ("test_vit", None),
    ("test_convnext", None),
    ("test_efficientnet", None),
    ("test_resnet", {"pool": "avg", "hidden": [8]}),
]


def _norms(model: nn.Module) -> list[HeadNorm]:
    return [m for m in model.get_classifier().modules() if isinstance(m, HeadNorm)]


@pytest.mark.parametrize(("name", "head"), HEADS, ids=lambda v: str(v))
def test_the_head_starts_with_an_affine_free_batchnorm_and_no_extra_parameter(name, head):
    torch.manual_seed(0)
    plain = build_model(name, 3, head=head)
    torch.manual_seed(0)
    normed = build_model(name, 3, head=head, head_norm="batchnorm")
    (norm,) = _norms(normed)
    assert isinstance(norm, nn.BatchNorm1d) and not norm.affine
    assert list(norm.parameters()) == []
    assert next(iter(normed.get_classifier().children())) is norm  # the head's input
    # The same parameters, initialized alike: only the buffers are new.
    plain_params = [p for _, p in plain.named_parameters()]
    normed_params = [p for _, p in normed.named_parameters()]
    assert len(plain_params) == len(normed_params)
    assert all(torch.equal(a, b) for a, b in zip(plain_params, normed_params, strict=True))
    size = 160 if name == "test_vit" else 64
    x = torch.randn(4, 3, size, size)
    assert normed(x).shape == (4, 3)


def test_vgg16_classifier_takes_the_norm():
    model = build_model("vgg16", 3, head_norm="batchnorm")
    classifier = model.get_classifier()
    assert classifier is model.head.fc
    assert isinstance(classifier[0], HeadNorm) and classifier[0].num_features == 4096
    assert [n for n, _ in model.named_parameters()][-2:] == ["head.fc.1.weight", "head.fc.1.bias"]


def test_normalizes_by_the_batch_in_training_and_by_running_stats_in_eval():
    norm = HeadNorm(4)
    x = torch.randn(64, 4) * 50 + 30
    out = norm.train()(x)
    torch.testing.assert_close(out.mean(0), torch.zeros(4), atol=1e-4, rtol=0)
    assert norm.running_mean.abs().sum() > 0
    # A batch of one (an epoch's last) has no variance: running statistics instead.
    assert torch.isfinite(norm.train()(x[:1])).all()
    norm.eval()
    torch.testing.assert_close(norm(x[:3]), torch.cat([norm(x[i : i + 1]) for i in range(3)]))


def test_the_head_group_holds_it_and_it_trains_whenever_the_head_does():
    model = build_model("test_resnet", 3, head_norm="batchnorm")
    head = [g for g in layer_groups(model) if g.is_head]
    assert [g.param_names for g in head] == [("fc.1.weight", "fc.1.bias")]
    # head_only: the backbone's BatchNorm is pinned in eval mode, the head norm is not;
    # bn: eval pins every norm, but not one in a head that trains.
    for policy in ({"type": "head_only"}, {"type": "full", "bn": "eval"}):
        apply(model, from_dict(policy).plan(model, 0))
        model.train()
        assert not model.bn1.training and model.fc[0].training, policy
    # A head that does not train keeps its statistics like any frozen layer.
    plan = from_dict({"type": "head_only"}).plan(model, 0)
    frozen = replace(plan, trainable_param_names=frozenset(), bn={**plan.bn, "head": "eval"})
    apply(model, frozen)
    model.train()
    assert not model.fc[0].training


@pytest.mark.parametrize("cached", [True, False], ids=["feature_cache", "recomputed"])
def test_head_only_trains_the_head_behind_the_norm(tiny_config, cached):
    config = tiny_config(
        name=f"norm-{cached}",
        model={"name": "test_resnet", "head_norm": "batchnorm"},
        policy={"type": "head_only"},
        performance={"feature_cache": cached},
    )
    outcome = run_training(config, progress=False)
    assert outcome.metrics["feature_cache"] == int(cached)
    start = build_for_config(config).state_dict()
    end = load_file(outcome.weights_file)
    assert not torch.equal(end["fc.1.weight"], start["fc.1.weight"])
    assert not torch.equal(end["fc.0.running_var"], start["fc.0.running_var"])
    assert torch.equal(end["layer1.0.conv1.weight"], start["layer1.0.conv1.weight"])
    assert torch.equal(end["bn1.running_mean"], start["bn1.running_mean"])
    assert outcome.metrics["trainable_params"] == 3 * 96 + 3


def test_weights_saved_without_the_norm_load_with_a_new_head(tmp_path):
    source = build_model("test_resnet", 3)
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    torch.manual_seed(7)
    fresh = build_model("test_resnet", 3, head_norm="batchnorm")
    torch.manual_seed(7)
    loaded = build_model("test_resnet", 3, head_norm="batchnorm", weights=path)
    source_state, loaded_state = source.state_dict(), loaded.state_dict()
    for key, value in loaded_state.items():
        if key.startswith("fc."):
            # A classifier fitted to raw features does not fit normalized ones: new head.
            assert torch.equal(value, fresh.state_dict()[key]), key
        else:
            assert torch.equal(value, source_state[key]), key


def test_the_logged_model_rebuilds_with_its_norm(tmp_path):
    model = build_model("test_resnet", 3, head_norm="batchnorm", image_size=32)
    with torch.no_grad():
        model.fc[0].running_mean.uniform_(-1, 1)
    spec = model_file.spec_of("test_resnet", 3, head_norm="batchnorm", image_size=32)
    model_file.attach_spec(model.eval(), spec)
    path = tmp_path / "model.pth"
    torch.save(model, path, pickle_module=model_file)
    loaded = torch.load(path, pickle_module=model_file, weights_only=False)
    assert isinstance(loaded.fc[0], HeadNorm)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    # A model logged before head_norm existed has no key for it, and no norm.
    old = {k: v for k, v in spec.items() if k != "head_norm"}
    plain = build_model("test_resnet", 3, image_size=32).state_dict()
    assert isinstance(model_file.rebuild(old, plain).fc, nn.Linear)


def test_a_tracked_run_logs_a_model_that_loads_with_its_norm(tiny_config, tmp_path):
    import mlflow

    from freezelab.api import train
    from freezelab.mlflow.tracking import tracking_uri_set

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    config = tiny_config(
        name="logged",
        epochs=1,
        model={"name": "test_resnet", "head_norm": "batchnorm"},
        policy={"type": "head_only"},
        mlflow={"enabled": True, "tracking_uri": uri, "experiment": "tests"},
    )
    tracked = train(config)
    with tracking_uri_set(uri):
        loaded = mlflow.pytorch.load_model(tracked.model_uri)
    assert isinstance(loaded.fc[0], HeadNorm)
    saved = load_file(tracked.outcome.weights_file)
    assert torch.equal(loaded.fc[0].running_mean, saved["fc.0.running_mean"])
