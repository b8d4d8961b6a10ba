"""How much of the starting representation a fine-tuned backbone kept: linear CKA
(Kornblith et al. 2019, "Similarity of Neural Network Representations Revisited")
between the features of the starting and the fine-tuned model on one fixed batch.

The features are the classifier's input (``classifier_inputs``), so the measure
covers the whole backbone and nothing of the head.

>>> import numpy as np
>>> x = np.random.default_rng(0).normal(size=(50, 8))
>>> round(linear_cka(x, 3.0 * x), 6)
1.0
"""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np


def linear_cka(x: Any, y: Any) -> float:
    """Linear CKA of two feature matrices over the same ``n`` examples (rows).

    ``x`` is ``(n, p)``, ``y`` is ``(n, q)`` (more dimensions are flattened); numpy
    arrays or torch tensors. 1 means the same representation up to an orthogonal
    transform and an isotropic scaling; NaN when either has no variance.
    """
    x, y = _centered(x), _centered(y)
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"x has {x.shape[0]} examples but y has {y.shape[0]}")
    if x.shape[0] <= max(x.shape[1], y.shape[1]):
        # Few examples of wide features: the n x n Gram matrices are the small ones.
        gram_x, gram_y = x @ x.T, y @ y.T
        cross = float(np.sum(gram_x * gram_y))
        norm_x, norm_y = np.linalg.norm(gram_x), np.linalg.norm(gram_y)
    else:
        cross = float(np.linalg.norm(y.T @ x) ** 2)
        norm_x, norm_y = np.linalg.norm(x.T @ x), np.linalg.norm(y.T @ y)
    denominator = float(norm_x * norm_y)
    return cross / denominator if denominator > 0 else math.nan


def _centered(features: Any) -> np.ndarray:
    if hasattr(features, "detach"):  # a torch tensor
        features = features.detach().cpu().double().numpy()
    matrix = np.asarray(features, dtype=np.float64)
    matrix = matrix.reshape(matrix.shape[0], -1)
    return matrix - matrix.mean(axis=0, keepdims=True)


def backbone_cka(
    config: Any, weights_file: str, *, max_samples: int = 64, cache: dict | None = None
) -> float:
    """Linear CKA between the backbone features of the run's starting model (as
    ``build_for_config`` builds it: the reference of the drift metrics) and of the
    fine-tuned weights in ``weights_file``, on the first ``max_samples`` validation
    images. ``cache`` keeps starting features across runs that share them.
    """
    import torch

    from freezelab.trainers.feature_cache import classifier_inputs
    from freezelab.trainers.models import build_for_config, read_state_dict

    key = json.dumps(
        [
            config.model.model_dump(mode="json"),
            config.data.model_dump(mode="json"),
            config.seed,
            max_samples,
        ]
    )
    cache = {} if cache is None else cache
    if key not in cache:
        start = build_for_config(config).eval()
        images = fixed_validation_batch(config, start, max_samples)
        with torch.no_grad():
            cache[key] = (images, classifier_inputs(start, images))
    images, start_features = cache[key]
    tuned = build_for_config(config, with_weights=False)
    tuned.load_state_dict(read_state_dict(weights_file), strict=True)
    tuned.eval()
    with torch.no_grad():
        tuned_features = classifier_inputs(tuned, images)
    return linear_cka(start_features, tuned_features)


def fixed_validation_batch(config: Any, model: Any, max_samples: int = 64):
    """The first ``max_samples`` validation images of the run's data, in order: the
    validation split and transform are deterministic, so every call gives the same."""
    import torch

    from freezelab.trainers.data import build_datasets

    _, val, _ = build_datasets(config.data, model)
    count = min(len(val), max_samples)
    if count < 2:
        raise ValueError(f"the validation set has {len(val)} image(s); CKA needs at least 2")
    return torch.stack([val[i][0] for i in range(count)])
