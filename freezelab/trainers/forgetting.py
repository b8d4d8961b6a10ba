"""Representation forgetting: how much of the source task the backbone still knows.

The head is new, so the source task is measured through the backbone: a linear probe
(logistic regression on standardized features) is fitted on the backbone's features
of the source task's training set and scored on its validation set. ``forgetting`` is
the probe's accuracy at the start of the run minus its accuracy now: 0 for a backbone
that did not change (``head_only``), positive when fine-tuning lost what the
pretrained layers knew.

The features are the classifier's input (``classifier_inputs``): timm's pooled
features, or a custom head's input. The fit is deterministic (L-BFGS from zeros), so
equal features give an equal probe.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset

from freezelab.trainers.config import DataConfig
from freezelab.trainers.data import build_datasets
from freezelab.trainers.feature_cache import classifier_inputs, classifier_of

# The probe's accuracy at the start of a run, by (backbone weights, source task).
_STARTS: dict[tuple[str, tuple[str, int, str]], float] = {}


def _backbone_digest(model: nn.Module) -> str:
    """A digest of every parameter and buffer outside the classifier: what the
    classifier's input (the probe's features) depends on."""
    import hashlib

    try:
        head = {id(t) for t in classifier_of(model).parameters()}
    except TypeError:  # no get_classifier(): the whole model, so no reuse across heads
        head = set()
    digest = hashlib.blake2b(digest_size=16)
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if id(tensor) in head:
            continue
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


class SourceProbe:
    """The source task's data, built once per run, and the probe's accuracy on demand."""

    def __init__(
        self,
        source: DataConfig,
        model: nn.Module,
        device: torch.device,
        *,
        max_iter: int = 500,
        batch_size: int = 256,
    ):
        self.train, self.val, _ = build_datasets(source, model)
        self.device, self.max_iter, self.batch_size = device, max_iter, batch_size
        self.source_key = (source.model_dump_json(), max_iter, str(device))

    def accuracy_at_start(self, model: nn.Module) -> float:
        """``accuracy`` of the pretrained backbone, fitted once per process for equal
        backbone weights and source task: the fit is deterministic, so a process that
        starts several runs from one pretrained model (a study's trials, one after the
        other) reuses it."""
        key = (_backbone_digest(model), self.source_key)
        if key not in _STARTS:
            _STARTS[key] = self.accuracy(model)
        return _STARTS[key]

    def accuracy(self, model: nn.Module) -> float:
        from sklearn.linear_model import LogisticRegression

        train_x, train_y = self._features(model, self.train)
        val_x, val_y = self._features(model, self.val)
        if not (np.isfinite(train_x).all() and np.isfinite(val_x).all()):
            # A diverged backbone (NaN weights) has no features to probe; the run is
            # flagged as diverged by its loss, and goes on.
            return float("nan")
        mean, std = train_x.mean(0), train_x.std(0)
        std[std == 0] = 1.0
        probe = LogisticRegression(max_iter=self.max_iter)
        probe.fit((train_x - mean) / std, train_y)
        return float(probe.score((val_x - mean) / std, val_y))

    @torch.no_grad()
    def _features(self, model: nn.Module, dataset: Dataset) -> tuple[np.ndarray, np.ndarray]:
        was_training = model.training
        model.eval()
        features, labels = [], []
        try:
            for images, targets in DataLoader(dataset, batch_size=self.batch_size):
                found = classifier_inputs(model, images.to(self.device))
                features.append(found.float().flatten(1).cpu())
                labels.append(targets)
        finally:
            model.train(was_training)
        return torch.cat(features).double().numpy(), torch.cat(labels).numpy()


def source_data(source: DataConfig, target: DataConfig) -> DataConfig:
    """The source task as the run's model sees it: at the target's input size unless
    the source sets its own."""
    if source.input_size is None and target.input_size is not None:
        return source.model_copy(update={"input_size": target.input_size})
    return source
