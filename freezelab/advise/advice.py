"""What ``freezelab advise`` hands back: the recommended policy, the ranking with a
reason and a cost per candidate, and the signals, as one JSON-ready object or as text.

>>> from freezelab.advise.rules import GroupSignal, Ranked, Signals
>>> from freezelab.policies import from_dict
>>> signals = Signals((GroupSignal("stem", 10, False, -0.5, 0.4, 1.0, 0.1, 2.0),), 3.0, 64, 4)
>>> advice = Advice("test_resnet", signals, [Ranked(from_dict({"type": "full"}), 0.2, "...", 1.0, 1e6)], 1.5, 1e6)
>>> print(advice.recommended_yaml())
policy:
  type: full
<BLANKLINE>
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import yaml

from freezelab.advise.rules import Ranked, Signals
from freezelab.console import Column, format_table
from freezelab.policies import FreezePolicy


@dataclass(frozen=True)
class Advice:
    model: str
    signals: Signals
    ranking: list[Ranked]
    time_s: float
    full_flops_per_step: float

    @property
    def recommended(self) -> FreezePolicy:
        return self.ranking[0].policy

    def recommended_policy(self) -> dict[str, Any]:
        """The recommended policy's mapping, with only the fields that differ from
        their defaults: what a train config's ``policy:`` needs."""
        policy = self.recommended
        return {"type": policy.type, **policy.model_dump(mode="json", exclude_defaults=True)}

    def recommended_yaml(self) -> str:
        """``policy: ...`` as YAML, ready to paste into a train config."""
        return yaml.safe_dump({"policy": self.recommended_policy()}, sort_keys=False)

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "recommended": self.recommended_policy(),
            "ranking": [r.to_dict() for r in self.ranking],
            "signals": self.signals.to_dict(),
            "time_s": self.time_s,
            "full_flops_per_step": self.full_flops_per_step,
        }

    def format_text(self) -> str:
        """The signals per group, the ranking, and the recommended policy as YAML."""
        groups = self.signals.to_dict()["groups"]
        signal_columns = [
            Column("name", "group"),
            Column("params", fmt="{:,}"),
            Column("logme", "LogME", fmt="{:.3f}"),
            Column("logme_fit", "fit", fmt="{:.0%}"),
            Column("rel_grad_norm", "rel grad norm", fmt="{:.2e}"),
            Column("grad_snr", "grad SNR", fmt="{:.3f}"),
        ]
        rows = [
            {"rank": i, **r.to_dict(), "gflops": r.flops_per_step / 1e9}
            for i, r in enumerate(self.ranking, 1)
        ]
        ranking_columns = [
            Column("rank"),
            Column("label", "policy", max_width=32),
            Column("score", fmt="{:+.3f}"),
            Column("trainable_share", "trainable", fmt="{:.1%}"),
            Column("gflops", "GFLOP/step", fmt="{:.3g}"),
            Column("reason"),
        ]
        s = self.signals
        return "\n".join(
            [
                f"signals of {self.model} on {s.samples:,} training images ({s.batches} "
                f"gradient batches); the head's gradients are {s.head_to_backbone:.1f}x the "
                "backbone's (relative norms)",
                format_table(groups, signal_columns),
                "",
                "candidate policies, best first:",
                format_table(rows, ranking_columns),
                "",
                f"recommended (advise took {self.time_s:.1f} s); paste into a train config:",
                self.recommended_yaml().rstrip(),
            ]
        )
