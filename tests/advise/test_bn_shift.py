"""The BatchNorm shift: about 0 on the data the running statistics came from, growing
with a shift of the input, per group; None without BatchNorm."""

from __future__ import annotations

import pytest
import timm
import torch

from freezelab.advise.bn_shift import group_shifts, target_statistics
from freezelab.policies import layer_groups


def _shifts(model, images):
    with target_statistics(model) as moments, torch.no_grad():
        for batch in images.split(64):
            model(batch)
    return group_shifts(model, layer_groups(model), moments)


@pytest.fixture(scope="module")
def source():
    """A model whose running statistics are those of ``images`` (its source data)."""
    torch.manual_seed(0)
    model = timm.create_model("test_resnet", num_classes=3, zero_init_last=False)
    images = torch.rand(128, 3, 32, 32) * 0.5 + 0.25
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.reset_running_stats()
            module.momentum = None  # one batch of everything: exactly its statistics
    model.train()
    with torch.no_grad():
        model(images)
    return model.eval(), images


def test_the_source_data_has_no_shift_and_a_scaled_input_a_growing_one(source):
    model, images = source
    same, double, quadruple = (_shifts(model, images * s) for s in (1, 2, 4))
    backbone = [g.name for g in layer_groups(model) if not g.is_head]
    for name in backbone:
        assert same[name].mean_shift < 0.02 and same[name].log_var_ratio < 0.05, same[name]
        assert 0.5 < double[name].mean_shift < quadruple[name].mean_shift, name
        assert 0.5 < double[name].log_var_ratio < quadruple[name].log_var_ratio, name
    assert same["head"] is None


def test_an_offset_input_moves_the_mean_from_the_sources(source):
    model, images = source
    offset = _shifts(model, images + 0.5)["stem"]
    assert offset.mean_shift > 1.0 > _shifts(model, images)["stem"].mean_shift


def test_the_model_and_its_statistics_are_left_as_they_were(source):
    model, images = source
    before = {k: v.clone() for k, v in model.state_dict().items()}
    _shifts(model, images * 3)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not any(m._forward_pre_hooks for m in model.modules())


def test_a_model_without_batchnorm_has_none_per_group():
    model = timm.create_model("test_vit", num_classes=3).eval()
    size = model.patch_embed.img_size[0]
    shifts = _shifts(model, torch.rand(4, 3, size, size))
    assert set(shifts) == {g.name for g in layer_groups(model)}
    assert all(shift is None for shift in shifts.values())
