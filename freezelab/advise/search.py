"""``freezelab advise`` as a budgeted search: each candidate policy is fine-tuned briefly,
at a few learning rates, and the ranking comes from those runs, with intervals.

Zero-cost signals do not rank freeze policies (issue 31; BENCHMARKS section 10: the
rules' ranking ran against fine-tuning's, Spearman -0.94 and -0.71). What ranks
candidates is training them, briefly: the design, settled before its benchmark ran.

1. **The budget.** ``budget`` (default 10%) is a share of the FLOPs of the study that
   advise stands in for, counted from each candidate's plans as the loop counts a step
   (``costs.policy_profile``): every candidate at its own rate on the whole training
   set for the config's ``epochs``, ``REFERENCE_SEEDS`` seeds, plus the one selection
   run per candidate that a study's rate selection always trains to the end. That is
   the least a study of the same candidates costs, so advise's share of any such
   study is at most ``budget``.
2. **Short runs that keep the schedule.** Every search run trains the config's whole
   epoch schedule (a policy's phases, the LR schedule), each epoch on a fresh random
   ``epoch_fraction`` of the training images (``data.epoch_fraction``), the largest
   fraction the budget affords for the worst case of the stages below.
3. **Search** (stage 1): each candidate at each rate of ``rates`` (default the
   config's rate x 0.2, 1, 5), one seed, with successive halving within each candidate
   (``GroupedASHA``: a rate is compared with the candidate's other rates, never with
   another policy, whose schedule may start slowly), and a cap on each candidate's
   epochs (``group_epochs``) that holds the budget whatever the order of the trials.
   Each candidate's rate: its run that trained every epoch with the best last val_acc,
   not diverged (the study's ``choose``).
4. **Confirm** (stage 2): the ``survivors`` best candidates (by that val_acc) train
   again at their rate under ``confirm_seeds`` more seeds. Their score is the mean
   last-epoch val_acc of their runs with a 95% interval; the others keep their single
   search run's val_acc, ranked below the survivors.
5. **The verdict's uncertainty**: the survivors whose difference from the winner has an
   interval holding 0 (Welch's t, ``freezelab.stats``) cannot be told apart from it.

Nothing here runs: ``plan_search`` sizes the stages, ``rank_candidates`` ranks the runs'
results; ``freezelab.advise_run`` runs the stages as Ray Tune trials.

>>> plan = SearchPlan.example()
>>> plan.group_epochs, plan.stage2_runs
(18, 6)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from freezelab.errors import FreezelabError
from freezelab.policies import FreezePolicy
from freezelab.stats import difference, summarize

DEFAULT_BUDGET = 0.1
# The study advise stands in for: each candidate under this many seeds (the demo's).
REFERENCE_SEEDS = 3
RATE_FACTORS = (0.2, 1.0, 5.0)
SURVIVORS = 3
CONFIRM_SEEDS = 2  # with the search run, 3 runs per survivor: a t interval of 2 dof
REDUCTION_FACTOR = 3.0


class AdviseError(FreezelabError, ValueError):
    """What advise cannot work with: a budget too small, no candidate, bad rates."""


@dataclass(frozen=True)
class SearchPlan:
    """How the search runs, sized to the budget before anything trains."""

    rates: tuple[float, ...]
    epochs: int
    grace_epochs: int
    group_epochs: int  # the most epochs one candidate's search runs train in all
    survivors: int
    confirm_seeds: int
    epoch_fraction: float  # of the training images, each epoch (1.0: all)
    images_per_epoch: int
    train_images: int
    budget: float
    reference_flops: float
    planned_flops: float  # the worst case of both stages: at most budget x reference
    candidates: int
    stage2_runs: int = field(default=0)

    @classmethod
    def example(cls) -> SearchPlan:
        return cls((0.002, 0.01, 0.05), 8, 2, 18, 3, 2, 0.5, 50, 100, 0.1, 1.0, 0.1, 6, 6)

    def to_dict(self) -> dict[str, Any]:
        return {
            "rates": list(self.rates),
            "epochs": self.epochs,
            "grace_epochs": self.grace_epochs,
            "epochs_per_candidate": self.group_epochs,
            "survivors": self.survivors,
            "confirm_seeds": self.confirm_seeds,
            "epoch_fraction": self.epoch_fraction,
            "images_per_epoch": self.images_per_epoch,
            "train_images": self.train_images,
            "budget": self.budget,
            "reference_flops": self.reference_flops,
            "planned_flops": self.planned_flops,
        }

    def describe(self) -> str:
        rates = ", ".join(f"{r:g}" for r in self.rates)
        return (
            f"{self.candidates} candidates x rates {{{rates}}}, {self.epochs} epochs of "
            f"{self.images_per_epoch} of the {self.train_images} training images each "
            f"({self.epoch_fraction:.0%}); successive halving within each candidate, at most "
            f"{self.group_epochs} epochs each; then the best {self.survivors} under "
            f"{self.confirm_seeds} more seeds. Planned at most {self.planned_flops:.3g} FLOPs, "
            f"{self.planned_flops / self.reference_flops:.1%} of a {REFERENCE_SEEDS}-seed "
            f"study's {self.reference_flops:.3g} (budget {self.budget:.0%})"
        )


def default_rates(lr: float) -> tuple[float, ...]:
    """The config's rate, a fifth of it and five times it (the study's demo grid is
    0.01 x the same factors)."""
    return tuple(float(f"{lr * f:.6g}") for f in RATE_FACTORS)


def plan_search(
    step_flops: Sequence[float],
    *,
    train_images: int,
    batch_size: int,
    epochs: int,
    classes: int,
    rates: Sequence[float],
    budget: float = DEFAULT_BUDGET,
    survivors: int = SURVIVORS,
    confirm_seeds: int = CONFIRM_SEEDS,
) -> SearchPlan:
    """The largest share of the training images per epoch whose worst case fits
    ``budget`` x the reference study's FLOPs (``step_flops``: each candidate's FLOPs per
    training step at ``batch_size``). Raises ``AdviseError`` when the budget cannot give
    each epoch one image per class."""
    if not 0 < budget <= 1:
        raise AdviseError(f"--budget {budget}: give a share of the study's FLOPs in (0, 1]")
    if len(rates) < 1 or any(not r > 0 for r in rates):
        raise AdviseError(f"--rates {list(rates)}: give positive learning rates")
    if not step_flops:
        raise AdviseError("no candidate policy to rank")
    count = len(step_flops)
    survivors = min(survivors, count)
    grace = max(1, epochs // 4)
    # Each candidate: one rate to the end, a second promoted to the end, the rest to
    # the first rung. Past the cap a trial stops at its next report, so each of the
    # other rates adds at most the epoch it is in (or starts); and while no rate has
    # reached the end, the most advanced one goes on (``GroupedASHA``), having trained
    # at least the cap shared among the rates.
    count_rates = len(rates)
    full_runs = 2 if count_rates > 1 else 1
    group_epochs = min(count_rates * epochs, full_runs * epochs + (count_rates - full_runs) * grace)
    spared = max(0, epochs - math.ceil(group_epochs / count_rates))
    charged = min(count_rates * epochs, group_epochs + (count_rates - 1) + spared)
    costliest = sorted(step_flops, reverse=True)[:survivors]

    def steps(images: int) -> float:
        # As the loop counts: a step's FLOPs (of the epoch's first batch, which is full
        # unless the epoch is shorter than a batch) times the epoch's steps.
        return -(-images // batch_size) * min(images, batch_size) / batch_size

    def worst_case(images: int) -> float:
        search = charged * steps(images) * sum(step_flops)
        confirm = confirm_seeds * epochs * steps(images) * sum(costliest)
        return search + confirm

    reference = (REFERENCE_SEEDS + 1) * epochs * steps(train_images) * sum(step_flops)
    allowed = budget * reference
    images = train_images
    while images > classes and worst_case(images) > allowed:
        images -= 1
    if worst_case(images) > allowed:
        needed = worst_case(classes) / reference
        raise AdviseError(
            f"--budget {budget:g}: the search cannot train one image per class per epoch "
            f"({classes}) within {budget:.0%} of a {REFERENCE_SEEDS}-seed study's FLOPs; "
            f"give --budget {math.ceil(needed * 100) / 100:g} or more, fewer --rates or "
            "fewer candidates"
        )
    return SearchPlan(
        rates=tuple(rates),
        epochs=epochs,
        grace_epochs=grace,
        group_epochs=group_epochs,
        survivors=survivors,
        confirm_seeds=confirm_seeds,
        epoch_fraction=images / train_images,
        images_per_epoch=images,
        train_images=train_images,
        budget=budget,
        reference_flops=reference,
        planned_flops=worst_case(images),
        candidates=count,
        stage2_runs=survivors * confirm_seeds,
    )


@dataclass
class Ranked:
    """A candidate as the search left it: its rate, its runs' last val_acc (diverged
    runs left out and named), the stage it reached."""

    policy: FreezePolicy
    lr: float | None
    values: list[float]
    stage: str  # "confirmed" (survivor, several seeds), "searched" (one run), "none"
    tried: list[dict[str, Any]]  # each rate's search run: lr, epochs, val_acc, note
    diverged: list[str] = field(default_factory=list)
    flops: float = 0.0
    note: str = ""

    @property
    def score(self) -> float:
        return sum(self.values) / len(self.values) if self.values else math.nan

    def interval(self) -> tuple[float | None, float | None]:
        if len(self.values) < 2:
            return None, None
        s = summarize(self.values)
        return s.ci95_low, s.ci95_high

    def to_dict(self) -> dict[str, Any]:
        low, high = self.interval()
        return {
            "policy": self.policy.to_dict(),
            "label": self.policy.label(),
            "lr": self.lr,
            "val_acc": None if math.isnan(self.score) else self.score,
            "ci95_low": low,
            "ci95_high": high,
            "runs": len(self.values),
            "values": self.values,
            "stage": self.stage,
            "tried": self.tried,
            "diverged": self.diverged,
            "flops": self.flops,
            "note": self.note,
        }


def survivors_of(chosen: dict[str, Ranked], count: int) -> list[str]:
    """The ``count`` candidates with the best search val_acc (a tie: the cheaper)."""
    healthy = [k for k, r in chosen.items() if r.values]
    return sorted(healthy, key=lambda k: (-chosen[k].score, chosen[k].flops))[:count]


def rank_candidates(chosen: dict[str, Ranked]) -> list[Ranked]:
    """Confirmed candidates first, by mean val_acc, then those searched only, by their
    one run, then those with no healthy run (a tie: the cheaper first)."""
    order = {"confirmed": 0, "searched": 1, "none": 2}
    return sorted(
        chosen.values(),
        key=lambda r: (order[r.stage], -(r.score if r.values else -math.inf), r.flops),
    )


def tied_with_winner(ranking: list[Ranked]) -> list[Ranked]:
    """The winner and the confirmed candidates whose difference from it has a 95%
    interval that holds 0: the runs cannot tell them apart."""
    winner = ranking[0]
    tied = [winner]
    for other in ranking[1:]:
        if other.stage != "confirmed" or winner.stage != "confirmed":
            continue
        found = difference(winner.values, other.values)
        if found.settled is False or found.settled is None:
            tied.append(other)
    return tied
