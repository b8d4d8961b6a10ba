"""LogME (You et al., ICML 2021): how well a linear model on features explains labels,
as the log marginal evidence of a Bayesian linear regression, per sample.

For features ``F`` (n x D) and one label column ``y`` (n), the model is
``w ~ N(0, 1/alpha I)``, ``y | F, w ~ N(F w, 1/beta I)``. Its evidence, maximised over
``alpha`` and ``beta``, is

    log p(y | F) = n/2 log beta + D/2 log alpha - n/2 log 2pi
                   - beta/2 ||F m - y||^2 - alpha/2 ||m||^2 - 1/2 log |A|,

with ``A = alpha I + beta F^T F`` and ``m = beta A^-1 F^T y``. MacKay's fixed point
finds the maximum: ``gamma = sum_i beta s_i^2 / (alpha + beta s_i^2)``,
``alpha = gamma / ||m||^2``, ``beta = (n - gamma) / ||F m - y||^2``. With the SVD
``F = U S V^T`` computed once, every iteration is O(rank): ``z = U^T y`` gives
``||m||^2 = sum (beta s_i z_i / (alpha + beta s_i^2))^2`` and
``||F m - y||^2 = sum (alpha z_i / (alpha + beta s_i^2))^2 + ||y||^2 - ||z||^2``.
Labels are one-hot columns; the score is the mean over columns of the evidence divided
by ``n``. Features separate the classes linearly when it is high.

``fit`` is a number with a scale from the same model: the share of a label column's
variance that it predicts for samples it has not seen, ``1 - mean(e_loo^2) / var(y)`` (0:
no better than the class frequency; 1: all), averaged over the columns. It is fitted with
an intercept (features and labels centred, evidence maximised again), so that the class
frequency is its baseline, and ``e_loo`` are the leave-one-out residuals of the posterior
mean, in closed form: ``e_i / (1 - H_ii)`` with the hat matrix
``H = 11^T / n + U diag(beta s^2 / (alpha + beta s^2)) U^T``. Held out, because with fewer
samples than feature dimensions an in-sample fit explains almost any labels.

>>> import numpy as np
>>> rng = np.random.default_rng(0)
>>> features = rng.normal(size=(200, 8))
>>> labels = (features[:, 0] > 0).astype(int)
>>> logme(features, labels).score > logme(features, rng.permutation(labels)).score
True
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

# Singular values below this share of the largest are a rank deficiency (dead units).
_RANK_TOLERANCE = 1e-10
_MAX_ITERATIONS = 100
_CONVERGED = 1e-6


@dataclass(frozen=True)
class LogME:
    """The LogME score (mean log evidence per sample) and the share of the labels'
    energy explained (``fit``), over the label columns that occur."""

    score: float
    fit: float


def logme(features: np.ndarray, labels: np.ndarray) -> LogME:
    """LogME of ``features`` (n x D) for integer class ``labels`` (n).

    Only the classes present in ``labels`` count: a column of zeros has no evidence.
    """
    features = np.asarray(features, dtype=np.float64)
    labels = np.asarray(labels)
    if features.ndim != 2 or len(features) != len(labels):
        raise ValueError(
            f"features must be (n, D) with one label per row; got {features.shape} "
            f"and {labels.shape}"
        )
    n, dims = features.shape
    u, s = _svd(features)
    centred_u, centred_s = _svd(features - features.mean(axis=0))
    scores, fits = [], []
    for cls in np.unique(labels):
        y = (labels == cls).astype(np.float64)
        evidence, _, _ = _max_evidence(u.T @ y, s, float(y @ y), n, dims)
        scores.append(evidence / n)
        fits.append(_held_out_fit(centred_u, centred_s, y, dims))
    return LogME(float(np.mean(scores)), float(np.clip(np.mean(fits), 0.0, 1.0)))


def _svd(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    u, s, _ = np.linalg.svd(features, full_matrices=False)
    keep = s > _RANK_TOLERANCE * (s[0] if len(s) else 0.0)
    return u[:, keep], s[keep]


def _held_out_fit(u: np.ndarray, s: np.ndarray, y: np.ndarray, dims: int) -> float:
    """``1 - mean(e_loo^2) / var(y)`` with an intercept (see the module's doc); ``u``
    and ``s`` are the SVD of the centred features."""
    n = len(y)
    variance = float(np.var(y))
    if variance == 0:
        return 0.0
    centred = y - y.mean()
    z = u.T @ centred
    # Centring takes a degree of freedom: the centred labels live in n - 1 dimensions.
    _, alpha, beta = _max_evidence(z, s, float(centred @ centred), n - 1, dims)
    # Both sides of e_i / (1 - H_ii) in the shrinkage's complement alpha / (alpha +
    # beta s^2): stable where the model (nearly) interpolates and both tend to 0.
    keep = alpha / (alpha + beta * s**2)
    residual = u @ (keep * z) + (centred - u @ z)
    spanned = (u**2).sum(axis=1)
    complement = (u**2) @ keep + np.clip(1.0 - 1.0 / n - spanned, 0.0, None)
    complement = np.maximum(complement, 1e-12)
    return 1.0 - float(np.mean((residual / complement) ** 2)) / variance


def _max_evidence(
    z: np.ndarray, s: np.ndarray, y_energy: float, n: int, dims: int
) -> tuple[float, float, float]:
    """The maximised log evidence of one label column and its ``alpha`` and ``beta``,
    from ``z = U^T y`` and the singular values ``s``."""
    sigma = s**2
    outside = max(y_energy - float(z @ z), 0.0)  # the part of y no feature direction reaches
    alpha, beta = 1.0, 1.0
    for _ in range(_MAX_ITERATIONS):
        denom = alpha + beta * sigma
        gamma = float(np.sum(beta * sigma / denom))
        weight_energy = float(np.sum((beta * s * z / denom) ** 2))
        residual = float(np.sum((alpha * z / denom) ** 2)) + outside
        # Clamped: features that are constant (a dead stage) or that interpolate the
        # labels drive a precision to 0 or infinity, whose log the evidence takes.
        new_alpha = min(max(gamma / max(weight_energy, 1e-300), 1e-12), 1e12)
        new_beta = min(max(max(n - gamma, 1e-12) / max(residual, 1e-300), 1e-12), 1e12)
        done = (
            abs(new_alpha - alpha) <= _CONVERGED * alpha
            and abs(new_beta - beta) <= _CONVERGED * beta
        )
        alpha, beta = new_alpha, new_beta
        if done:
            break
    denom = alpha + beta * sigma
    weight_energy = float(np.sum((beta * s * z / denom) ** 2))
    residual = float(np.sum((alpha * z / denom) ** 2)) + outside
    log_det = float(np.sum(np.log(denom))) + (dims - len(s)) * math.log(alpha)
    evidence = (
        n / 2 * math.log(beta)
        + dims / 2 * math.log(alpha)
        - n / 2 * math.log(2 * math.pi)
        - beta / 2 * residual
        - alpha / 2 * weight_energy
        - log_det / 2
    )
    return evidence, alpha, beta
