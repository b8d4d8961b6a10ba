"""How far the target's statistics are from the source's, at every BatchNorm layer.

A pretrained BatchNorm holds the source's running mean ``mu_s`` and variance ``var_s``
of its input, per channel. The target sample, run through the model in eval mode (the
running statistics stay as they are; every layer normalizes with the source's), gives
the mean ``mu_t`` and variance ``var_t`` of the same input. Per layer, averaged over
channels:

- ``mean_shift``: ``|mu_t - mu_s| / sqrt(var_s + eps)``, the standardized mean shift
  (0: the source's mean; 1: a pretrained standard deviation away);
- ``log_var_ratio``: ``|log((var_t + eps) / (var_s + eps))|`` (0: the source's spread;
  log 4 = 1.39: twice or half the standard deviation).

A layer group's shift is the mean over its BatchNorm layers; a group without one (and
the head, whose norm is new) has None. Large shifts in the early groups say the input
differs (a new domain): the frozen statistics normalize it wrongly, and training those
groups, or their BatchNorm, is what adapts them.

>>> import timm, torch
>>> from freezelab.policies import layer_groups
>>> model = timm.create_model("test_resnet", num_classes=3).eval()
>>> images = torch.rand(8, 3, 32, 32)
>>> with target_statistics(model) as moments:
...     _ = model(images)
>>> shifts = group_shifts(model, layer_groups(model), moments)
>>> shifts["stem"].mean_shift > 0, shifts["head"]
(True, None)
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn as nn

from freezelab.policies import LayerGroup
from freezelab.policies.groups import group_of_module


@dataclass(frozen=True)
class BatchNormShift:
    mean_shift: float
    log_var_ratio: float


class _Moments:
    """Per-channel sums of a layer's input over every forward pass, in float64."""

    def __init__(self) -> None:
        self.count = 0
        self.total: torch.Tensor | None = None
        self.squares: torch.Tensor | None = None

    def add(self, x: torch.Tensor) -> None:
        channels = x.detach().double().transpose(0, 1).reshape(x.shape[1], -1)
        total, squares = channels.sum(1), channels.pow(2).sum(1)
        if self.total is None:
            self.total, self.squares = total, squares
        else:
            self.total += total
            self.squares += squares
        self.count += channels.shape[1]

    def mean_and_variance(self) -> tuple[torch.Tensor, torch.Tensor]:
        mean = self.total / self.count
        return mean, (self.squares / self.count - mean.pow(2)).clamp_min(0.0)


def batchnorm_layers(model: nn.Module) -> dict[str, nn.modules.batchnorm._BatchNorm]:
    """The BatchNorm layers that hold running statistics, by module name."""
    return {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, nn.modules.batchnorm._BatchNorm)
        and module.track_running_stats
        and module.running_mean is not None
    }


@contextlib.contextmanager
def target_statistics(model: nn.Module) -> Iterator[dict[str, _Moments]]:
    """Records the input moments of every BatchNorm layer over the forward passes run
    inside the block (run the model in eval mode: in train mode BatchNorm would move
    its running statistics towards the target's)."""
    moments = {name: _Moments() for name in batchnorm_layers(model)}
    handles = [
        module.register_forward_pre_hook(lambda _m, args, found=moments[name]: found.add(args[0]))
        for name, module in batchnorm_layers(model).items()
    ]
    try:
        yield moments
    finally:
        for handle in handles:
            handle.remove()


def layer_shifts(model: nn.Module, moments: dict[str, _Moments]) -> dict[str, BatchNormShift]:
    """Each BatchNorm layer's shift, for the layers that saw an input."""
    shifts = {}
    for name, layer in batchnorm_layers(model).items():
        found = moments.get(name)
        if found is None or found.count == 0:
            continue
        mean, variance = found.mean_and_variance()
        source_mean = layer.running_mean.detach().double()
        source_variance = layer.running_var.detach().double() + layer.eps
        shifts[name] = BatchNormShift(
            mean_shift=float(((mean - source_mean).abs() / source_variance.sqrt()).mean()),
            log_var_ratio=float(((variance + layer.eps) / source_variance).log().abs().mean()),
        )
    return shifts


def group_shifts(
    model: nn.Module, groups: Sequence[LayerGroup], moments: dict[str, _Moments]
) -> dict[str, BatchNormShift | None]:
    """The mean shift of each group's BatchNorm layers; None for a group without one
    and for the head (its norm, if any, holds no source statistics)."""
    by_group: dict[str, list[BatchNormShift]] = {g.name: [] for g in groups}
    for name, shift in layer_shifts(model, moments).items():
        group = group_of_module(groups, name)
        if group is not None and not group.is_head:
            by_group[group.name].append(shift)
    return {
        name: None
        if not found
        else BatchNormShift(
            mean_shift=math.fsum(s.mean_shift for s in found) / len(found),
            log_var_ratio=math.fsum(s.log_var_ratio for s in found) / len(found),
        )
        for name, found in by_group.items()
    }
