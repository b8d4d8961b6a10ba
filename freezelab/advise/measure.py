"""``measure_signals``: what a pretrained model says about a target's training data,
per layer group, in two passes over a sample and a few gradients. Nothing trains but
a linear head on frozen features.

1. A sample of the target's training images (at most ``samples``, drawn with the
   config's seed; no augmentation) goes once through the model in eval mode, with a
   hook on every backbone group's output (``features``): a LogME score per group
   (``logme``); and on every BatchNorm layer's input: the shift of the target's
   statistics from the pretrained ones (``bn_shift``).
2. The sample, in batches of the config's batch size, goes through the model in full
   fine-tuning's modes (BatchNorm on batch statistics); the classifier is fitted to
   the features it receives there (``head_fit``).
3. The first of those batches (at most ``batches``) give full fine-tuning's gradients
   under the fitted head, without an optimizer step (``gradient_stats``).

The model is built here and thrown away: the fitted head is not kept.

>>> from freezelab.trainers.config import load_config
>>> signals = measure_signals(load_config("examples/train_tiny.yaml"))  # doctest: +SKIP
>>> print(signals.format_text())                                         # doctest: +SKIP
"""

from __future__ import annotations

import logging
import time

import torch
from torch.utils.data import DataLoader, Subset

from freezelab.advise.bn_shift import group_shifts, target_statistics
from freezelab.advise.features import group_outputs
from freezelab.advise.gradient_stats import gradient_statistics, head_to_backbone
from freezelab.advise.head_fit import fit_head, head_inputs
from freezelab.advise.logme import logme
from freezelab.advise.search import AdviseError
from freezelab.advise.signals import GroupSignal, Signals
from freezelab.policies import from_dict, layer_groups
from freezelab.trainers.config import TrainConfig
from freezelab.trainers.data import build_datasets
from freezelab.trainers.models import build_for_config

log = logging.getLogger(__name__)

DEFAULT_SAMPLES = 2000
DEFAULT_BATCHES = 8
_FEATURE_BATCH = 256
MIN_SAMPLES = 4


def measure_signals(
    config: TrainConfig, *, samples: int = DEFAULT_SAMPLES, batches: int = DEFAULT_BATCHES
) -> Signals:
    """The signals of ``config``'s model on a sample of its training data."""
    if batches < 2:
        raise AdviseError(f"batches {batches}: gradient statistics need at least 2 batches")
    started = time.perf_counter()
    torch.manual_seed(config.seed)
    model = build_for_config(config).eval()
    data = config.data.model_copy(update={"augment": False, "eval_shifts": (), "eval_sets": {}})
    train, _, num_classes = build_datasets(data, model)
    if samples < max(MIN_SAMPLES, num_classes):
        raise AdviseError(
            f"--samples {samples}: needs one image per class ({num_classes}) and at least "
            f"{MIN_SAMPLES} (two gradient batches of two)"
        )
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(config.seed))
    chosen = Subset(train, order[: min(samples, len(train))].tolist())
    groups = layer_groups(model, "stage")
    images, labels, features, shifts = _eval_pass(model, groups, chosen)
    scores = {name: logme(f.double().numpy(), labels.numpy()) for name, f in features.items()}
    log.info(
        f"advise: LogME and BatchNorm statistics of {len(labels):,} training images at "
        f"{len(features)} groups ({time.perf_counter() - started:.1f} s)"
    )

    full = from_dict({"type": "full"}).plan(model, 0)
    size = max(2, min(config.batch_size, len(labels) // 2))
    splits = _batched(images, labels, size)
    smoothing = config.optimizer.label_smoothing
    fitted = fit_head(
        model, head_inputs(model, full, [x for x, _ in splits]), labels, label_smoothing=smoothing
    )
    count = max(2, min(batches, len(splits)))
    grads = gradient_statistics(model, full, splits[:count], label_smoothing=smoothing)
    ratio = head_to_backbone(groups, grads)
    log.info(
        f"advise: head fitted (train accuracy {fitted.train_accuracy:.1%}), gradients of "
        f"{count} batches of {size} ({time.perf_counter() - started:.1f} s)"
    )
    signals = []
    for group in groups:
        found = None if group.is_head else scores.get(group.name)
        shift = shifts.get(group.name)
        g = grads[group.name]
        signals.append(
            GroupSignal(
                name=group.name,
                params=group.num_params,
                is_head=group.is_head,
                logme=None if found is None else found.score,
                fit=None if found is None else found.fit,
                grad_norm=g.grad_norm,
                rel_grad_norm=g.rel_grad_norm,
                grad_snr=g.grad_snr,
                bn_shift=None if shift is None else shift.mean_shift,
                bn_log_var_ratio=None if shift is None else shift.log_var_ratio,
            )
        )
    return Signals(
        tuple(signals),
        head_to_backbone=ratio,
        samples=len(labels),
        batches=count,
        head_train_accuracy=fitted.train_accuracy,
    )


def _batched(
    images: torch.Tensor, labels: torch.Tensor, size: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Batches of ``size``; a last batch of one joins the one before it (BatchNorm on
    batch statistics cannot normalize a single image)."""
    splits = list(zip(images.split(size), labels.split(size), strict=True))
    if len(splits) > 1 and len(splits[-1][1]) == 1:
        (a, y_a), (b, y_b) = splits[-2], splits.pop()
        splits[-1] = (torch.cat([a, b]), torch.cat([y_a, y_b]))
    return splits


@torch.no_grad()
def _eval_pass(model, groups, dataset):
    """The sample's images and labels, each backbone group's pooled output, and each
    group's BatchNorm shift, from one pass in eval mode."""
    all_images, all_labels, parts = [], [], {}
    with target_statistics(model) as moments:
        for images, labels in DataLoader(dataset, batch_size=_FEATURE_BATCH):
            for name, found in group_outputs(model, groups, images).items():
                parts.setdefault(name, []).append(found)
            all_images.append(images)
            all_labels.append(torch.as_tensor(labels))
    features = {name: torch.cat(found) for name, found in parts.items()}
    shifts = group_shifts(model, groups, moments)
    return torch.cat(all_images), torch.cat(all_labels), features, shifts
