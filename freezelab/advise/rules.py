"""From the signals to a ranking: one explicit score per candidate policy.

The signals (``Signals``) are per backbone group, input to output: the LogME score of
the group's output and its ``fit`` (the share of the labels' energy that a linear
model on those features explains), the relative gradient norm and the gradient SNR of
full fine-tuning; and ``head_to_backbone``, the head's relative gradient norm over the
backbone's. A candidate is described by its ``PolicyProfile``: the share of each group
that trains over the run, what trains in the first epoch, its FLOPs per step.

The score of a candidate ``p`` that trains a share ``t_i(p)`` of group ``i`` (of ``L``):

- ``deficit = 1 - fit`` at the head's input: how much of the labels the frozen backbone
  leaves unexplained. It is what training the backbone can gain, and ``1 - deficit`` is
  what training it can lose (forgetting, overfitting few labels).
- ``need_i``, summing to 1: where training should go. Half from the gradients (each
  group's relative gradient norm times ``snr / (1 + snr)``, the share of its gradient
  that the batches agree on: Auto-RGN weighted by Auto-SNR), half from the LogME curve
  (the groups after the depth where LogME peaks, when it peaks before the head's
  input: their features fit the target worse than an earlier group's). With no such
  peak, the gradients alone.
- ``score = deficit * sum_i need_i t_i(p)  -  (1 - deficit) * mean_i t_i(p)
  -  HEAD_PENALTY * h * backbone_at_start(p)  -  COMPUTE_PRICE * flops(p) / flops(full)``,
  where ``h`` grows from 0 at a head-to-backbone ratio of ``HEAD_RATIO_LOW`` to 1 at
  ``HEAD_RATIO_HIGH``: training the backbone while a new head's gradients dominate
  distorts its features (Kumar et al., ICLR 2022), so policies that probe first lose
  nothing there.

So a group is worth training when ``deficit * need_i > (1 - deficit) / L``: when the
labels are far from explained and the signals point at it. Nothing here depends on a
task: the constants are round numbers, not fitted.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from freezelab.advise.costs import PolicyProfile
from freezelab.policies import FreezePolicy

# At most this much of the score for training the backbone under a new head's
# gradients: about what probing for a quarter of the run gives up in coverage, so that
# probing first wins where the head's gradients dominate.
HEAD_PENALTY = 0.25
# The head-to-backbone ratio of relative gradient norms where that penalty starts, and
# where it is whole (log-linear in between).
HEAD_RATIO_LOW = 10.0
HEAD_RATIO_HIGH = 100.0
# The price of compute: among candidates the signals cannot tell apart, the cheaper first.
COMPUTE_PRICE = 0.05


@dataclass(frozen=True)
class GroupSignal:
    """One layer group's signals; ``logme`` and ``fit`` are None for the head."""

    name: str
    params: int
    is_head: bool
    logme: float | None
    fit: float | None
    grad_norm: float
    rel_grad_norm: float
    grad_snr: float


@dataclass(frozen=True)
class Signals:
    groups: tuple[GroupSignal, ...]  # backbone groups input to output, then the head
    head_to_backbone: float
    samples: int
    batches: int

    @property
    def backbone(self) -> list[GroupSignal]:
        return [g for g in self.groups if not g.is_head]

    def to_dict(self) -> dict:
        return {
            "groups": [
                {
                    "name": g.name,
                    "params": g.params,
                    "logme": g.logme,
                    "logme_fit": g.fit,
                    "grad_norm": g.grad_norm,
                    "rel_grad_norm": g.rel_grad_norm,
                    "grad_snr": g.grad_snr,
                }
                for g in self.groups
            ],
            "head_to_backbone": self.head_to_backbone,
            "samples": self.samples,
            "gradient_batches": self.batches,
        }


@dataclass(frozen=True)
class Ranked:
    policy: FreezePolicy
    score: float
    reason: str
    trainable_share: float
    flops_per_step: float

    def to_dict(self) -> dict:
        return {
            "policy": self.policy.to_dict(),
            "label": self.policy.label(),
            "score": self.score,
            "reason": self.reason,
            "trainable_share": self.trainable_share,
            "flops_per_step": self.flops_per_step,
        }


def need(signals: Signals) -> dict[str, float]:
    """Where training should go, per backbone group, summing to 1."""
    backbone = signals.backbone
    pulls = [g.rel_grad_norm * g.grad_snr / (1.0 + g.grad_snr) for g in backbone]
    total = sum(pulls)
    by_gradient = [p / total if total > 0 else 1.0 / len(backbone) for p in pulls]
    peak = peak_index(signals)
    after = len(backbone) - 1 - peak
    if after == 0:
        return {g.name: w for g, w in zip(backbone, by_gradient, strict=True)}
    by_features = [1.0 / after if i > peak else 0.0 for i in range(len(backbone))]
    return {g.name: (a + b) / 2 for g, a, b in zip(backbone, by_gradient, by_features, strict=True)}


def peak_index(signals: Signals) -> int:
    """The backbone group whose output has the highest LogME (the latest on a tie)."""
    scores = [-math.inf if g.logme is None else g.logme for g in signals.backbone]
    best = max(scores)
    return max(i for i, s in enumerate(scores) if s == best)


def head_pressure(ratio: float) -> float:
    """0 below ``HEAD_RATIO_LOW``, 1 above ``HEAD_RATIO_HIGH``, log-linear between."""
    if ratio <= HEAD_RATIO_LOW:
        return 0.0
    span = math.log10(HEAD_RATIO_HIGH) - math.log10(HEAD_RATIO_LOW)
    return min(1.0, (math.log10(ratio) - math.log10(HEAD_RATIO_LOW)) / span)


def rank(
    signals: Signals,
    candidates: Sequence[tuple[FreezePolicy, PolicyProfile]],
    full_flops: float,
) -> list[Ranked]:
    """The candidates, best first (a tie keeps the given order)."""
    backbone = signals.backbone
    top = backbone[-1]
    deficit = 1.0 - (top.fit or 0.0)
    weights = need(signals)
    pressure = head_pressure(signals.head_to_backbone)
    ranked = []
    for policy, profile in candidates:
        shares = [profile.group_share.get(g.name, 0.0) for g in backbone]
        covered = sum(weights[g.name] * t for g, t in zip(backbone, shares, strict=True))
        spread = sum(shares) / len(backbone)
        head = HEAD_PENALTY * pressure * profile.backbone_at_start
        compute = COMPUTE_PRICE * profile.flops_per_step / full_flops if full_flops else 0.0
        score = deficit * covered - (1.0 - deficit) * spread - head - compute
        reason = _reason(signals, weights, shares, profile, deficit, pressure, full_flops)
        ranked.append(
            Ranked(policy, score, reason, profile.trainable_share, profile.flops_per_step)
        )
    order = sorted(range(len(ranked)), key=lambda i: (-ranked[i].score, i))
    return [ranked[i] for i in order]


def _reason(
    signals: Signals,
    weights: dict[str, float],
    shares: list[float],
    profile: PolicyProfile,
    deficit: float,
    pressure: float,
    full_flops: float,
) -> str:
    backbone = signals.backbone
    top = backbone[-1]
    fit = f"{top.fit:.0%}" if top.fit is not None else "?"
    trained = [g.name for g, t in zip(backbone, shares, strict=True) if t > 0.01]
    covered = sum(weights[g.name] * t for g, t in zip(backbone, shares, strict=True))
    ratio = signals.head_to_backbone
    compute = f"{profile.flops_per_step / full_flops:.0%} of full's FLOPs" if full_flops else ""
    if not trained:
        if deficit < 0.5:
            return (
                f"the head's input already explains {fit} of the labels (LogME "
                f"{top.logme:.2f}): the head alone, at {compute}"
            )
        return (
            f"the head's input explains only {fit} of the labels (LogME {top.logme:.2f}): "
            "a head alone cannot learn the rest"
        )
    peak = peak_index(signals)
    after = [g.name for g in backbone[peak + 1 :]]
    if after and trained == after:
        text = (
            f"features at {backbone[peak].name} already separate the classes best (LogME "
            f"{backbone[peak].logme:.2f}, {top.logme:.2f} at the head's input): train "
            f"{_span(after)} and the head"
        )
    else:
        strongest = max(backbone, key=lambda g: weights[g.name])
        text = (
            f"{1 - (top.fit or 0):.0%} of the labels unexplained at the head's input; trains "
            f"{_span(trained)}, {covered:.0%} of where training is needed (most: "
            f"{strongest.name})"
        )
    if pressure > 0 and profile.backbone_at_start > 0:
        text += f"; the head's gradients are {ratio:.0f}x the backbone's: probe first (lp_ft)"
    elif ratio > HEAD_RATIO_LOW and profile.backbone_at_start == 0:
        text += f"; probes first while the head's gradients are {ratio:.0f}x the backbone's"
    return text


def _span(names: list[str]) -> str:
    return names[0] if len(names) == 1 else f"{names[0]}..{names[-1]}"
