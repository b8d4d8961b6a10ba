"""What a candidate policy trains over a run, and what a step of it costs, from its
plans alone: nothing trains.

- ``group_share``: per layer group, the share of its parameters that train, averaged
  over the run's epochs (1.0 for a group that trains throughout, 0.5 for one that
  unfreezes halfway);
- ``backbone_at_start``: the share of the backbone's parameters that train in the
  first epoch, while the head is still new;
- ``trainable_share``: trainable parameters over all, averaged over the epochs;
- ``flops_per_step``: the FLOPs of one training step (forward and backward of a batch)
  under each epoch's plan, averaged over the epochs, counted by torch's
  ``FlopCounterMode`` as the loop counts them (a frozen layer's weight gradient is
  never computed). Without the frozen-feature cache: it is the step a plan needs.

>>> from freezelab.policies import from_dict
>>> import timm
>>> model = timm.create_model("test_resnet", num_classes=3)
>>> profile = policy_profile(model, from_dict({"type": "lp_ft", "probe_epochs": 1}), 2, (4, 3, 32, 32))
>>> profile.group_share["stem"], profile.backbone_at_start
(0.5, 0.0)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from freezelab.policies import FreezePlan, FreezePolicy, apply


@dataclass(frozen=True)
class PolicyProfile:
    group_share: dict[str, float]
    backbone_at_start: float
    trainable_share: float
    flops_per_step: float


def step_flops(model: nn.Module, plan: FreezePlan, batch_shape: tuple[int, ...]) -> int:
    """FLOPs of one training step of a batch of ``batch_shape`` under ``plan``. On a
    model on the meta device it costs no compute (shapes only). The plan's
    ``requires_grad`` flags stay applied."""
    apply(model, plan)
    device = next(model.parameters()).device
    images = torch.zeros(batch_shape, device=device)
    with FlopCounterMode(display=False) as counter:
        logits = model(images)
        labels = torch.zeros(batch_shape[0], dtype=torch.long, device=device)
        F.cross_entropy(logits, labels).backward()
    model.zero_grad(set_to_none=True)
    return int(counter.get_total_flops())


def policy_profile(
    model: nn.Module,
    policy: FreezePolicy,
    epochs: int,
    batch_shape: tuple[int, ...],
    flops_cache: dict[frozenset[str], int] | None = None,
) -> PolicyProfile:
    """The profile of ``policy`` over ``epochs`` epochs; ``flops_cache`` (by trainable
    set) saves counting a plan that another candidate has too."""
    cache = {} if flops_cache is None else flops_cache
    shares: dict[str, float] = {}
    trainable = 0.0
    flops = 0.0
    at_start = 0.0
    for epoch in range(epochs):
        plan = policy.plan(model, epoch)
        for group in plan.groups:
            part = plan.trainable_params_of(group) / max(group.num_params, 1)
            shares[group.name] = shares.get(group.name, 0.0) + part / epochs
        trainable += plan.trainable_params / plan.total_params / epochs
        key = plan.trainable_param_names
        if key not in cache:
            cache[key] = step_flops(model, plan, batch_shape)
        flops += cache[key] / epochs
        if epoch == 0:
            backbone = [g for g in plan.groups if not g.is_head]
            total = sum(g.num_params for g in backbone)
            at_start = sum(plan.trainable_params_of(g) for g in backbone) / max(total, 1)
    return PolicyProfile(shares, at_start, trainable, flops)
