"""The pooled output of every backbone layer group, from one forward pass.

The output of group ``i`` is what the next group receives: a forward pre-hook on the
entry module of group ``i + 1`` (the outermost module that holds only that group's
parameters), and for the last backbone group the classifier's input, the features
that ``head_only`` trains on (as ``classifier_inputs``). The groups are the policies'
own (``layer_groups``), so a signal per group maps onto ``last_n`` and ``surgical``.
Feature maps ``[N, C, H, W]`` are averaged over space, tokens ``[N, T, C]`` over
tokens.

>>> import timm, torch
>>> from freezelab.policies import layer_groups
>>> model = timm.create_model("test_resnet", num_classes=3).eval()
>>> outputs = group_outputs(model, layer_groups(model), torch.zeros(2, 3, 32, 32))
>>> {name: tuple(f.shape) for name, f in outputs.items()}["layer4"]
(2, 96)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn

from freezelab.policies import LayerGroup
from freezelab.trainers.feature_cache import classifier_of


def entry_modules(model: nn.Module, groups: Sequence[LayerGroup]) -> dict[str, nn.Module]:
    """For each backbone group, the module whose input is that group's output."""
    backbone = [g for g in groups if not g.is_head]
    entries: dict[str, nn.Module] = {}
    for group, following in zip(backbone, backbone[1:], strict=False):
        module = _entry_of(model, following)
        if module is not None:
            entries[group.name] = module
    if backbone:
        entries[backbone[-1].name] = classifier_of(model)
    return entries


def _entry_of(model: nn.Module, group: LayerGroup) -> nn.Module | None:
    """The outermost module around the group's first parameter that holds parameters
    of this group only (None when the root itself owns that parameter)."""
    owned = set(group.param_names)
    first = group.param_names[0]
    path = first.split(".")[:-1]
    found = None
    for depth in range(len(path), 0, -1):
        prefix = ".".join(path[:depth])
        module = model.get_submodule(prefix)
        names = {f"{prefix}.{n}" for n, _ in module.named_parameters()}
        if not names <= owned:
            break
        found = module
    return found


def pooled(tensor: torch.Tensor) -> torch.Tensor:
    """A ``[N, features]`` matrix: spatial mean of feature maps, mean over tokens."""
    if tensor.ndim == 4:
        return tensor.mean(dim=(2, 3))
    if tensor.ndim == 3:
        return tensor.mean(dim=1)
    return tensor.flatten(1)


@torch.no_grad()
def group_outputs(
    model: nn.Module, groups: Sequence[LayerGroup], images: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Each backbone group's pooled output for ``images``, input to output. The model
    runs as it is (call ``model.eval()`` for fixed statistics); the head never runs."""
    entries = entry_modules(model, groups)
    classifier = classifier_of(model)
    captured: dict[str, torch.Tensor] = {}
    handles = []
    for name, module in entries.items():
        handles.append(
            module.register_forward_pre_hook(_capture(name, captured, module is classifier))
        )
    try:
        model(images)
    except _Captured:
        pass
    finally:
        for handle in handles:
            handle.remove()
    missing = [name for name in entries if name not in captured]
    if missing:
        raise RuntimeError(f"the forward pass never reached the entry of: {', '.join(missing)}")
    return {name: captured[name] for name in entries}


def _capture(name: str, captured: dict[str, torch.Tensor], last: bool):
    def hook(_module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        if name not in captured:  # a module called twice: its first input
            captured[name] = pooled(args[0]).float()
        if last:
            raise _Captured  # the classifier's input is all the head would add

    return hook


class _Captured(Exception):
    """Stops the forward pass at the classifier."""
