"""Applying a plan: requires_grad per parameter, and BatchNorm modes that survive train()."""

from __future__ import annotations

import copy
import pickle

import pytest
import timm
import torch
import torch.nn as nn

from freezelab.policies import apply, from_dict, is_pinned_eval
from freezelab.trainers.models import build_model

# test_resnet's BatchNorm layers, by stage group (from the timm definition: a deep stem
# conv1.{0,3,6} with norms conv1.1 and conv1.4, then bn1; one block per stage).
STEM_BNS = ["conv1.1", "conv1.4", "bn1"]
LAYER4_BNS = ["layer4.0.bn1", "layer4.0.bn2", "layer4.0.downsample.2"]
LAYER1_BNS = ["layer1.0.bn1", "layer1.0.bn2"]


@pytest.fixture
def resnet():
    torch.manual_seed(0)
    return timm.create_model("test_resnet", num_classes=2)


BatchNorm = nn.modules.batchnorm._BatchNorm


def bns(model: nn.Module) -> dict[str, BatchNorm]:
    return {name: m for name, m in model.named_modules() if isinstance(m, BatchNorm)}


def stats(model: nn.Module, name: str) -> tuple[torch.Tensor, ...]:
    bn = bns(model)[name]
    return (bn.running_mean.clone(), bn.running_var.clone(), bn.num_batches_tracked.clone())


def stats_equal(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def train_forward(model: nn.Module) -> None:
    model.train()
    with torch.no_grad():
        model(torch.randn(4, 3, 32, 32))


def test_the_test_model_has_the_batchnorms_named_above(resnet):
    names = set(bns(resnet))
    assert {*STEM_BNS, *LAYER1_BNS, *LAYER4_BNS} <= names


@pytest.mark.parametrize(
    "policy",
    [
        {"type": "full"},
        {"type": "head_only"},
        {"type": "last_n", "n": 2},
        {"type": "bitfit", "include_norm": True},
        {"type": "patterns", "include": ["layer3.*"], "exclude": ["*.bias"]},
        {"type": "progressive_freeze", "keep": 1},
    ],
)
def test_requires_grad_is_exactly_the_plan(resnet, policy):
    # Start from the opposite of every decision, so apply must set both ways.
    plan = from_dict(policy).plan(resnet, 2)
    for name, param in resnet.named_parameters():
        param.requires_grad_(name not in plan.trainable_param_names)
    apply(resnet, plan)
    trainable = {n for n, p in resnet.named_parameters() if p.requires_grad}
    assert trainable == plan.trainable_param_names


def test_frozen_parameters_get_no_gradient(resnet):
    plan = from_dict({"type": "last_n", "n": 1}).plan(resnet, 0)
    apply(resnet, plan)
    resnet(torch.randn(2, 3, 32, 32)).sum().backward()
    with_grad = {n for n, p in resnet.named_parameters() if p.grad is not None}
    assert with_grad == plan.trainable_param_names
    assert all(n.startswith(("layer4.", "fc.")) for n in with_grad)


def test_frozen_batchnorm_stays_in_eval_and_keeps_its_statistics(resnet):
    apply(resnet, from_dict({"type": "last_n", "n": 1}).plan(resnet, 0))
    resnet.train()
    modules = bns(resnet)
    assert [modules[n].training for n in STEM_BNS + LAYER1_BNS] == [False] * 5
    assert all(is_pinned_eval(modules[n]) for n in STEM_BNS + LAYER1_BNS)
    assert [modules[n].training for n in LAYER4_BNS] == [True] * 3
    assert not any(is_pinned_eval(modules[n]) for n in LAYER4_BNS)
    assert resnet.training and resnet.layer1.training  # containers follow train()

    frozen_before = stats(resnet, "layer1.0.bn1")
    trained_before = stats(resnet, "layer4.0.bn1")
    train_forward(resnet)
    assert stats_equal(stats(resnet, "layer1.0.bn1"), frozen_before)
    assert not stats_equal(stats(resnet, "layer4.0.bn1"), trained_before)

    # eval() and train() again: still pinned
    resnet.eval()
    resnet.train()
    assert not modules["bn1"].training


def test_later_plan_that_trains_a_group_unpins_it(resnet):
    apply(resnet, from_dict({"type": "head_only"}).plan(resnet, 0))
    resnet.train()
    assert not any(m.training for m in bns(resnet).values())

    apply(resnet, from_dict({"type": "last_n", "n": 1}).plan(resnet, 0))
    modules = bns(resnet)
    assert all(modules[n].training for n in LAYER4_BNS)  # apply restores the model's mode
    assert not any(modules[n].training for n in STEM_BNS)

    apply(resnet, from_dict({"type": "full"}).plan(resnet, 0))
    resnet.train()
    assert all(m.training for m in bns(resnet).values())
    assert not any(is_pinned_eval(m) for m in resnet.modules())
    before = stats(resnet, "bn1")
    train_forward(resnet)
    assert not stats_equal(stats(resnet, "bn1"), before)


def test_apply_keeps_an_eval_model_in_eval(resnet):
    resnet.eval()
    apply(resnet, from_dict({"type": "last_n", "n": 1}).plan(resnet, 0))
    assert not any(m.training for m in resnet.modules())


def test_bn_train_keeps_frozen_batchnorm_updating(resnet):
    apply(resnet, from_dict({"type": "head_only", "bn": "train"}).plan(resnet, 0))
    resnet.train()
    assert all(m.training for m in bns(resnet).values())
    assert not any(p.requires_grad for n, p in resnet.named_parameters() if "bn" in n)
    before = stats(resnet, "layer1.0.bn1")
    train_forward(resnet)
    assert not stats_equal(stats(resnet, "layer1.0.bn1"), before)


def test_bn_eval_pins_every_batchnorm(resnet):
    plan = from_dict({"type": "full", "bn": "eval"}).plan(resnet, 0)
    apply(resnet, plan)
    resnet.train()
    assert all(p.requires_grad for p in resnet.parameters())
    assert not any(m.training for m in bns(resnet).values())
    assert all(is_pinned_eval(m) for m in bns(resnet).values())
    before = {name: stats(resnet, name) for name in bns(resnet)}
    train_forward(resnet)
    assert all(stats_equal(stats(resnet, name), s) for name, s in before.items())


def test_custom_head_model_pins_backbone_batchnorm():
    model = build_model("test_resnet", 2, head={"pool": "avg", "hidden": [8], "dropout": 0.5})
    apply(model, from_dict({"type": "head_only"}).plan(model, 0))
    model.train()
    assert not model.backbone.bn1.training
    assert not model.backbone.layer4[0].bn1.training
    assert model.head.training  # Dropout in the head still trains
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        "head.0.weight",
        "head.0.bias",
        "head.3.weight",
        "head.3.bias",
    }


def test_pinning_survives_copy_and_pickle(resnet):
    apply(resnet, from_dict({"type": "last_n", "n": 1}).plan(resnet, 0))
    # An in-memory round trip of our own object (what multiprocessing does to a model).
    for clone in (copy.deepcopy(resnet), pickle.loads(pickle.dumps(resnet))):
        clone.train()
        assert not clone.bn1.training
        assert clone.layer4[0].bn1.training
        # The pin belongs to the clone, not to the original module.
        apply(clone, from_dict({"type": "full"}).plan(clone, 0))
        clone.train()
        assert clone.bn1.training
        resnet.train()
        assert not resnet.bn1.training


def test_plan_of_another_model_raises(resnet):
    vit = timm.create_model("test_vit", num_classes=2)
    plan = from_dict({"type": "full"}).plan(vit, 0)
    with pytest.raises(ValueError, match="plan does not belong to this model"):
        apply(resnet, plan)
    assert all(p.requires_grad for p in resnet.parameters())  # nothing half-applied

    custom = build_model("test_resnet", 2, head={"pool": "avg"})
    plan = from_dict({"type": "head_only"}).plan(custom, 0)
    with pytest.raises(ValueError, match="plan does not belong to this model"):
        apply(resnet, plan)
