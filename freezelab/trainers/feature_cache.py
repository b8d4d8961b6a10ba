"""The frozen-feature cache: while the whole backbone is frozen, compute its output once
per sample and train the head on the stored features.

The cached features are the input of the classifier (``model.get_classifier()``),
captured with a forward pre-hook, so the same code serves timm models and custom heads.
It is exact only when the features of a sample never change during the phase: the
backbone frozen with its norm layers in eval mode, no active dropout outside the head,
and a deterministic train transform. ``cache_blocker`` says why not, or None.

>>> import timm, torch
>>> model = timm.create_model("test_resnet", num_classes=2).eval()
>>> features = classifier_inputs(model, torch.zeros(2, 3, 32, 32))
>>> features.shape[0]
2
"""

from __future__ import annotations

import torch
import torch.nn as nn

from freezelab.policies import FreezePlan
from freezelab.policies.apply import FIXED_STATISTICS


def classifier_of(model: nn.Module) -> nn.Module:
    classifier = model.get_classifier() if hasattr(model, "get_classifier") else None
    if not isinstance(classifier, nn.Module):
        raise TypeError(f"{type(model).__name__} has no get_classifier(): no feature cache")
    return classifier


def cache_blocker(model: nn.Module, plan: FreezePlan, deterministic_transform: bool) -> str | None:
    """Why the feature cache cannot be used for this plan, or None when it can."""
    if not deterministic_transform:
        return "the train transform is random (augmentation)"
    head_names = {n for g in plan.groups if g.is_head for n in g.param_names}
    if not plan.trainable_param_names <= head_names:
        return "parameters outside the head train"
    if any(mode not in FIXED_STATISTICS for g, mode in plan.bn.items() if not _is_head(plan, g)):
        return "norm layers of the frozen backbone update their statistics (bn: train)"
    classifier = classifier_of(model)
    inside_head = {id(m) for m in classifier.modules()}
    for module in model.modules():
        if id(module) in inside_head:
            continue
        rate = (
            getattr(module, "p", None)
            if isinstance(module, nn.Dropout)
            else getattr(module, "drop_prob", None)
        )
        if rate:
            return f"{type(module).__name__} with rate {rate} is active in the backbone"
    return None


def _is_head(plan: FreezePlan, group_name: str) -> bool:
    return any(g.is_head and g.name == group_name for g in plan.groups)


def classifier_inputs(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """The input the classifier receives for ``images`` (the backbone's features)."""
    captured: list[torch.Tensor] = []

    def hook(_module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        captured.append(args[0])
        raise _Captured

    handle = classifier_of(model).register_forward_pre_hook(hook)
    try:
        model(images)
    except _Captured:
        pass
    finally:
        handle.remove()
    if not captured:
        raise RuntimeError("the classifier was not called in the forward pass")
    return captured[0]


class _Captured(Exception):
    """Stops the forward pass once the classifier's input is known."""


class FeatureCache:
    """Features and labels by dataset index, for one frozen phase.

    The first epoch of the phase computes the features of the batches it sees; at its
    end, data-parallel ranks exchange what they computed (``share``), after which every
    rank holds the whole training set and later epochs read features only: no image is
    loaded and no backbone runs.
    """

    def __init__(self, size: int):
        self.size = size
        self.features: torch.Tensor | None = None
        self.labels = torch.zeros(size, dtype=torch.long)
        self.filled = torch.zeros(size, dtype=torch.bool)

    @property
    def complete(self) -> bool:
        return bool(self.filled.all())

    def features_for(
        self, model: nn.Module, images: torch.Tensor, labels: torch.Tensor, indices: torch.Tensor
    ) -> torch.Tensor:
        """The batch's features, computed (and stored) where not yet cached."""
        indices = indices.cpu()
        missing = ~self.filled[indices]
        if missing.any():
            with torch.no_grad():
                computed = classifier_inputs(model, images[missing.to(images.device)]).detach()
            self._store(indices[missing], computed, labels.cpu()[missing])
        assert self.features is not None
        return self.features[indices.to(self.features.device)]

    def _store(self, indices: torch.Tensor, features: torch.Tensor, labels: torch.Tensor) -> None:
        if self.features is None:
            self.features = torch.zeros(
                (self.size, *features.shape[1:]), dtype=features.dtype, device=features.device
            )
        self.features[indices.to(features.device)] = features
        self.labels[indices] = labels
        self.filled[indices] = True

    def share(self) -> None:
        """Give every rank the features that any rank computed (a no-op on one process)."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()) or self.features is None:
            return
        mine = self.filled.nonzero().flatten()
        device = self.features.device
        counts = [
            torch.zeros(1, dtype=torch.long, device=device) for _ in range(dist.get_world_size())
        ]
        dist.all_gather(counts, torch.tensor([len(mine)], device=device))
        width = int(max(c.item() for c in counts))
        # all_gather needs equal shapes: pad each rank's rows to the longest.
        padded_idx = torch.full((width,), -1, dtype=torch.long, device=device)
        padded_idx[: len(mine)] = mine.to(device)
        padded_feat = torch.zeros(
            (width, *self.features.shape[1:]), dtype=self.features.dtype, device=device
        )
        padded_feat[: len(mine)] = self.features[mine.to(device)]
        padded_lab = torch.zeros(width, dtype=torch.long, device=device)
        padded_lab[: len(mine)] = self.labels[mine].to(device)
        all_idx = [torch.empty_like(padded_idx) for _ in counts]
        all_feat = [torch.empty_like(padded_feat) for _ in counts]
        all_lab = [torch.empty_like(padded_lab) for _ in counts]
        dist.all_gather(all_idx, padded_idx)
        dist.all_gather(all_feat, padded_feat)
        dist.all_gather(all_lab, padded_lab)
        for idx, feat, lab in zip(all_idx, all_feat, all_lab, strict=True):
            keep = idx >= 0
            self._store(idx[keep].cpu(), feat[keep], lab[keep].cpu())

    def batch(self, indices: list[int] | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Cached (features, labels) of a batch of dataset indices."""
        if self.features is None or not bool(self.filled[indices].all()):
            raise RuntimeError("the feature cache does not hold every sample of this batch")
        index = torch.as_tensor(indices, dtype=torch.long)
        return self.features[index.to(self.features.device)], self.labels[index]
