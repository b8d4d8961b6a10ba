"""Each backbone group's pooled output, from the policies' own groups."""

from __future__ import annotations

import pytest
import torch

from freezelab.advise.features import entry_modules, group_outputs, pooled
from freezelab.policies import layer_groups
from freezelab.trainers.feature_cache import classifier_inputs
from freezelab.trainers.models import build_model


@pytest.mark.parametrize(
    "name, head", [("test_resnet", None), ("test_vit", None), ("test_resnet", {"pool": "flatten"})]
)
def test_every_backbone_group_has_an_output_and_the_last_is_the_heads_input(name, head):
    model = build_model(name, 3, head=head).eval()
    groups = layer_groups(model)
    size = 32 if "resnet" in name else model.patch_embed.img_size[0]
    images = torch.randn(2, 3, size, size)
    outputs = group_outputs(model, groups, images)
    assert list(outputs) == [g.name for g in groups if not g.is_head]
    assert all(f.ndim == 2 and f.shape[0] == 2 for f in outputs.values())
    last = list(outputs.values())[-1]
    assert torch.allclose(last, classifier_inputs(model, images).flatten(1))


def test_a_groups_output_is_the_next_groups_input():
    model = build_model("test_resnet", 3).eval()
    entries = entry_modules(model, layer_groups(model))
    assert entries["stem"] is model.layer1 and entries["layer3"] is model.layer4
    images = torch.randn(2, 3, 32, 32)
    x = model.maxpool(model.act1(model.bn1(model.conv1(images))))
    assert torch.allclose(group_outputs(model, layer_groups(model), images)["stem"], pooled(x))


def test_feature_maps_and_tokens_are_averaged():
    assert torch.equal(pooled(torch.ones(2, 3, 4, 4) * 2), torch.full((2, 3), 2.0))
    tokens = torch.arange(12.0).reshape(1, 3, 4)
    assert torch.equal(pooled(tokens), tokens.mean(1))
