"""A shim while ``advice`` still imports from here: the ranking rules are gone (the
benchmark refuted them), ``Signals`` and ``GroupSignal`` live in ``signals``. Delete
this module once ``advice`` ranks by the search.
"""

from __future__ import annotations

from dataclasses import dataclass

from freezelab.advise.signals import GroupSignal, Signals
from freezelab.policies import FreezePolicy

__all__ = ["GroupSignal", "Ranked", "Signals"]


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
