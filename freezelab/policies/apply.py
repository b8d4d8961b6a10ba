"""Apply a plan to a model: ``requires_grad`` per parameter, and the norm layers' modes.

>>> import timm
>>> from freezelab.policies import apply, from_dict
>>> model = timm.create_model("test_resnet", num_classes=2)
>>> plan = from_dict({"type": "head_only"}).plan(model, epoch=0)
>>> apply(model, plan)
>>> model.train().bn1.training  # frozen BatchNorm stays in eval mode
False
"""

from __future__ import annotations

import functools
from collections.abc import Iterable

import torch
import torch.nn as nn

from freezelab.policies.base import FreezePlan
from freezelab.policies.groups import LayerGroup, group_of_module

_STAT_NORMS = (nn.modules.batchnorm._NormBase,)
# Plan modes whose norm layers keep fixed statistics while the phase trains.
FIXED_STATISTICS = ("eval", "adapt")


def apply(model: nn.Module, plan: FreezePlan) -> None:
    """Set ``requires_grad`` from the plan and pin norm layers of eval-mode groups.

    A pinned norm layer stays in eval mode (fixed running statistics) when
    ``model.train()`` is called again; a later plan that trains it unpins it.
    """
    known = {n for g in plan.groups for n in g.param_names}
    names = {n for n, _ in model.named_parameters()}
    if known != names:
        raise ValueError(
            "plan does not belong to this model: "
            f"{len(names - known)} parameters of the model are not in the plan, "
            f"{len(known - names)} parameters of the plan are not in the model"
        )
    for name, param in model.named_parameters():
        param.requires_grad_(name in plan.trainable_param_names)
    for module_name, module in model.named_modules():
        if not isinstance(module, _STAT_NORMS):
            continue
        group = group_of_module(plan.groups, module_name)
        _pin_eval(module, group is not None and keeps_statistics(plan, group))
    model.train(model.training)


def keeps_statistics(plan: FreezePlan, group: LayerGroup) -> bool:
    """Whether the norm layers of ``group`` keep fixed statistics in this plan (eval
    mode). A norm inside a head that trains never does, whatever ``bn`` says: it
    normalizes the features for the classifier that learns behind it (``head_norm``),
    and with its initial statistics (0 and 1) it would do nothing at all."""
    if group.is_head and plan.group_is_trainable(group):
        return False
    return plan.bn[group.name] in FIXED_STATISTICS


@torch.no_grad()
def adapt_norm_statistics(
    model: nn.Module, plan: FreezePlan, batches: Iterable[torch.Tensor]
) -> int:
    """AdaBN: the norm layers of the plan's ``adapt`` groups re-estimate their running
    statistics from ``batches`` (inputs of the target's training data), as a cumulative
    average over all of them; nothing else changes (no parameter, no other layer's
    statistics). Returns how many layers were adapted; they stay pinned in eval mode.
    """
    adapted = [
        module
        for module_name, module in model.named_modules()
        if isinstance(module, _STAT_NORMS)
        and (group := group_of_module(plan.groups, module_name)) is not None
        and plan.bn[group.name] == "adapt"
        and module.track_running_stats
    ]
    if not adapted:
        return 0
    was_training = model.training
    model.eval()  # every other layer as at inference: dropout off, other statistics fixed
    momenta = [module.momentum for module in adapted]
    for module in adapted:
        module.reset_running_stats()
        module.momentum = None  # a cumulative average over every batch
        nn.Module.train(module, True)
    try:
        for inputs in batches:
            model(inputs)
    finally:
        for module, momentum in zip(adapted, momenta, strict=True):
            module.momentum = momentum
            nn.Module.train(module, False)
        model.train(was_training)
    return len(adapted)


def is_pinned_eval(module: nn.Module) -> bool:
    return "train" in module.__dict__


def _pin_eval(module: nn.Module, pinned: bool) -> None:
    if pinned:
        # An instance-level ``train`` shadows nn.Module.train, which the parent's
        # ``train()`` calls for every child: the layer stays in eval mode. A partial of
        # a module-level function, unlike a bound method, survives pickling.
        module.train = functools.partial(_stay_in_eval, module)
        nn.Module.train(module, False)
    elif is_pinned_eval(module):
        del module.train


def _stay_in_eval(self: nn.Module, mode: bool = True) -> nn.Module:
    return nn.Module.train(self, False)
