"""Gradient statistics: a frozen group gets exactly 0, and the model is left as it was."""

from __future__ import annotations

import pytest
import timm
import torch

from freezelab.advise.gradient_stats import gradient_statistics, head_to_backbone
from freezelab.policies import from_dict


def _batches(count: int = 3, same_labels: bool = False):
    generator = torch.Generator().manual_seed(0)
    return [
        (
            torch.randn(8, 3, 32, 32, generator=generator),
            torch.arange(8) % 3 if same_labels else torch.randint(0, 3, (8,), generator=generator),
        )
        for _ in range(count)
    ]


def test_a_frozen_group_has_zero_gradient_and_a_trained_one_does_not():
    model = timm.create_model("test_resnet", num_classes=3)
    plan = from_dict({"type": "surgical", "groups": ["layer2"]}).plan(model, 0)
    stats = gradient_statistics(model, plan, _batches())
    for name in ("stem", "layer1", "layer3", "layer4"):
        assert stats[name].grad_norm == 0.0
        assert stats[name].rel_grad_norm == 0.0 and stats[name].grad_snr == 0.0
    assert stats["layer2"].grad_norm > 0 and stats["head"].grad_norm > 0
    assert stats["layer2"].rel_grad_norm == stats["layer2"].grad_norm / stats["layer2"].weight_norm


def test_weights_buffers_flags_and_modes_stay_as_they_were():
    model = timm.create_model("test_resnet", num_classes=3).eval()
    model.layer1.requires_grad_(False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    gradient_statistics(model, from_dict({"type": "full"}).plan(model, 0), _batches())
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # BN statistics included
    assert not model.training and not model.bn1.training
    assert not any(p.requires_grad for p in model.layer1.parameters())
    assert all(p.grad is None for p in model.parameters())


def test_batches_that_agree_have_a_higher_snr_than_random_labels():
    model = timm.create_model("test_resnet", num_classes=3)
    plan = from_dict({"type": "full"}).plan(model, 0)
    images = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    noisy = images + 0.01 * torch.randn_like(images)
    agree = gradient_statistics(
        model, plan, [(images, torch.arange(8) % 3), (noisy, torch.arange(8) % 3)]
    )
    random = gradient_statistics(model, plan, _batches(4))
    assert agree["head"].grad_snr > 10 * random["head"].grad_snr


def test_head_to_backbone_is_the_ratio_of_relative_norms_and_inf_without_backbone_gradient():
    model = timm.create_model("test_resnet", num_classes=3)
    full = from_dict({"type": "full"}).plan(model, 0)
    stats = gradient_statistics(model, full, _batches())
    backbone = [stats[g.name] for g in full.groups if not g.is_head]
    grad = sum(g.grad_norm**2 for g in backbone) ** 0.5
    weight = sum(g.weight_norm**2 for g in backbone) ** 0.5
    expected = stats["head"].rel_grad_norm / (grad / weight)
    assert head_to_backbone(full.groups, stats) == pytest.approx(expected)
    head_only = from_dict({"type": "head_only"}).plan(model, 0)
    frozen = gradient_statistics(model, head_only, _batches())
    assert head_to_backbone(head_only.groups, frozen) == float("inf")
