"""What the pretrained model says about the target before any fine-tuning, per layer
group: explanations reported beside advise's ranking, never its judge.

The signals, per backbone group input to output, then the head:

- ``logme`` and ``fit``: how well a linear model on the group's output explains the
  labels (LogME's evidence per sample; the held-out share of the labels' variance).
- ``grad_norm``, ``rel_grad_norm``, ``grad_snr``: where full fine-tuning's loss pulls,
  measured once the head fits the frozen features (a random new head's gradient
  dominates otherwise), and how much the batches agree on it.
- ``bn_shift`` and ``bn_log_var_ratio``: how far the target's statistics at the
  group's BatchNorm layers are from the pretrained running statistics (None without
  BatchNorm); see ``bn_shift``.

and for the model: ``head_train_accuracy`` (the fitted head on the sample) and
``head_to_backbone``, the head's relative gradient norm over the backbone's.

>>> signals = Signals(
...     (GroupSignal("stem", 10, False, -0.5, 0.4, 1.0, 0.1, 2.0, 0.8, 0.3),
...      GroupSignal("head", 4, True, None, None, 0.5, 0.2, 1.0)),
...     head_to_backbone=2.0, samples=64, batches=4, head_train_accuracy=0.75)
>>> signals.to_dict()["groups"][0]["bn_shift"], signals.to_dict()["head_train_accuracy"]
(0.8, 0.75)
>>> print(signals.format_text().splitlines()[0])
signals on 64 training images (4 gradient batches); the head fitted on them has train accuracy 75.0%
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from freezelab.console import Column, format_table

# What each column means, printed under the table: the signals explain, the ranking decides.
MEANINGS = (
    "LogME: evidence that a linear model on the group's output explains the labels "
    "(per sample; higher is better; compare groups, not tasks)",
    "fit: share of the labels' variance that a linear model on the group's output "
    "predicts for images it has not seen (0: no better than the class frequencies)",
    "rel grad norm: full fine-tuning's gradient over the group's weight norm, with the "
    "head fitted first: where the loss pulls hardest",
    "grad SNR: how much the gradient batches agree on that direction (near 0: mostly noise)",
    "BN shift: the target's mean at the group's BatchNorm layers, in pretrained standard "
    "deviations from the pretrained mean (0: the source's statistics; - : no BatchNorm)",
    "BN log var: |log| of the target's variance over the pretrained one at those layers",
    "head/backbone: the fitted head's relative gradient norm over the backbone's; far "
    "above 1, the head still has most to learn",
)


@dataclass(frozen=True)
class GroupSignal:
    """One layer group's signals; ``logme`` and ``fit`` are None for the head,
    ``bn_shift`` and ``bn_log_var_ratio`` for a group without BatchNorm (and the head)."""

    name: str
    params: int
    is_head: bool
    logme: float | None
    fit: float | None
    grad_norm: float
    rel_grad_norm: float
    grad_snr: float
    bn_shift: float | None = None
    bn_log_var_ratio: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "params": self.params,
            "is_head": self.is_head,
            "logme": self.logme,
            "logme_fit": self.fit,
            "grad_norm": self.grad_norm,
            "rel_grad_norm": self.rel_grad_norm,
            "grad_snr": self.grad_snr,
            "bn_shift": self.bn_shift,
            "bn_log_var_ratio": self.bn_log_var_ratio,
        }


@dataclass(frozen=True)
class Signals:
    groups: tuple[GroupSignal, ...]  # backbone groups input to output, then the head
    head_to_backbone: float  # after the head was fitted
    samples: int
    batches: int
    head_train_accuracy: float | None = None  # None: the head was not fitted

    @property
    def backbone(self) -> list[GroupSignal]:
        return [g for g in self.groups if not g.is_head]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: floats, ints, strings, booleans and None only."""
        return {
            "groups": [{k: _finite(v) for k, v in g.to_dict().items()} for g in self.groups],
            # Infinite when the backbone gets no gradient: JSON has no infinity.
            "head_to_backbone": _finite(self.head_to_backbone),
            "head_train_accuracy": self.head_train_accuracy,
            "samples": self.samples,
            "gradient_batches": self.batches,
        }

    def format_text(self) -> str:
        """A header, the table of signals per group, and what each signal means."""
        columns = [
            Column("name", "group"),
            Column("params", fmt="{:,}"),
            Column("logme", "LogME", fmt="{:.3f}"),
            Column("logme_fit", "fit", fmt="{:.0%}"),
            Column("rel_grad_norm", "rel grad norm", fmt="{:.2e}"),
            Column("grad_snr", "grad SNR", fmt="{:.3f}"),
            Column("bn_shift", "BN shift", fmt="{:.2f}"),
            Column("bn_log_var_ratio", "BN log var", fmt="{:.2f}"),
        ]
        accuracy = (
            "the head was not fitted"
            if self.head_train_accuracy is None
            else f"the head fitted on them has train accuracy {self.head_train_accuracy:.1%}"
        )
        return "\n".join(
            [
                f"signals on {self.samples:,} training images ({self.batches} gradient "
                f"batches); {accuracy}",
                f"then the head's gradients are {self.head_to_backbone:.2g}x the backbone's "
                "(relative norms)",
                format_table([g.to_dict() for g in self.groups], columns),
                "",
                "what they mean (they explain; they do not rank):",
                *(f"  {line}" for line in MEANINGS),
            ]
        )


def _finite(value: Any) -> Any:
    """``value``, or None where it is a float that JSON cannot hold (NaN, infinity)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
