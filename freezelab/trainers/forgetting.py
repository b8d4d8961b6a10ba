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
from freezelab.trainers.feature_cache import classifier_inputs


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

    def accuracy(self, model: nn.Module) -> float:
        from sklearn.linear_model import LogisticRegression

        train_x, train_y = self._features(model, self.train)
        val_x, val_y = self._features(model, self.val)
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
