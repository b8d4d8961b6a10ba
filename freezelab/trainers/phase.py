"""A change of phase: what the loop does when the freeze plan of an epoch differs from the
last one's (the seam Lightning calls ``finetune_function``).

The plan is applied; at the start of a phase whose frozen norm layers adapt (AdaBN),
they take the target's statistics; the optimizer is rebuilt over what trains now (and
loads the resumed state by parameter name); the frozen-feature cache and the gradient
meter start anew; and the model is wrapped in DDP again, because DDP synchronizes only
the parameters that required grad when it was built (Lightning issue 20340).
Everything is derived from (policy, model, epoch): a run resumed inside a phase enters
it as the uninterrupted run did, except for the phase's early gradient steps.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from freezelab.policies import FreezePlan, apply
from freezelab.policies.apply import adapt_norm_statistics
from freezelab.trainers.config import TrainConfig
from freezelab.trainers.data import train_transform_is_deterministic
from freezelab.trainers.ddp import average_buffers, wrap
from freezelab.trainers.feature_cache import FeatureCache, cache_blocker, classifier_of
from freezelab.trainers.gradients import GradientMeter
from freezelab.trainers.optim import build_optimizer, load_state_by_name
from freezelab.trainers.rank_data import RankData

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Phase:
    """What trains in a phase, and how.

    ``trained`` is what the training step calls (the DDP wrapper of the model, or of its
    classifier when features are cached; compiled with ``performance.compile``);
    ``eager`` is the same without ``torch.compile``, for the step whose FLOPs are
    counted. The caches are ``None`` when features are not cached."""

    optimizer: torch.optim.Optimizer
    trained: nn.Module
    eager: nn.Module
    cache: FeatureCache | None
    val_cache: FeatureCache | None
    eval_caches: dict[str, FeatureCache | None]
    meter: GradientMeter | None


def same_phase(before: FreezePlan, after: FreezePlan) -> bool:
    """True when two epochs' plans train the same parameters with the same norm modes."""
    return before.signature() == after.signature() and before.bn == after.bn


def enter_phase(
    config: TrainConfig,
    model: nn.Module,
    plan: FreezePlan,
    epoch: int,
    *,
    data: RankData,
    eval_sizes: dict[str, int],
    previous: torch.optim.Optimizer | None,
    optimizer_state: dict[str, Any],
    device: torch.device,
    rank: int,
    world_size: int,
) -> Phase:
    """Apply ``plan`` (the plan of ``epoch``) to ``model`` and set up its phase.

    ``previous`` is the last phase's optimizer (its groups' settings carry over);
    ``optimizer_state`` a resumed optimizer state by parameter name, or ``{}``;
    ``eval_sizes`` the length of each extra evaluation set on this rank."""
    apply(model, plan)
    starts = _phase_starts(config, model, plan, epoch)
    if starts and "adapt" in plan.bn.values():
        # AdaBN: frozen norm layers take the statistics of the target's data.
        adapt_norm_statistics(model, plan, (batch[0].to(device) for batch in data.train))
        average_buffers(model, world_size)
    optimizer = build_optimizer(model, plan, config.optimizer, previous=previous)
    load_state_by_name(optimizer, optimizer_state)
    deterministic = train_transform_is_deterministic(config.data)
    cache = _new_cache(config, model, plan, deterministic, data.train_size, rank)
    meter = _gradient_meter(config, model, plan, starts)
    val_cache = FeatureCache(data.val_size) if cache is not None else None
    eval_caches = {
        name: FeatureCache(size) if cache is not None else None for name, size in eval_sizes.items()
    }
    # [2] prepare the model: DDP registers only what requires grad right now.
    target = classifier_of(model) if cache is not None else model
    eager = wrap(target, world_size, device)
    trained = _compiled(eager, config)
    return Phase(optimizer, trained, eager, cache, val_cache, eval_caches, meter)


def _phase_starts(config: TrainConfig, model: nn.Module, plan: FreezePlan, epoch: int) -> bool:
    """True when ``epoch`` is the first of its phase (not when a run resumes inside one)."""
    if epoch == 0:
        return True
    before = config.policy.plan(model, epoch - 1)
    return not same_phase(before, plan)


def _new_cache(
    config: TrainConfig,
    model: nn.Module,
    plan: FreezePlan,
    deterministic: bool,
    size: int,
    rank: int,
) -> FeatureCache | None:
    if not config.performance.feature_cache:
        return None
    blocker = cache_blocker(model, plan, deterministic)
    if blocker is None and config.data.epoch_fraction is not None:
        # The cache reads features only once it holds every row, which a new subset per
        # epoch reaches late or never; filling it bit by bit would also make a step's
        # counted FLOPs (those of the epoch that fills it) wrong for later epochs.
        blocker = "data.epoch_fraction draws a new subset of rows every epoch"
    if blocker is not None:
        if rank == 0 and plan.trainable_param_names <= {
            n for g in plan.groups if g.is_head for n in g.param_names
        }:
            log.info(f"frozen-feature cache off: {blocker}")
        return None
    return FeatureCache(size)


def _gradient_meter(
    config: TrainConfig, model: nn.Module, plan: FreezePlan, starts: bool
) -> GradientMeter | None:
    """A meter for a phase. Its early steps are the phase's first ones: a run resumed
    in the middle of a phase records none."""
    if not config.metrics.gradients:
        return None
    return GradientMeter(model, plan, config.metrics.early_steps if starts else 0)


def _compiled(trained: nn.Module, config: TrainConfig) -> nn.Module:
    """``performance.compile``: the training step's module through ``torch.compile``,
    anew at every change of phase (what requires grad changed, and the graphs of the
    phase before are dropped rather than kept against dynamo's recompile limit).
    Evaluation stays eager; the weights are the same tensors either way."""
    if not config.performance.compile:
        return trained
    torch.compiler.reset()
    return torch.compile(trained)
