"""``advise``: the signals of a pretrained model on a target's training data, and the
candidate policies ranked by them, in one pass plus a few gradients. Nothing trains.

1. A sample of the target's training images (at most ``samples``, drawn with the
   config's seed; no augmentation) goes once through the model in eval mode, with a
   hook on every backbone group's output (``features``): a LogME score per group
   (``logme``).
2. A few batches of the sample (at the config's batch size, at most ``batches``) give
   full fine-tuning's gradients, without an optimizer step (``gradient_stats``).
3. Each candidate's plans give its trainable share and FLOPs per step, on a model with
   no memory (``costs``); ``rules`` ranks them.

>>> from freezelab.trainers.config import load_config
>>> advice = advise(load_config("examples/train_tiny.yaml"), candidates)  # doctest: +SKIP
>>> advice.recommended.label()                                          # doctest: +SKIP
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset

from freezelab.advise.advice import Advice
from freezelab.advise.costs import policy_profile, step_flops
from freezelab.advise.features import group_outputs
from freezelab.advise.gradient_stats import gradient_statistics
from freezelab.advise.logme import logme
from freezelab.advise.rules import GroupSignal, Signals, rank
from freezelab.errors import FreezelabError
from freezelab.policies import FreezePolicy, from_dict, layer_groups
from freezelab.trainers.config import TrainConfig
from freezelab.trainers.data import build_datasets, input_size_of
from freezelab.trainers.models import build_for_config, build_unallocated

log = logging.getLogger(__name__)

DEFAULT_SAMPLES = 2000
DEFAULT_BATCHES = 8
_FEATURE_BATCH = 256


class AdviseError(FreezelabError, ValueError):
    """What ``advise`` cannot work with: too few samples, no candidate."""


def advise(
    config: TrainConfig,
    candidates: Sequence[FreezePolicy],
    *,
    samples: int = DEFAULT_SAMPLES,
    batches: int = DEFAULT_BATCHES,
) -> Advice:
    """Measure the signals for ``config``'s model and data, and rank ``candidates``."""
    if not candidates:
        raise AdviseError("no candidate policy to rank")
    started = time.perf_counter()
    torch.manual_seed(config.seed)
    model = build_for_config(config).eval()
    data = config.data.model_copy(update={"augment": False, "eval_shifts": (), "eval_sets": {}})
    train, _, num_classes = build_datasets(data, model)
    if samples < num_classes:
        raise AdviseError(
            f"--samples {samples}: needs at least one image per class ({num_classes})"
        )
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(config.seed))
    chosen = Subset(train, order[: min(samples, len(train))].tolist())
    images, labels, features = _feature_pass(model, chosen)
    log.info(
        f"advise: features of {len(labels):,} training images at "
        f"{len(features)} groups ({time.perf_counter() - started:.1f} s)"
    )
    scores = {name: logme(f.double().numpy(), labels.numpy()) for name, f in features.items()}

    full = from_dict({"type": "full"}).plan(model, 0)
    size = max(1, min(config.batch_size, len(labels) // 2))
    count = max(2, min(batches, len(labels) // size))
    grad_batches = [
        (images[i * size : (i + 1) * size], labels[i * size : (i + 1) * size]) for i in range(count)
    ]
    grads = gradient_statistics(
        model, full, grad_batches, label_smoothing=config.optimizer.label_smoothing
    )
    log.info(
        f"advise: gradients of {count} batches of {size} ({time.perf_counter() - started:.1f} s)"
    )
    signals = _signals(layer_groups(model, "stage"), scores, grads, len(labels), count)

    meta = build_unallocated(config, num_classes)
    batch_shape = (config.batch_size, *input_size_of(data, model))
    cache: dict[frozenset[str], int] = {}
    profiles = [
        (policy, policy_profile(meta, policy, config.epochs, batch_shape, cache))
        for policy in candidates
    ]
    full_flops = step_flops(meta, from_dict({"type": "full"}).plan(meta, 0), batch_shape)
    ranking = rank(signals, profiles, full_flops)
    elapsed = time.perf_counter() - started
    log.info(f"advise: {len(ranking)} candidates ranked ({elapsed:.1f} s)")
    return Advice(
        model=config.model.name, signals=signals, ranking=ranking, time_s=elapsed,
        full_flops_per_step=full_flops,
    )  # fmt: skip


@torch.no_grad()
def _feature_pass(model, dataset) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    groups = layer_groups(model, "stage")
    all_images, all_labels, parts = [], [], {}
    for images, labels in DataLoader(dataset, batch_size=_FEATURE_BATCH):
        for name, found in group_outputs(model, groups, images).items():
            parts.setdefault(name, []).append(found)
        all_images.append(images)
        all_labels.append(torch.as_tensor(labels))
    features = {name: torch.cat(found) for name, found in parts.items()}
    return torch.cat(all_images), torch.cat(all_labels), features


def _signals(groups, scores, grads, samples: int, batches: int) -> Signals:
    signals = []
    for group in groups:
        found = scores.get(group.name)
        g = grads[group.name]
        signals.append(
            GroupSignal(
                name=group.name,
                params=group.num_params,
                is_head=group.is_head,
                logme=None if found is None or group.is_head else found.score,
                fit=None if found is None or group.is_head else found.fit,
                grad_norm=g.grad_norm,
                rel_grad_norm=g.rel_grad_norm,
                grad_snr=g.grad_snr,
            )
        )
    backbone = [grads[g.name] for g in groups if not g.is_head]
    head = [grads[g.name] for g in groups if g.is_head]
    grad = float(np.sqrt(sum(g.grad_norm**2 for g in backbone)))
    weight = float(np.sqrt(sum(g.weight_norm**2 for g in backbone)))
    backbone_relative = grad / weight if weight > 0 else 0.0
    head_relative = head[0].rel_grad_norm if head else 0.0
    ratio = head_relative / backbone_relative if backbone_relative > 0 else float("inf")
    return Signals(tuple(signals), ratio, samples, batches)
