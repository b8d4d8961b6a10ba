"""Where the loss pulls, per layer group, from a few batches of gradients: no optimizer
step, the model's weights, buffers and modes as they were.

For each group, from the gradients ``g_b`` of batches ``b = 1..B`` under a plan (the
groups that the plan freezes get no gradient: exactly 0):

- ``grad_norm``: the mean of ``||g_b||``;
- ``rel_grad_norm``: the mean of ``||g_b|| / ||theta||``, the relative gradient norm of
  Lee et al. (ICLR 2023, Auto-RGN), so that groups of different sizes compare;
- ``grad_snr``: the gradient's signal-to-noise ratio across batches (Auto-SNR's idea):
  ``||E g||^2`` over the variance of one batch's gradient around it,
  ``tr Cov(g)``, with ``||E g||^2`` estimated without the bias of a mean of B noisy
  gradients (``||mean g||^2 - tr Cov / B``, floored at 0). High: the batches agree on
  where the group should move; near 0: a batch's gradient is mostly noise.

Norm layers run as the plan sets them (``train`` where their group trains), as in the
first steps of a run under that plan (``plan_modes``); their running statistics are
restored after. ``head_to_backbone`` is the head's relative gradient norm over the
whole backbone's: far above 1 under a random new head.

>>> import timm, torch
>>> from freezelab.policies import from_dict
>>> model = timm.create_model("test_resnet", num_classes=3)
>>> plan = from_dict({"type": "last_n", "n": 1}).plan(model, 0)
>>> batches = [(torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 0])) for _ in range(3)]
>>> stats = gradient_statistics(model, plan, batches)
>>> stats["stem"].grad_norm, stats["head"].grad_norm > 0
(0.0, True)
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from freezelab.policies import FreezePlan, LayerGroup
from freezelab.policies.apply import keeps_statistics
from freezelab.policies.groups import NORM_TYPES, group_of_module


@dataclass(frozen=True)
class GroupGradients:
    grad_norm: float
    rel_grad_norm: float
    grad_snr: float
    weight_norm: float


def gradient_statistics(
    model: nn.Module,
    plan: FreezePlan,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    *,
    label_smoothing: float = 0.0,
) -> dict[str, GroupGradients]:
    """Per-group gradient statistics over ``batches`` (at least 2), by group name."""
    params = dict(model.named_parameters())
    trained = [
        (index, name)
        for index, group in enumerate(plan.groups)
        for name in group.param_names
        if name in plan.trainable_param_names
    ]
    tensors = [params[name] for _, name in trained]
    owner = torch.tensor([index for index, _ in trained], dtype=torch.long)
    count = len(plan.groups)
    sums = [torch.zeros_like(p, dtype=torch.float64) for p in tensors]
    squared_norms = torch.zeros(count, dtype=torch.float64)  # sum over b of ||g_b||^2
    norms = torch.zeros(count, dtype=torch.float64)  # sum over b of ||g_b||
    batches_seen = 0
    with plan_modes(model, plan):
        for images, labels in batches:
            loss = F.cross_entropy(model(images), labels, label_smoothing=label_smoothing)
            grads = torch.autograd.grad(loss, tensors, allow_unused=True)
            with torch.no_grad():
                zero = torch.zeros((), dtype=torch.float64)
                squares = [zero if g is None else g.double().pow(2).sum() for g in grads]
                group_squares = _by_group(squares, owner, count)
                squared_norms += group_squares
                norms += group_squares.sqrt()
                for total, g in zip(sums, grads, strict=True):
                    if g is not None:
                        total += g.double()
            batches_seen += 1
    if batches_seen < 2:
        raise ValueError(f"gradient statistics need at least 2 batches, got {batches_seen}")
    with torch.no_grad():
        mean_energy = _by_group([(s / batches_seen).pow(2).sum() for s in sums], owner, count)
        weight_energy = torch.zeros(count, dtype=torch.float64)
        for group_index, group in enumerate(plan.groups):
            weight_energy[group_index] = sum(
                float(params[n].detach().double().pow(2).sum()) for n in group.param_names
            )
    result = {}
    b = batches_seen
    for index, group in enumerate(plan.groups):
        weight = float(weight_energy[index].sqrt())
        mean_norm = float(norms[index]) / b
        # tr Cov: the unbiased variance of the batch gradients around their mean.
        noise = max((float(squared_norms[index]) - b * float(mean_energy[index])) / (b - 1), 0.0)
        signal = max(float(mean_energy[index]) - noise / b, 0.0)
        result[group.name] = GroupGradients(
            grad_norm=mean_norm,
            rel_grad_norm=mean_norm / weight if weight > 0 else 0.0,
            grad_snr=signal / noise if noise > 0 else 0.0,
            weight_norm=weight,
        )
    return result


def head_to_backbone(groups: Sequence[LayerGroup], stats: dict[str, GroupGradients]) -> float:
    """The head's relative gradient norm over the whole backbone's (its gradient norm
    over its weight norm, all backbone groups together); inf when the backbone gets
    no gradient."""
    backbone = [stats[g.name] for g in groups if not g.is_head]
    head = [stats[g.name] for g in groups if g.is_head]
    grad = math.sqrt(math.fsum(g.grad_norm**2 for g in backbone))
    weight = math.sqrt(math.fsum(g.weight_norm**2 for g in backbone))
    backbone_relative = grad / weight if weight > 0 else 0.0
    head_relative = head[0].rel_grad_norm if head else 0.0
    return head_relative / backbone_relative if backbone_relative > 0 else math.inf


def _by_group(values: list[torch.Tensor], owner: torch.Tensor, count: int) -> torch.Tensor:
    """Per-parameter values summed into their groups."""
    totals = torch.zeros(count, dtype=torch.float64)
    return totals.index_add(0, owner, torch.stack(values)) if values else totals


@contextlib.contextmanager
def plan_modes(model: nn.Module, plan: FreezePlan) -> Iterator[None]:
    """The model in the plan's modes, as in the first steps of a run under it; its
    ``requires_grad`` flags, modes and buffers (BatchNorm's running statistics) restored
    afterwards."""
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    modes = {name: m.training for name, m in model.named_modules()}
    buffers = {name: b.detach().clone() for name, b in model.named_buffers()}
    try:
        for name, p in model.named_parameters():
            p.requires_grad_(name in plan.trainable_param_names)
        model.train()
        for module_name, module in model.named_modules():
            if isinstance(module, NORM_TYPES):
                group = group_of_module(plan.groups, module_name)
                if group is not None and keeps_statistics(plan, group):
                    nn.Module.train(module, False)
        yield
    finally:
        with torch.no_grad():
            for name, b in model.named_buffers():
                b.copy_(buffers[name])
        for name, p in model.named_parameters():
            p.requires_grad_(flags[name])
        for name, m in model.named_modules():
            nn.Module.train(m, modes[name])
