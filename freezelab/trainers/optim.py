"""The optimizer for a plan, and the LR schedule as a pure function of progress.

The optimizer only ever sees trainable parameters: one param group per trainable layer
group, with that group's LR multiplier. The LR of every group is set before each step
from (schedule, progress, multiplier), so a new group layout after an unfreeze needs
no scheduler surgery: nothing is carried but the step count.

>>> lr_factor(ScheduleSection(name="cosine"), progress=0.5, epochs=10)
0.5
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from freezelab.policies import FreezePlan
from freezelab.trainers.config import OptimizerSection, ScheduleSection


def build_optimizer(
    model: nn.Module,
    plan: FreezePlan,
    config: OptimizerSection,
    previous: torch.optim.Optimizer | None = None,
) -> torch.optim.Optimizer:
    """An optimizer over the plan's trainable parameters, one group per layer group.

    State (momentum, Adam moments) of parameters that stay trainable is taken over
    from ``previous``; frozen parameters carry no state.
    """
    params = dict(model.named_parameters())
    groups = []
    for group in plan.trainable_groups():
        names = [n for n in group.param_names if n in plan.trainable_param_names]
        groups.append(
            {
                "params": [params[n] for n in names],
                "param_names": names,
                "name": group.name,
                "lr_mult": plan.lr_mult[group.name],
                "lr": config.lr * plan.lr_mult[group.name],
                "weight_decay": config.weight_decay,
            }
        )
    if config.name == "sgd":
        optimizer = torch.optim.SGD(
            groups, lr=config.lr, momentum=config.momentum, nesterov=config.nesterov
        )
    elif config.name == "adamw":
        optimizer = torch.optim.AdamW(groups, lr=config.lr)
    else:
        optimizer = torch.optim.Adam(groups, lr=config.lr)
    if previous is not None:
        for group in optimizer.param_groups:
            for param in group["params"]:
                if param in previous.state:
                    optimizer.state[param] = previous.state[param]
    return optimizer


def state_by_name(optimizer: torch.optim.Optimizer) -> dict[str, dict[str, torch.Tensor]]:
    """The optimizer state keyed by parameter name: independent of the group layout, so
    a checkpoint restores into whatever layout the resumed epoch's plan needs."""
    return {
        name: {k: v for k, v in optimizer.state[param].items()}
        for group in optimizer.param_groups
        for name, param in zip(group["param_names"], group["params"], strict=True)
        if param in optimizer.state
    }


def load_state_by_name(
    optimizer: torch.optim.Optimizer, state: dict[str, dict[str, torch.Tensor]]
) -> None:
    for group in optimizer.param_groups:
        for name, param in zip(group["param_names"], group["params"], strict=True):
            if name in state:
                optimizer.state[param] = {
                    k: v.to(param.device) if isinstance(v, torch.Tensor) and v.ndim else v
                    for k, v in state[name].items()
                }


def lr_factor(schedule: ScheduleSection, progress: float, epochs: int) -> float:
    """The LR factor at ``progress`` epochs into a run of ``epochs`` (fractional)."""
    if schedule.warmup_epochs and progress < schedule.warmup_epochs:
        return (progress + 1e-8) / schedule.warmup_epochs
    if schedule.name == "constant":
        return 1.0
    if schedule.name == "step":
        return schedule.gamma ** int(progress // schedule.step_epochs)
    span = max(epochs - schedule.warmup_epochs, 1e-8)
    t = min(max((progress - schedule.warmup_epochs) / span, 0.0), 1.0)
    floor = schedule.min_lr_factor
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * t))


def set_lr(optimizer: torch.optim.Optimizer, base_lr: float, factor: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = base_lr * group["lr_mult"] * factor
