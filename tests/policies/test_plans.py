"""What each policy trains on VGG16 and ResNet-50, written out by hand.

The expected parameter names below come from the architectures (VGG16's 13 convs at
``features`` indices 0..28, ResNet-50's [3, 4, 6, 3] bottleneck blocks), not from the
code under test.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch

from freezelab.policies import PolicyError, from_dict, load_policy
from freezelab.trainers.models import build_model

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"

# -- VGG16 (timm, 2 classes) ---------------------------------------------------------
VGG_BLOCKS = {
    "block1": [0, 2],
    "block2": [5, 7],
    "block3": [10, 12, 14],
    "block4": [17, 19, 21],
    "block5": [24, 26, 28],
}
VGG_PRE_LOGITS = {
    "pre_logits.fc1.weight",
    "pre_logits.fc1.bias",
    "pre_logits.fc2.weight",
    "pre_logits.fc2.bias",
}
VGG_HEAD = {"head.fc.weight", "head.fc.bias"}


def conv(index: int, prefix: str = "") -> set[str]:
    return {f"{prefix}features.{index}.weight", f"{prefix}features.{index}.bias"}


def vgg_block(name: str) -> set[str]:
    return set().union(*(conv(i) for i in VGG_BLOCKS[name]))


VGG_ALL = set().union(*(vgg_block(b) for b in VGG_BLOCKS)) | VGG_PRE_LOGITS | VGG_HEAD
VGG_STAGES = ["block1", "block2", "block3", "block4", "block5", "pre_logits", "head"]
VGG_LAYERS = [
    "block1.conv1",
    "block1.conv2",
    "block2.conv1",
    "block2.conv2",
    "block3.conv1",
    "block3.conv2",
    "block3.conv3",
    "block4.conv1",
    "block4.conv2",
    "block4.conv3",
    "block5.conv1",
    "block5.conv2",
    "block5.conv3",
    "pre_logits",
    "head",
]

# -- ResNet-50 (timm, 2 classes) -----------------------------------------------------
RESNET_DEPTHS = {1: 3, 2: 4, 3: 6, 4: 3}
RESNET_STEM = {"conv1.weight", "bn1.weight", "bn1.bias"}
RESNET_FC = {"fc.weight", "fc.bias"}
RESNET_STAGES = ["stem", "layer1", "layer2", "layer3", "layer4", "head"]
RESNET_LAYERS = [
    "stem",
    *(f"layer{i}.{j}" for i, depth in RESNET_DEPTHS.items() for j in range(depth)),
    "head",
]


def bottleneck(layer: int, index: int, kinds=("weight", "bias")) -> set[str]:
    """A bottleneck block's parameters; ``kinds`` picks conv weights / norm weights / biases."""
    prefix = f"layer{layer}.{index}."
    names = set()
    norms = ["bn1", "bn2", "bn3"] + (["downsample.1"] if index == 0 else [])
    convs = ["conv1", "conv2", "conv3"] + (["downsample.0"] if index == 0 else [])
    if "weight" in kinds:
        names |= {prefix + c + ".weight" for c in convs}
    if "norm_weight" in kinds or "weight" in kinds:
        names |= {prefix + n + ".weight" for n in norms}
    if "bias" in kinds:
        names |= {prefix + n + ".bias" for n in norms}
    return names


def resnet_layer(layer: int) -> set[str]:
    return set().union(*(bottleneck(layer, j) for j in range(RESNET_DEPTHS[layer])))


RESNET_ALL = RESNET_STEM | set().union(*(resnet_layer(i) for i in (1, 2, 3, 4))) | RESNET_FC


@pytest.fixture(scope="module")
def vgg16():
    return timm.create_model("vgg16", num_classes=2)


@pytest.fixture(scope="module")
def resnet50():
    return timm.create_model("resnet50", num_classes=2)


@pytest.fixture(scope="module")
def keras_vgg16():
    return build_model("vgg16", 2, head={"pool": "flatten", "hidden": [256]})


def plan_of(policy: dict, model, epoch: int = 0):
    return from_dict(policy).plan(model, epoch)


def trainable_group_names(plan) -> list[str]:
    return [g.name for g in plan.trainable_groups()]


def test_hand_written_names_match_the_models(vgg16, resnet50):
    assert VGG_ALL == {n for n, _ in vgg16.named_parameters()}
    assert RESNET_ALL == {n for n, _ in resnet50.named_parameters()}
    assert len(RESNET_ALL) == 161


# -- full, head_only ----------------------------------------------------------------


def test_full(vgg16, resnet50):
    plan = plan_of({"type": "full"}, vgg16)
    assert plan.trainable_param_names == VGG_ALL
    assert trainable_group_names(plan) == VGG_STAGES
    assert plan.lr_mult == dict.fromkeys(VGG_STAGES, 1.0)
    assert plan.bn == dict.fromkeys(VGG_STAGES, "train")
    assert plan.phase == "main"
    assert plan.trainable_params == plan.total_params == 134_268_738

    plan = plan_of({"type": "full", "unit": "layer"}, resnet50)
    assert plan.trainable_param_names == RESNET_ALL
    assert trainable_group_names(plan) == RESNET_LAYERS


def test_head_only(vgg16, resnet50):
    plan = plan_of({"type": "head_only"}, vgg16)
    assert plan.trainable_param_names == VGG_HEAD
    assert trainable_group_names(plan) == ["head"]
    assert plan.trainable_params == 4096 * 2 + 2

    plan = plan_of({"type": "head_only"}, resnet50)
    assert plan.trainable_param_names == RESNET_FC
    assert plan.bn == {
        "stem": "eval",
        "layer1": "eval",
        "layer2": "eval",
        "layer3": "eval",
        "layer4": "eval",
        "head": "train",
    }
    assert plan.trainable_params == 2048 * 2 + 2


# -- last_n ---------------------------------------------------------------------------


def test_last_n_stage(vgg16, resnet50):
    plan = plan_of({"type": "last_n", "n": 2}, vgg16)
    assert trainable_group_names(plan) == ["block5", "pre_logits", "head"]
    assert plan.trainable_param_names == vgg_block("block5") | VGG_PRE_LOGITS | VGG_HEAD

    plan = plan_of({"type": "last_n", "n": 1}, resnet50)
    assert trainable_group_names(plan) == ["layer4", "head"]
    assert plan.trainable_param_names == resnet_layer(4) | RESNET_FC
    assert plan.bn == {
        "stem": "eval",
        "layer1": "eval",
        "layer2": "eval",
        "layer3": "eval",
        "layer4": "train",
        "head": "train",
    }

    plan = plan_of({"type": "last_n", "n": 6}, vgg16)  # every backbone group
    assert plan.trainable_param_names == VGG_ALL


def test_last_n_layer(vgg16, resnet50):
    plan = plan_of({"type": "last_n", "n": 3, "unit": "layer"}, vgg16)
    assert trainable_group_names(plan) == ["block5.conv2", "block5.conv3", "pre_logits", "head"]
    assert plan.trainable_param_names == conv(26) | conv(28) | VGG_PRE_LOGITS | VGG_HEAD

    plan = plan_of({"type": "last_n", "n": 2, "unit": "layer"}, resnet50)
    assert trainable_group_names(plan) == ["layer4.1", "layer4.2", "head"]
    assert plan.trainable_param_names == bottleneck(4, 1) | bottleneck(4, 2) | RESNET_FC


def test_keras_recipe_on_the_keras_model(keras_vgg16):
    # The question's Keras recipe: VGG16 without top, Flatten, Dense(256), Dense(2);
    # ``for layer in model.layers[:-5]: layer.trainable = False``.
    policy = load_policy(EXAMPLES / "policies" / "vgg16_keras_last5.yaml")
    plan = policy.plan(keras_vgg16, 0)
    assert plan.trainable_param_names == {
        "backbone.features.24.weight",
        "backbone.features.24.bias",
        "backbone.features.26.weight",
        "backbone.features.26.bias",
        "backbone.features.28.weight",
        "backbone.features.28.bias",
        "head.0.weight",
        "head.0.bias",
        "head.2.weight",
        "head.2.bias",
    }
    assert trainable_group_names(plan) == ["block5.conv1", "block5.conv2", "block5.conv3", "head"]
    block5 = 3 * (512 * 512 * 3 * 3 + 512)
    head = (512 * 7 * 7 * 256 + 256) + (256 * 2 + 2)
    assert plan.trainable_params == block5 + head
    frozen = [g.name for g in plan.groups if not plan.group_is_trainable(g)]
    assert frozen == VGG_LAYERS[:10]
    assert all(plan.bn[name] == "eval" for name in frozen)


# -- patterns -------------------------------------------------------------------------


def test_patterns_glob(resnet50, vgg16):
    plan = plan_of({"type": "patterns", "include": ["layer4.*"]}, resnet50)
    assert plan.trainable_param_names == resnet_layer(4) | RESNET_FC

    plan = plan_of({"type": "patterns", "include": ["features.2[468].*"]}, vgg16)
    assert plan.trainable_param_names == vgg_block("block5") | VGG_HEAD

    plan = plan_of(
        {"type": "patterns", "include": ["features.2[468].*"], "with_head": False}, vgg16
    )
    assert plan.trainable_param_names == vgg_block("block5")
    assert plan.bn["head"] == "eval"


def test_patterns_glob_exclude(resnet50):
    plan = plan_of(
        {"type": "patterns", "include": ["layer4.*"], "exclude": ["*.bn?.*", "*.downsample.1.*"]},
        resnet50,
    )
    layer4_convs = {
        "layer4.0.conv1.weight",
        "layer4.0.conv2.weight",
        "layer4.0.conv3.weight",
        "layer4.0.downsample.0.weight",
        "layer4.1.conv1.weight",
        "layer4.1.conv2.weight",
        "layer4.1.conv3.weight",
        "layer4.2.conv1.weight",
        "layer4.2.conv2.weight",
        "layer4.2.conv3.weight",
    }
    assert plan.trainable_param_names == layer4_convs | RESNET_FC


def test_patterns_regex(resnet50, vgg16):
    plan = plan_of(
        {
            "type": "patterns",
            "syntax": "regex",
            "include": [r"^layer3\.[45]\."],
            "exclude": [r"\.bias$"],
        },
        resnet50,
    )
    expected = {
        f"layer3.{j}.{m}.weight"
        for j in (4, 5)
        for m in ("conv1", "bn1", "conv2", "bn2", "conv3", "bn3")
    }
    assert len(expected) == 12
    assert plan.trainable_param_names == expected | RESNET_FC
    assert trainable_group_names(plan) == ["layer3", "head"]

    plan = plan_of(
        {"type": "patterns", "syntax": "regex", "include": [r"features\.(24|26)\.weight"]}, vgg16
    )
    assert plan.trainable_param_names == {
        "features.24.weight",
        "features.26.weight",
        "head.fc.weight",
        "head.fc.bias",
    }


def test_patterns_regex_is_a_search_not_a_full_match(resnet50):
    plan = plan_of(
        {"type": "patterns", "syntax": "regex", "include": ["downsample"], "with_head": False},
        resnet50,
    )
    assert plan.trainable_param_names == {
        f"layer{i}.0.downsample.{k}"
        for i in (1, 2, 3, 4)
        for k in ("0.weight", "1.weight", "1.bias")
    }


def test_patterns_mode_freeze(resnet50):
    plan = plan_of(
        {
            "type": "patterns",
            "mode": "freeze",
            "include": ["conv1.*", "bn1.*", "layer1.*", "layer2.*"],
        },
        resnet50,
    )
    assert plan.trainable_param_names == resnet_layer(3) | resnet_layer(4) | RESNET_FC
    assert trainable_group_names(plan) == ["layer3", "layer4", "head"]

    # Freeze every norm layer (regex): the convolutions and the head train.
    plan = plan_of(
        {
            "type": "patterns",
            "mode": "freeze",
            "syntax": "regex",
            "include": [r"bn\d|downsample\.1"],
        },
        resnet50,
    )
    convs = {"conv1.weight"} | {
        name
        for i, depth in RESNET_DEPTHS.items()
        for j in range(depth)
        for name in bottleneck(i, j)
        if ".conv" in name or "downsample.0" in name
    }
    assert plan.trainable_param_names == convs | RESNET_FC


# -- gradual --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("epoch", "phase", "groups"),
    [
        (0, "unfrozen_0", ["head"]),
        (1, "unfrozen_0", ["head"]),
        (2, "unfrozen_1", ["pre_logits", "head"]),
        (3, "unfrozen_1", ["pre_logits", "head"]),
        (4, "unfrozen_2", ["block5", "pre_logits", "head"]),
        (10, "unfrozen_5", ["block2", "block3", "block4", "block5", "pre_logits", "head"]),
        (12, "unfrozen_6", VGG_STAGES),
        (1000, "unfrozen_6", VGG_STAGES),
    ],
)
def test_gradual_every_k(vgg16, epoch, phase, groups):
    plan = plan_of({"type": "gradual", "every": 2}, vgg16, epoch)
    assert plan.phase == phase
    assert trainable_group_names(plan) == groups
    expected = {
        "head": VGG_HEAD,
        "pre_logits": VGG_PRE_LOGITS,
        **{b: vgg_block(b) for b in VGG_BLOCKS},
    }
    assert plan.trainable_param_names == set().union(*(expected[g] for g in groups))


def test_gradual_every_k_layers(resnet50):
    plan = plan_of({"type": "gradual", "every": 3, "unit": "layer"}, resnet50, epoch=9)
    assert trainable_group_names(plan) == ["layer4.0", "layer4.1", "layer4.2", "head"]
    assert plan.trainable_param_names == resnet_layer(4) | RESNET_FC
    plan = plan_of({"type": "gradual", "every": 3, "unit": "layer"}, resnet50, epoch=11)
    assert trainable_group_names(plan) == ["layer4.0", "layer4.1", "layer4.2", "head"]
    plan = plan_of({"type": "gradual", "every": 3, "unit": "layer"}, resnet50, epoch=12)
    assert trainable_group_names(plan) == ["layer3.5", "layer4.0", "layer4.1", "layer4.2", "head"]


@pytest.mark.parametrize(
    ("epoch", "phase", "groups"),
    [
        (0, "step_1", ["head"]),
        (1, "step_1", ["head"]),
        (2, "step_2", ["layer4", "head"]),
        (4, "step_2", ["layer4", "head"]),
        (5, "step_3", ["layer2", "layer3", "layer4", "head"]),
        (50, "step_3", ["layer2", "layer3", "layer4", "head"]),
    ],
)
def test_gradual_schedule(resnet50, epoch, phase, groups):
    policy = {"type": "gradual", "schedule": {0: ["head"], 2: ["layer4"], 5: ["layer3", "layer2"]}}
    plan = plan_of(policy, resnet50, epoch)
    assert plan.phase == phase
    assert trainable_group_names(plan) == groups
    expected = {"head": RESNET_FC, **{f"layer{i}": resnet_layer(i) for i in (1, 2, 3, 4)}}
    assert plan.trainable_param_names == set().union(*(expected[g] for g in groups))
    assert from_dict(policy).num_epochs_hint() == 5


def test_gradual_schedule_at_unit_layer(vgg16):
    policy = {"type": "gradual", "unit": "layer", "schedule": {0: ["head", "block5.conv3"]}}
    plan = plan_of(policy, vgg16, 3)
    assert plan.trainable_param_names == conv(28) | VGG_HEAD


# -- lp_ft ----------------------------------------------------------------------------


@pytest.mark.parametrize("epoch", [0, 1])
def test_lp_ft_probe(resnet50, epoch):
    policy = {"type": "lp_ft", "probe_epochs": 2, "ft_lr_factor": 0.1, "head_lr_mult": 10.0}
    plan = plan_of(policy, resnet50, epoch)
    assert plan.phase == "probe"
    assert plan.trainable_param_names == RESNET_FC
    assert plan.lr_mult["head"] == pytest.approx(10.0)
    assert plan.lr_mult["layer4"] == pytest.approx(1.0)
    assert plan.bn["layer4"] == "eval"


@pytest.mark.parametrize("epoch", [2, 3, 40])
def test_lp_ft_finetune(resnet50, epoch):
    policy = {"type": "lp_ft", "probe_epochs": 2, "ft_lr_factor": 0.1, "head_lr_mult": 10.0}
    plan = plan_of(policy, resnet50, epoch)
    assert plan.phase == "finetune"
    assert plan.trainable_param_names == RESNET_ALL
    assert plan.lr_mult == pytest.approx(
        {"stem": 0.1, "layer1": 0.1, "layer2": 0.1, "layer3": 0.1, "layer4": 0.1, "head": 1.0}
    )
    assert set(plan.bn.values()) == {"train"}


def test_lp_ft_factor_combines_with_lr_decay(vgg16):
    policy = {"type": "lp_ft", "probe_epochs": 1, "ft_lr_factor": 0.5, "lr_decay": 0.5}
    plan = plan_of(policy, vgg16, 1)
    assert plan.lr_mult == pytest.approx(
        {
            "block1": 0.5**6 * 0.5,
            "block2": 0.5**5 * 0.5,
            "block3": 0.5**4 * 0.5,
            "block4": 0.5**3 * 0.5,
            "block5": 0.5**2 * 0.5,
            "pre_logits": 0.5 * 0.5,
            "head": 0.5,
        }
    )


# -- bitfit ---------------------------------------------------------------------------


def test_bitfit_resnet50(resnet50):
    plan = plan_of({"type": "bitfit"}, resnet50)
    # ResNet convolutions have no bias: only the BatchNorm biases and the head train.
    biases = {"bn1.bias"} | {
        name
        for i, depth in RESNET_DEPTHS.items()
        for j in range(depth)
        for name in bottleneck(i, j, kinds=("bias",))
    }
    assert len(biases) == 1 + 3 * 16 + 4
    assert all(name.endswith(".bias") for name in biases)
    assert plan.trainable_param_names == biases | RESNET_FC
    assert trainable_group_names(plan) == RESNET_STAGES


def test_bitfit_resnet50_with_norm(resnet50):
    plan = plan_of({"type": "bitfit", "include_norm": True}, resnet50)
    norms = {"bn1.weight", "bn1.bias"} | {
        name
        for i, depth in RESNET_DEPTHS.items()
        for j in range(depth)
        for name in bottleneck(i, j, kinds=("norm_weight", "bias"))
    }
    assert len(norms) == 2 * (1 + 3 * 16 + 4)
    assert plan.trainable_param_names == norms | RESNET_FC
    assert not any(".conv" in n or n == "conv1.weight" for n in plan.trainable_param_names)


def test_bitfit_vgg16(vgg16):
    plan = plan_of({"type": "bitfit", "include_norm": True}, vgg16)  # VGG16 has no norms
    convs = [0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28]
    assert plan.trainable_param_names == (
        {f"features.{i}.bias" for i in convs}
        | {"pre_logits.fc1.bias", "pre_logits.fc2.bias"}
        | VGG_HEAD
    )


# -- progressive_freeze ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("epoch", "phase", "groups"),
    [
        (0, "train_all", RESNET_STAGES),
        (1, "frozen_1", ["layer1", "layer2", "layer3", "layer4", "head"]),
        (2, "frozen_1", ["layer1", "layer2", "layer3", "layer4", "head"]),
        (3, "frozen_2", ["layer2", "layer3", "layer4", "head"]),
        (5, "frozen_3", ["layer3", "layer4", "head"]),
        (7, "frozen_4", ["layer4", "head"]),
        (9, "frozen_4", ["layer4", "head"]),
        (100, "frozen_4", ["layer4", "head"]),
    ],
)
def test_progressive_freeze_keep(resnet50, epoch, phase, groups):
    policy = {"type": "progressive_freeze", "start": 1, "every": 2, "keep": 1}
    plan = plan_of(policy, resnet50, epoch)
    assert plan.phase == phase
    assert trainable_group_names(plan) == groups
    expected = {"stem": RESNET_STEM, "head": RESNET_FC}
    expected |= {f"layer{i}": resnet_layer(i) for i in (1, 2, 3, 4)}
    assert plan.trainable_param_names == set().union(*(expected[g] for g in groups))
    frozen = [name for name in RESNET_STAGES if name not in groups]
    assert [name for name, mode in plan.bn.items() if mode == "eval"] == frozen


def test_progressive_freeze_defaults_down_to_the_head(vgg16):
    policy = {"type": "progressive_freeze", "unit": "layer"}  # start 1, every 1, keep 0
    assert trainable_group_names(plan_of(policy, vgg16, 0)) == VGG_LAYERS
    assert trainable_group_names(plan_of(policy, vgg16, 1)) == VGG_LAYERS[1:]
    assert trainable_group_names(plan_of(policy, vgg16, 13)) == ["pre_logits", "head"]
    plan = plan_of(policy, vgg16, 14)
    assert plan.trainable_param_names == VGG_HEAD
    assert plan.phase == "frozen_14"
    assert plan_of(policy, vgg16, 99).trainable_param_names == VGG_HEAD


# -- learning-rate multipliers and BatchNorm modes --------------------------------------


def test_lr_decay_by_depth(vgg16):
    plan = plan_of({"type": "full", "lr_decay": 0.5, "head_lr_mult": 10.0}, vgg16)
    assert plan.lr_mult == pytest.approx(
        {
            "block1": 0.015625,
            "block2": 0.03125,
            "block3": 0.0625,
            "block4": 0.125,
            "block5": 0.25,
            "pre_logits": 0.5,
            "head": 10.0,
        }
    )


def test_lr_decay_at_unit_layer(resnet50):
    plan = plan_of({"type": "last_n", "n": 2, "unit": "layer", "lr_decay": 0.9}, resnet50)
    assert list(plan.lr_mult) == RESNET_LAYERS
    assert plan.lr_mult["head"] == 1.0
    assert plan.lr_mult["layer4.2"] == pytest.approx(0.9)
    assert plan.lr_mult["layer4.1"] == pytest.approx(0.81)
    assert plan.lr_mult["layer1.0"] == pytest.approx(0.9**16)
    assert plan.lr_mult["stem"] == pytest.approx(0.9**17)


def test_bn_modes(resnet50):
    plan = plan_of({"type": "last_n", "n": 1, "bn": "train"}, resnet50)
    assert set(plan.bn.values()) == {"train"}
    plan = plan_of({"type": "full", "bn": "eval"}, resnet50)
    assert set(plan.bn.values()) == {"eval"}
    assert plan.trainable_param_names == RESNET_ALL


# -- purity ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "policy",
    [
        {"type": "last_n", "n": 2, "unit": "layer"},
        {"type": "bitfit", "include_norm": True},
        {"type": "gradual", "every": 1},
    ],
)
def test_plan_is_pure(resnet50, policy):
    frozen_by_hand = {"layer2.0.conv1.weight", "fc.bias"}
    for name, param in resnet50.named_parameters():
        param.requires_grad_(name not in frozen_by_hand)
    resnet50.eval()
    before = {k: v.clone() for k, v in resnet50.state_dict().items()}
    try:
        first = plan_of(policy, resnet50, 3)
        second = plan_of(policy, resnet50, 3)
        assert first == second
        assert {n for n, p in resnet50.named_parameters() if not p.requires_grad} == frozen_by_hand
        assert not any(m.training for m in resnet50.modules())
        assert all(torch.equal(before[k], v) for k, v in resnet50.state_dict().items())
        assert not any("train" in vars(m) for m in resnet50.modules())  # nothing pinned
    finally:
        for param in resnet50.parameters():
            param.requires_grad_(True)
        resnet50.train()


# -- validation against the model ------------------------------------------------------


def test_last_n_larger_than_the_model(vgg16, resnet50):
    with pytest.raises(PolicyError, match=r"n=7 is larger than the model's 6 backbone groups"):
        plan_of({"type": "last_n", "n": 7}, vgg16)
    with pytest.raises(PolicyError, match=r"n=15 is larger than the model's 14 backbone groups"):
        plan_of({"type": "last_n", "n": 15, "unit": "layer"}, vgg16)
    with pytest.raises(PolicyError, match=r"n=6 is larger .* 5 backbone groups at unit 'stage'"):
        plan_of({"type": "last_n", "n": 6}, resnet50)


def test_pattern_that_matches_nothing(resnet50):
    with pytest.raises(PolicyError, match=r"include pattern 'layer5\.\*' \(glob\) matches no"):
        plan_of({"type": "patterns", "include": ["layer4.*", "layer5.*"]}, resnet50)
    with pytest.raises(PolicyError, match=r"exclude pattern 'block5' \(regex\) matches no"):
        plan_of(
            {"type": "patterns", "syntax": "regex", "include": ["layer4"], "exclude": ["block5"]},
            resnet50,
        )
    # A glob is anchored: "layer4" alone names no parameter.
    with pytest.raises(PolicyError, match="include pattern 'layer4'"):
        plan_of({"type": "patterns", "include": ["layer4"]}, resnet50)


def test_gradual_schedule_names_unknown_group(resnet50):
    policy = {"type": "gradual", "schedule": {0: ["head"], 3: ["block5"]}}
    with pytest.raises(PolicyError, match=r"schedule epoch 3 names group 'block5'"):
        plan_of(policy, resnet50, 0)
    # A stage name is not a layer group.
    policy = {"type": "gradual", "unit": "layer", "schedule": {0: ["head", "layer4"]}}
    with pytest.raises(PolicyError, match=r"names group 'layer4'.*at unit 'layer'"):
        plan_of(policy, resnet50, 0)


def test_empty_trainable_set(resnet50):
    with pytest.raises(PolicyError, match=r"'patterns' leaves no trainable parameter at epoch 0"):
        plan_of({"type": "patterns", "mode": "freeze", "include": ["*"]}, resnet50)
    with pytest.raises(PolicyError, match=r"'gradual' leaves no trainable parameter at epoch 1"):
        plan_of({"type": "gradual", "schedule": {2: ["head"]}}, resnet50, 1)
    assert plan_of({"type": "gradual", "schedule": {2: ["head"]}}, resnet50, 2)


def test_progressive_freeze_keep_larger_than_the_model(resnet50):
    with pytest.raises(PolicyError, match=r"keep=6 is larger than the model's 5 backbone groups"):
        plan_of({"type": "progressive_freeze", "keep": 6}, resnet50)


def test_negative_epoch(resnet50):
    with pytest.raises(PolicyError, match="epoch must be >= 0"):
        plan_of({"type": "full"}, resnet50, -1)
