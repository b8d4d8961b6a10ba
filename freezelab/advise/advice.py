"""What ``freezelab advise`` hands back: the recommended policy and learning rate, the
ranking with intervals, the candidates it cannot tell apart from the winner, the budget
spent, and the signals that explain the ranking, as one JSON-ready object or as text.

>>> from freezelab.advise.search import Ranked, SearchPlan
>>> from freezelab.policies import from_dict
>>> best = Ranked(from_dict({"type": "full"}), 0.01, [0.9, 0.92, 0.91], "confirmed", [])
>>> advice = Advice("test_resnet", [best], [best], SearchPlan.example(), 0.05, None, 1.0, 1.0, 9)
>>> print(advice.recommended_yaml())
policy:
  type: full
optimizer:
  lr: 0.01
<BLANKLINE>
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import yaml

from freezelab.advise.search import Ranked, SearchPlan
from freezelab.console import Column, format_table

# A tie with the winner this large says "run the study": advise names these.
WORTH_A_STUDY = 2


@dataclass(frozen=True)
class Advice:
    model: str
    ranking: list[Ranked]
    tied: list[Ranked]  # the winner and those the runs cannot tell apart from it
    plan: SearchPlan
    spent_flops: float  # what the search's runs trained, as the loop counted it
    signals: Any  # freezelab.advise.signals.Signals, or None
    search_s: float
    time_s: float
    runs: int

    @property
    def recommended(self) -> Ranked:
        return self.ranking[0]

    def recommended_policy(self) -> dict[str, Any]:
        """The recommended policy's mapping, with only the fields that differ from
        their defaults: what a train config's ``policy:`` needs."""
        policy = self.recommended.policy
        return {"type": policy.type, **policy.model_dump(mode="json", exclude_defaults=True)}

    def recommended_yaml(self) -> str:
        """``policy: ...`` and its learning rate as YAML, ready to paste into a config."""
        data: dict[str, Any] = {"policy": self.recommended_policy()}
        if self.recommended.lr is not None:
            data["optimizer"] = {"lr": self.recommended.lr}
        return yaml.safe_dump(data, sort_keys=False)

    def budget(self) -> dict[str, Any]:
        return {
            **self.plan.to_dict(),
            "spent_flops": self.spent_flops,
            "spent_share": self.spent_flops / self.plan.reference_flops,
            "runs": self.runs,
            "search_s": self.search_s,
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "recommended": self.recommended_policy(),
            "recommended_lr": self.recommended.lr,
            "ranking": [r.to_dict() for r in self.ranking],
            "tied_with_winner": [r.policy.label() for r in self.tied],
            "worth_a_study": [r.policy.label() for r in self.worth_a_study()],
            "budget": self.budget(),
            "signals": self.signals.to_dict() if self.signals is not None else None,
            "time_s": self.time_s,
        }

    def worth_a_study(self) -> list[Ranked]:
        """Where the winner has company: the two or three policies worth a full study."""
        return self.tied[:3] if len(self.tied) >= WORTH_A_STUDY else []

    def verdict(self) -> str:
        """How sure advise is, in a sentence."""
        best = self.recommended
        if best.stage != "confirmed":
            return (
                f"{best.policy.label()} leads, but no candidate finished its confirmation runs: "
                "no interval"
            )
        if len(self.tied) == 1:
            return (
                f"{best.policy.label()} at lr={best.lr:g} is ahead of every other confirmed "
                "candidate by more than the 95% interval of the difference"
            )
        names = ", ".join(r.policy.label() for r in self.worth_a_study())
        return (
            f"the runs cannot tell {len(self.tied)} candidates apart (95% interval of the "
            f"difference holds 0): worth a full study of {names} "
            "(freezelab demo --config study.yaml)"
        )

    def format_text(self) -> str:
        """The ranking, how sure it is, the budget, the signals, the recommendation."""
        rows = []
        for i, r in enumerate(self.ranking, 1):
            low, high = r.interval()
            rows.append(
                {
                    "rank": i,
                    "label": r.policy.label(),
                    "lr": r.lr,
                    "val_acc": r.score,
                    "half": None if low is None else (high - low) / 2,
                    "runs": len(r.values),
                    "stage": r.stage,
                    "gflops": r.flops / 1e9,
                    "tried": "  ".join(
                        f"{t['lr']:g}: {_acc(t['val_acc'])}@{t['epochs']}" for t in r.tried
                    ),
                    "notes": "; ".join(r.diverged) or r.note,
                }
            )
        columns = [
            Column("rank"),
            Column("label", "policy", max_width=32),
            Column("lr", fmt=lambda v: "-" if v is None else f"{v:g}"),
            Column("val_acc", fmt=lambda v: "-" if v != v else f"{v:.3f}"),
            Column("half", "±95%", fmt=lambda v: "" if v is None else f"{v:.3f}"),
            Column("runs"),
            Column("stage"),
            Column("gflops", "GFLOP", fmt="{:.3g}"),
            Column("tried", "rate: val_acc@epochs"),
            Column("notes"),
        ]
        budget = self.budget()
        lines = [
            f"advise: {self.model}, {self.runs} short runs ({self.plan.describe()})",
            "",
            "candidates, best first (val_acc: the last epoch's, mean over the runs at the "
            "candidate's rate):",
            format_table(rows, columns),
            "",
            self.verdict() + ".",
            f"spent {self.spent_flops:.3g} training FLOPs, {budget['spent_share']:.1%} of the "
            f"reference study's ({self.search_s:.0f} s of search)",
        ]
        if self.signals is not None:
            lines += ["", "signals (they explain the ranking; they do not make it):"]
            lines.append(self.signals.format_text())
        lines += [
            "",
            f"recommended (advise took {self.time_s:.0f} s); paste into a train config:",
            self.recommended_yaml().rstrip(),
        ]
        return "\n".join(lines)


def _acc(value: float) -> str:
    return "-" if value is None or math.isnan(value) else f"{value:.3f}"
