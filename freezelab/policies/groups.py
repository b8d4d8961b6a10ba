"""Layer groups: one ordered view, input to output, over any supported model.

Every parameter belongs to exactly one group; modules without parameters (ReLU,
pooling) are not groups; the classifier is always the last group, ``head``.

The view comes from the backbone's own description where it has one (timm's
``group_matcher``: coarse gives stages, fine gives blocks), from the feature stack
for VGG (whose timm matcher makes every conv and every BatchNorm its own group), and
from the module tree otherwise.

>>> import timm
>>> groups = layer_groups(timm.create_model("test_resnet", num_classes=2), "stage")
>>> [g.name for g in groups]
['stem', 'layer1', 'layer2', 'layer3', 'layer4', 'head']
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch.nn as nn

Unit = Literal["stage", "layer"]
# Normalization layers: their affine parameters are what BitFit's include_norm adds;
# those with running statistics are what BatchNorm handling keeps in eval mode.
NORM_TYPES = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.RMSNorm)
UNITS: tuple[str, ...] = ("stage", "layer")


@dataclass(frozen=True)
class LayerGroup:
    """An ordered slice of the model: its parameter names and their sizes."""

    name: str
    param_names: tuple[str, ...]
    param_sizes: tuple[int, ...]
    is_head: bool = False
    norm_param_names: tuple[str, ...] = ()

    @property
    def num_params(self) -> int:
        return sum(self.param_sizes)


def layer_groups(model: nn.Module, unit: Unit = "stage") -> list[LayerGroup]:
    """The model's layer groups at ``unit`` granularity, input to output, head last."""
    if unit not in UNITS:
        raise ValueError(f"unit must be one of {UNITS}, got {unit!r}")
    sizes = {name: p.numel() for name, p in model.named_parameters()}
    norm_names = {
        f"{module_name}.{n}" if module_name else n
        for module_name, module in model.named_modules()
        if isinstance(module, NORM_TYPES)
        for n, _ in module.named_parameters(recurse=False)
    }
    head_names = _head_param_names(model)
    backbone, prefix = _backbone_of(model)
    backbone_names = [n for n in sizes if n not in head_names]
    local_names = [n[len(prefix) :] for n in backbone_names]

    if _is_vgg(backbone):
        ordered = _vgg_groups(backbone, local_names, unit)
    elif hasattr(backbone, "group_matcher"):
        ordered = _matcher_groups(backbone, local_names, unit)
    else:
        ordered = _module_tree_groups(backbone, local_names, unit)

    groups: list[LayerGroup] = []
    used: set[str] = set()
    for index, (label, names) in enumerate(ordered):
        full = tuple(prefix + n for n in names)
        name = _unique(label or _name_from_prefix(names, index, len(ordered), unit), used)
        groups.append(_group(name, full, sizes, norm_names))
    if head_names:
        ordered_head = tuple(n for n in sizes if n in head_names)
        groups.append(_group(_unique("head", used), ordered_head, sizes, norm_names, is_head=True))
    return groups


def _group(
    name: str, names: tuple[str, ...], sizes: dict[str, int], norm_names: set[str], is_head=False
) -> LayerGroup:
    return LayerGroup(
        name=name,
        param_names=names,
        param_sizes=tuple(sizes[n] for n in names),
        is_head=is_head,
        norm_param_names=tuple(n for n in names if n in norm_names),
    )


def find_group(groups: Sequence[LayerGroup], name: str) -> LayerGroup:
    for g in groups:
        if g.name == name:
            return g
    raise KeyError(f"no layer group {name!r}; groups: {', '.join(g.name for g in groups)}")


def group_of_module(groups: Sequence[LayerGroup], module_name: str) -> LayerGroup | None:
    """The group that holds the parameters of the module called ``module_name``. A
    module without parameters (an affine-free norm, such as the head's ``HeadNorm`` at
    ``fc.0``) belongs to the group of the nearest module above it that has some
    (``fc``), short of the model itself.

    >>> group_of_module([LayerGroup("head", ("fc.1.weight",), (2,), is_head=True)], "fc.0").name
    'head'
    """
    name = module_name
    while True:
        prefix = name + "." if name else ""
        for g in groups:
            if any(n.startswith(prefix) for n in g.param_names):
                return g
        if "." not in name:
            return None
        name = name.rpartition(".")[0]


def _backbone_of(model: nn.Module) -> tuple[nn.Module, str]:
    # A model with a custom head (freezelab's FineTuneModel) keeps the timm model as
    # ``backbone``; group it by the backbone's own description.
    backbone = getattr(model, "backbone", None)
    if isinstance(backbone, nn.Module) and isinstance(getattr(model, "head", None), nn.Module):
        return backbone, "backbone."
    return model, ""


def _head_param_names(model: nn.Module) -> set[str]:
    backbone, _ = _backbone_of(model)
    if backbone is not model:
        return {"head." + n for n, _ in model.head.named_parameters()}
    head: nn.Module | None = None
    if hasattr(model, "get_classifier"):
        classifier = model.get_classifier()
        head = classifier if isinstance(classifier, nn.Module) else None
    if head is None:
        # Without a classifier accessor, the last child with parameters is the head.
        children = [m for m in model.children() if any(True for _ in m.parameters())]
        head = children[-1] if children else None
    if head is None:
        return set()
    ids = {id(p) for p in head.parameters()}
    return {n for n, p in model.named_parameters() if id(p) in ids}


def _is_vgg(model: nn.Module) -> bool:
    features = getattr(model, "features", None)
    return (
        type(model).__name__ == "VGG"
        and isinstance(features, nn.Sequential)
        and any(isinstance(m, nn.MaxPool2d) for m in features)
    )


def _vgg_groups(model: nn.Module, names: list[str], unit: Unit) -> list[tuple[str, list[str]]]:
    # Keras-style names: block1..block5 split at the pooling layers; at unit "layer"
    # each conv with its BatchNorm (vgg*_bn) is one layer, block1.conv1 ... block5.conv3.
    owner: dict[str, str] = {}
    block, conv = 1, 0
    for index, module in enumerate(model.features):
        if isinstance(module, nn.MaxPool2d):
            block, conv = block + 1, 0
            continue
        if isinstance(module, nn.Conv2d):
            conv += 1
        if any(True for _ in module.parameters()):
            owner[str(index)] = f"block{block}" if unit == "stage" else f"block{block}.conv{conv}"
    grouped: dict[str, list[str]] = {}
    rest: list[str] = []
    for n in names:
        match = re.match(r"features\.(\d+)\.", n)
        if match:
            grouped.setdefault(owner[match.group(1)], []).append(n)
        else:
            rest.append(n)
    ordered = list(grouped.items())
    if rest:  # fc6/fc7 of the original classifier (timm's pre_logits)
        ordered.append(("pre_logits", rest))
    return ordered


def _matcher_groups(model: nn.Module, names: list[str], unit: Unit) -> list[tuple[str, list[str]]]:
    from timm.models import group_parameters

    matcher = model.group_matcher(coarse=(unit == "stage"))
    layer_id = group_parameters(model, matcher, reverse=True)
    by_id: dict[int, list[str]] = {}
    for n in names:  # the head's parameters are not in ``names``: it is a group of its own
        by_id.setdefault(layer_id[n], []).append(n)
    return [("", by_id[k]) for k in sorted(by_id)]


def _module_tree_groups(
    model: nn.Module, names: list[str], unit: Unit
) -> list[tuple[str, list[str]]]:
    wanted = set(names)
    if unit == "stage":
        modules: Iterable[tuple[str, nn.Module]] = model.named_children()
    else:
        modules = (
            (n, m)
            for n, m in model.named_modules()
            if any(True for _ in m.parameters(recurse=False))
        )
    ordered: list[tuple[str, list[str]]] = []
    seen: set[str] = set()
    for module_name, module in modules:
        recurse = unit == "stage"
        params = [f"{module_name}.{n}" for n, _ in module.named_parameters(recurse=recurse)]
        params = [p for p in params if p in wanted and p not in seen]
        if params:
            seen.update(params)
            ordered.append((module_name, params))
    direct = [n for n in names if n not in seen]  # parameters owned by the root itself
    if direct:
        ordered.insert(0, ("stem", direct))
    return ordered


def _name_from_prefix(names: Sequence[str], index: int, count: int, unit: Unit) -> str:
    parts = [n.split(".")[:-1] for n in names]
    common: list[str] = []
    for tokens in zip(*parts, strict=False):
        if len(set(tokens)) != 1:
            break
        common.append(tokens[0])
    if index == 0 and not common:
        return "stem"
    # timm merges a trailing norm into the last block's group (ViT's ``norm``,
    # EfficientNet's ``conv_head``): such a group is named after its first module.
    label = _numbered_prefix(common, unit) if common else _numbered_prefix(parts[0], "stage")
    return label or ("neck" if index == count - 1 else f"group{index}")


def _numbered_prefix(tokens: Sequence[str], unit: Unit) -> str:
    """Cut a module path after its numbered part: a stage is "layer1", "stages.0" or
    "blocks.3"; a layer keeps the next index too ("layer1.0", "stages.0.blocks.1")."""
    wanted = 1 if unit == "stage" else 2
    kept: list[str] = []
    for token in tokens:
        kept.append(token)
        wanted -= any(c.isdigit() for c in token)
        if wanted == 0:
            break
    return ".".join(kept)


def _unique(name: str, used: set[str]) -> str:
    candidate, suffix = name, 2
    while candidate in used:
        candidate, suffix = f"{name}_{suffix}", suffix + 1
    used.add(candidate)
    return candidate
