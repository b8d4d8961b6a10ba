"""A head fitted to the frozen features before full fine-tuning's gradients are read.

A new classifier starts random: its loss is high and its gradients dwarf the
backbone's, so gradients read under it say where a random head pulls, not where the
task does. Fitting it first (a linear probe, as LP-FT does before fine-tuning) leaves
the gradient that the backbone still gets once the head fits what it can.

``head_inputs`` reads the classifier's input under a plan's modes (full fine-tuning's:
BatchNorm on batch statistics), in the batches the gradients will see; ``fit_head``
fits the classifier (``get_classifier()``, with ``model.head_norm``'s ``HeadNorm`` and
hidden layers if any) to them in place, by full-batch L-BFGS on the cross-entropy plus
a mild L2 on its weights. Where the classifier reads the features through a Linear
layer, the fit runs on standardized features and folds the scaling back into that
layer: features of any magnitude (a frozen backbone's on shifted images can be large)
fit alike. A ``HeadNorm`` first gets the features' own statistics.

>>> import timm, torch
>>> model = timm.create_model("test_resnet", num_classes=2)
>>> features = torch.randn(64, model.get_classifier().in_features)
>>> labels = (features[:, 0] > 0).long()
>>> fit_head(model, features, labels).train_accuracy
1.0
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from freezelab.advise.gradient_stats import plan_modes
from freezelab.policies import FreezePlan
from freezelab.trainers.feature_cache import classifier_inputs, classifier_of

# The L2 strength on the (standardized) weights, per sample: about scikit-learn's
# default logistic regression (C = 1) on a sample of a thousand. It keeps a separable
# sample's weights finite without pulling a fitting head far from the data.
L2 = 1e-3
MAX_STEPS = 300


@dataclass(frozen=True)
class HeadFit:
    train_accuracy: float  # on the features it was fitted to
    loss: float  # their mean cross-entropy after fitting (without the L2 term)


@torch.no_grad()
def head_inputs(
    model: nn.Module, plan: FreezePlan, batches: Iterable[torch.Tensor]
) -> torch.Tensor:
    """The classifier's input for each batch of images, under ``plan``'s modes (the
    model's modes and buffers restored after), concatenated."""
    with plan_modes(model, plan):
        return torch.cat([classifier_inputs(model, images).float() for images in batches])


def fit_head(
    model: nn.Module,
    features: torch.Tensor,
    labels: torch.Tensor,
    *,
    label_smoothing: float = 0.0,
    l2: float = L2,
    max_steps: int = MAX_STEPS,
) -> HeadFit:
    """Fit ``model``'s classifier to ``features`` (its inputs) and ``labels``, in place."""
    classifier = classifier_of(model)
    features = features.detach().float()
    if features.ndim != 2:
        raise ValueError(f"the classifier's input must be (n, features), got {features.shape}")
    modes = {m: m.training for m in classifier.modules()}
    flags = {p: p.requires_grad for p in classifier.parameters()}
    try:
        _calibrate_norms(classifier, features)
        classifier.eval()  # dropout off, a HeadNorm on the statistics just set
        entry = _entry_linear(classifier)
        inputs, scale, shift = features, None, None
        if entry is not None:
            # Without a bias the layer cannot absorb a shift: scale only.
            shift = features.mean(0) if entry.bias is not None else features.new_zeros(1)
            scale = features.std(0).clamp_min(1e-6 * float(features.std(0).max()) + 1e-12)
            inputs = (features - shift) / scale
            _rescale(entry, scale, shift, to_standard=True)
        params = [p.requires_grad_(True) for p in classifier.parameters()]
        weights = [p for p in params if p.ndim >= 2]
        optimizer = torch.optim.LBFGS(
            params, lr=1.0, max_iter=max_steps, history_size=20, line_search_fn="strong_wolfe"
        )

        def closure() -> torch.Tensor:
            optimizer.zero_grad()
            loss = F.cross_entropy(classifier(inputs), labels, label_smoothing=label_smoothing)
            loss = loss + l2 / 2 * sum(w.pow(2).sum() for w in weights)
            loss.backward()
            return loss

        optimizer.step(closure)
        optimizer.zero_grad(set_to_none=True)
        if entry is not None:
            _rescale(entry, scale, shift, to_standard=False)
        with torch.no_grad():
            logits = classifier(features)
            accuracy = float((logits.argmax(1) == labels).float().mean())
            loss = float(F.cross_entropy(logits, labels, label_smoothing=label_smoothing))
    finally:
        for module, training in modes.items():
            nn.Module.train(module, training)
        for p, flag in flags.items():
            p.requires_grad_(flag)
            p.grad = None
    return HeadFit(train_accuracy=accuracy, loss=loss)


def _entry_linear(classifier: nn.Module) -> nn.Linear | None:
    """The Linear layer that reads the features directly, if the classifier has one."""
    first = classifier[0] if isinstance(classifier, nn.Sequential) and len(classifier) else None
    if isinstance(classifier, nn.Linear):
        return classifier
    return first if isinstance(first, nn.Linear) else None


@torch.no_grad()
def _rescale(
    layer: nn.Linear, scale: torch.Tensor, shift: torch.Tensor, *, to_standard: bool
) -> None:
    """Rewrite ``layer`` to compute the same function of standardized features
    ``(x - shift) / scale`` (``to_standard``), or back to raw features."""
    if to_standard:
        if layer.bias is not None:
            layer.bias += layer.weight @ shift
        layer.weight *= scale
    else:
        layer.weight /= scale
        if layer.bias is not None:
            layer.bias -= layer.weight @ shift


@torch.no_grad()
def _calibrate_norms(classifier: nn.Module, features: torch.Tensor) -> None:
    """Running statistics of the classifier's BatchNorm layers (``HeadNorm``) set to
    those of ``features``, in one pass over them as a single batch."""
    norms = [m for m in classifier.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return
    momenta = {m: m.momentum for m in norms}
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average: after one batch, that batch's statistics
    classifier.train()
    try:
        classifier(features)
    finally:
        for m, momentum in momenta.items():
            m.momentum = momentum
