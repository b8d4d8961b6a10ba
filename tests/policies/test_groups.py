"""Layer groups: one ordered partition of every model's parameters, head last."""

from __future__ import annotations

from collections import Counter

import pytest
import timm
import torch
import torch.nn as nn

from freezelab.policies import find_group, layer_groups
from freezelab.trainers.models import build_model

TIMM_MODELS = [
    "vgg16",
    "vgg16_bn",
    "resnet50",
    "convnext_tiny",
    "vit_tiny_patch16_224",
    "efficientnet_b0",
    "test_resnet",
    "test_vit",
    "test_convnext",
    "test_efficientnet",
]
UNITS = ["stage", "layer"]

# VGG16's 13 convolutions in torchvision/timm ``features`` indices, Keras names.
VGG16_STAGES = ["block1", "block2", "block3", "block4", "block5", "pre_logits", "head"]
VGG16_CONVS = {
    "block1.conv1": 0,
    "block1.conv2": 2,
    "block2.conv1": 5,
    "block2.conv2": 7,
    "block3.conv1": 10,
    "block3.conv2": 12,
    "block3.conv3": 14,
    "block4.conv1": 17,
    "block4.conv2": 19,
    "block4.conv3": 21,
    "block5.conv1": 24,
    "block5.conv2": 26,
    "block5.conv3": 28,
}


@pytest.fixture(scope="module")
def create():
    """``create(name)``: a timm model with 2 classes, built once for this module."""
    cache: dict[str, nn.Module] = {}

    def get(name: str) -> nn.Module:
        if name not in cache:
            cache[name] = timm.create_model(name, num_classes=2)
        return cache[name]

    yield get
    cache.clear()


@pytest.fixture(scope="module", params=TIMM_MODELS)
def timm_model(request, create):
    return request.param, create(request.param)


@pytest.fixture(scope="module")
def keras_vgg16():
    return build_model("vgg16", 2, head={"pool": "flatten", "hidden": [256]})


def _names(groups):
    return [g.name for g in groups]


@pytest.mark.parametrize("unit", UNITS)
def test_every_parameter_in_exactly_one_group(timm_model, unit):
    _, model = timm_model
    groups = layer_groups(model, unit)
    counts = Counter(n for g in groups for n in g.param_names)
    assert set(counts) == {n for n, _ in model.named_parameters()}
    assert [n for n, c in counts.items() if c > 1] == []


@pytest.mark.parametrize("unit", UNITS)
def test_groups_follow_named_parameters_order(timm_model, unit):
    _, model = timm_model
    groups = layer_groups(model, unit)
    # Concatenated in group order, the names are exactly named_parameters() order: each
    # group is one contiguous slice, and the groups run input to output.
    assert [n for g in groups for n in g.param_names] == [n for n, _ in model.named_parameters()]


@pytest.mark.parametrize("unit", UNITS)
def test_groups_are_nonempty_unique_and_sized(timm_model, unit):
    _, model = timm_model
    groups = layer_groups(model, unit)
    params = dict(model.named_parameters())
    assert all(g.param_names for g in groups)
    assert len(set(_names(groups))) == len(groups)
    for g in groups:
        assert g.param_sizes == tuple(params[n].numel() for n in g.param_names)
    assert sum(g.num_params for g in groups) == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("unit", UNITS)
def test_head_is_last_and_is_the_classifier(timm_model, unit):
    _, model = timm_model
    groups = layer_groups(model, unit)
    classifier_ids = {id(p) for p in model.get_classifier().parameters()}
    classifier_names = tuple(n for n, p in model.named_parameters() if id(p) in classifier_ids)
    assert groups[-1].name == "head"
    assert groups[-1].is_head
    assert [g.is_head for g in groups[:-1]] == [False] * (len(groups) - 1)
    assert groups[-1].param_names == classifier_names
    assert len(classifier_names) == 2  # weight and bias of one Linear


def test_layer_groups_are_finer_than_stage_groups(timm_model):
    # Every layer group lies inside one stage group.
    _, model = timm_model
    stage_of = {n: g.name for g in layer_groups(model, "stage") for n in g.param_names}
    for group in layer_groups(model, "layer"):
        assert len({stage_of[n] for n in group.param_names}) == 1, group.name


def test_vgg16_stage_groups_are_keras_blocks(create):
    model = create("vgg16")
    groups = layer_groups(model, "stage")
    assert _names(groups) == VGG16_STAGES
    block5 = find_group(groups, "block5")
    assert block5.param_names == (
        "features.24.weight",
        "features.24.bias",
        "features.26.weight",
        "features.26.bias",
        "features.28.weight",
        "features.28.bias",
    )
    assert find_group(groups, "block1").param_names == (
        "features.0.weight",
        "features.0.bias",
        "features.2.weight",
        "features.2.bias",
    )
    assert find_group(groups, "pre_logits").param_names == (
        "pre_logits.fc1.weight",
        "pre_logits.fc1.bias",
        "pre_logits.fc2.weight",
        "pre_logits.fc2.bias",
    )
    assert find_group(groups, "head").param_names == ("head.fc.weight", "head.fc.bias")

    layers = layer_groups(model, "layer")
    assert _names(layers) == [*VGG16_CONVS, "pre_logits", "head"]
    for name, index in VGG16_CONVS.items():
        assert find_group(layers, name).param_names == (
            f"features.{index}.weight",
            f"features.{index}.bias",
        )


def test_vgg16_bn_layer_group_is_conv_with_its_batchnorm(create):
    model = create("vgg16_bn")
    layers = layer_groups(model, "layer")
    assert _names(layers) == [*VGG16_CONVS, "pre_logits", "head"]
    conv1 = find_group(layers, "block1.conv1")
    assert conv1.param_names == (
        "features.0.weight",
        "features.0.bias",
        "features.1.weight",
        "features.1.bias",
    )
    assert conv1.norm_param_names == ("features.1.weight", "features.1.bias")
    assert find_group(layers, "block5.conv3").param_names == (
        "features.40.weight",
        "features.40.bias",
        "features.41.weight",
        "features.41.bias",
    )
    stages = layer_groups(model, "stage")
    assert _names(stages) == VGG16_STAGES


def test_resnet50_groups(create):
    model = create("resnet50")
    stages = layer_groups(model, "stage")
    assert _names(stages) == ["stem", "layer1", "layer2", "layer3", "layer4", "head"]
    stem = find_group(stages, "stem")
    assert stem.param_names == ("conv1.weight", "bn1.weight", "bn1.bias")
    assert stem.norm_param_names == ("bn1.weight", "bn1.bias")
    assert all(n.startswith("layer4.") for n in find_group(stages, "layer4").param_names)
    assert find_group(stages, "head").param_names == ("fc.weight", "fc.bias")

    layers = layer_groups(model, "layer")
    depths = {1: 3, 2: 4, 3: 6, 4: 3}
    blocks = [f"layer{i}.{j}" for i, depth in depths.items() for j in range(depth)]
    assert _names(layers) == ["stem", *blocks, "head"]
    assert find_group(layers, "layer2.0").param_names == tuple(
        f"layer2.0.{m}.{p}"
        for m, ps in (
            ("conv1", ["weight"]),
            ("bn1", ["weight", "bias"]),
            ("conv2", ["weight"]),
            ("bn2", ["weight", "bias"]),
            ("conv3", ["weight"]),
            ("bn3", ["weight", "bias"]),
            ("downsample.0", ["weight"]),
            ("downsample.1", ["weight", "bias"]),
        )
        for p in ps
    )


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("test_resnet", ["stem", "layer1", "layer2", "layer3", "layer4", "head"]),
        ("efficientnet_b0", ["stem", *(f"blocks.{i}" for i in range(7)), "head"]),
        ("vit_tiny_patch16_224", ["stem", *(f"blocks.{i}" for i in range(12)), "head"]),
        ("convnext_tiny", ["stem", *(f"stages.{i}" for i in range(4)), "head.norm", "head"]),
    ],
)
def test_timm_stage_group_names(create, name, expected):
    model = create(name)
    assert _names(layer_groups(model, "stage")) == expected


def test_vit_final_norm_joins_the_last_block(create):
    model = create("test_vit")
    last = layer_groups(model, "stage")[-2]
    assert last.param_names[-2:] == ("norm.weight", "norm.bias")
    assert last.norm_param_names[-2:] == ("norm.weight", "norm.bias")
    stem = layer_groups(model, "stage")[0]
    assert set(stem.param_names) == {
        "cls_token",
        "pos_embed",
        "patch_embed.proj.weight",
        "patch_embed.proj.bias",
    }


def test_custom_head_vgg16_layer_groups(keras_vgg16):
    groups = layer_groups(keras_vgg16, "layer")
    assert _names(groups) == [*VGG16_CONVS, "head"]
    for name, index in VGG16_CONVS.items():
        assert find_group(groups, name).param_names == (
            f"backbone.features.{index}.weight",
            f"backbone.features.{index}.bias",
        )
    head = groups[-1]
    assert head.is_head
    assert head.param_names == ("head.0.weight", "head.0.bias", "head.2.weight", "head.2.bias")
    assert head.param_sizes == (512 * 7 * 7 * 256, 256, 256 * 2, 2)
    assert [n for g in groups for n in g.param_names] == [
        n for n, _ in keras_vgg16.named_parameters()
    ]


def test_custom_head_vgg16_stage_groups(keras_vgg16):
    # The flatten head replaces VGG's fc6/fc7 (pre_logits): no such group remains.
    groups = layer_groups(keras_vgg16, "stage")
    assert _names(groups) == ["block1", "block2", "block3", "block4", "block5", "head"]


def test_custom_head_on_a_timm_matcher_model():
    model = build_model("test_resnet", 3, head={"pool": "avg", "hidden": [8]})
    groups = layer_groups(model, "stage")
    assert _names(groups) == ["stem", "layer1", "layer2", "layer3", "layer4", "head"]
    assert groups[-1].param_names == (
        "head.0.weight",
        "head.0.bias",
        "head.2.weight",
        "head.2.bias",
    )
    assert all(n.startswith("backbone.") for g in groups[:-1] for n in g.param_names)
    assert [n for g in groups for n in g.param_names] == [n for n, _ in model.named_parameters()]


class Plain(nn.Module):
    """No group_matcher, no get_classifier: the module tree decides."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(1))
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.act = nn.ReLU()
        self.body = nn.Sequential(nn.Conv2d(4, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        x = self.body(self.act(self.bn(self.conv(x))) * self.scale)
        return self.fc(self.pool(x).flatten(1))


def test_plain_module_fallback_stage():
    groups = layer_groups(Plain(), "stage")
    assert [(g.name, g.param_names, g.is_head) for g in groups] == [
        ("stem", ("scale",), False),
        ("conv", ("conv.weight", "conv.bias"), False),
        ("bn", ("bn.weight", "bn.bias"), False),
        ("body", ("body.0.weight", "body.0.bias", "body.2.weight", "body.2.bias"), False),
        ("head", ("fc.weight", "fc.bias"), True),
    ]
    assert find_group(groups, "bn").norm_param_names == ("bn.weight", "bn.bias")


def test_plain_module_fallback_layer():
    groups = layer_groups(Plain(), "layer")
    assert [(g.name, g.param_names) for g in groups] == [
        ("stem", ("scale",)),
        ("conv", ("conv.weight", "conv.bias")),
        ("bn", ("bn.weight", "bn.bias")),
        ("body.0", ("body.0.weight", "body.0.bias")),
        ("body.2", ("body.2.weight", "body.2.bias")),
        ("head", ("fc.weight", "fc.bias")),
    ]


def test_plain_sequential_fallback():
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.Flatten(), nn.Linear(4, 2)
    )
    groups = layer_groups(model, "stage")
    assert [(g.name, g.param_names) for g in groups] == [
        ("0", ("0.weight", "0.bias")),
        ("2", ("2.weight", "2.bias")),
        ("head", ("4.weight", "4.bias")),
    ]


def test_unknown_unit_raises():
    with pytest.raises(ValueError, match="unit must be one of"):
        layer_groups(Plain(), "block")  # type: ignore[arg-type]


def test_find_group_names_the_groups_it_has():
    groups = layer_groups(Plain(), "stage")
    with pytest.raises(KeyError, match="no layer group 'layer9'.*stem, conv, bn, body, head"):
        find_group(groups, "layer9")
