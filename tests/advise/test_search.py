"""advise's search, sized and ranked without training: the plan holds the budget in its
worst case, a larger budget buys more images, a budget too small is one line; the
ranking puts confirmed candidates first and says which it cannot tell apart."""

from __future__ import annotations

import math

import pytest

from freezelab.advise.search import (
    REFERENCE_SEEDS,
    AdviseError,
    Ranked,
    default_rates,
    plan_search,
    rank_candidates,
    survivors_of,
    tied_with_winner,
)
from freezelab.policies import from_dict

# Six candidates' FLOPs per step: a frozen backbone costs less than a trained one.
STEPS = [1.0e9, 3.0e9, 2.0e9, 2.5e9, 2.8e9, 3.0e9]
DEMO = {"train_images": 100, "batch_size": 16, "epochs": 8, "classes": 5}


def _plan(**kw):
    return plan_search(STEPS, **{**DEMO, "rates": (0.002, 0.01, 0.05), **kw})


def _worst_case(plan) -> float:
    """The most the two stages can train, recounted here from the plan's sizes: every
    candidate's search epochs at their cap, plus one epoch of each other rate past it and
    the rest of the spared rate (it has trained at least 18 / 3 = 6 of its 8 epochs), and
    the costliest survivors' confirmation runs, each epoch as the loop counts it."""
    images, batch = plan.images_per_epoch, DEMO["batch_size"]
    counted_steps = -(-images // batch) * min(images, batch) / batch
    charged = min(len(plan.rates) * plan.epochs, plan.group_epochs + 2 + (8 - 6))
    confirm = plan.confirm_seeds * plan.epochs * sum(sorted(STEPS)[-plan.survivors :])
    return counted_steps * (charged * sum(STEPS) + confirm)


@pytest.mark.parametrize("budget", [0.1, 0.2, 0.5])
def test_the_plan_holds_the_budget_in_its_worst_case(budget):
    plan = _plan(budget=budget)
    reference = (REFERENCE_SEEDS + 1) * DEMO["epochs"] * (100 / 16) * sum(STEPS)
    # 100 images: 6 full steps and one of 4 images, counted as a full step by the loop.
    assert plan.reference_flops == pytest.approx(7 / (100 / 16) * reference)
    assert plan.planned_flops == pytest.approx(_worst_case(plan))
    assert plan.planned_flops <= budget * plan.reference_flops
    assert plan.epoch_fraction == plan.images_per_epoch / 100


def test_a_larger_budget_buys_more_images_per_epoch():
    sizes = [_plan(budget=b).images_per_epoch for b in (0.1, 0.2, 0.5, 1.0)]
    assert sizes == sorted(sizes) and sizes[0] < sizes[-1]
    assert _plan(budget=1.0).images_per_epoch == 100  # the whole set fits: no subsample


def test_each_candidate_trains_at_most_two_rates_to_the_end():
    plan = _plan(budget=0.5)
    # One rate to the end, one promoted to the end, the third to the first rung (2).
    assert (plan.epochs, plan.grace_epochs, plan.group_epochs) == (8, 2, 18)
    assert plan.survivors == 3 and plan.stage2_runs == 6


@pytest.mark.parametrize(
    "kw, needle",
    [
        ({"budget": 0.01}, "--budget 0.01: the search cannot train one image per class"),
        ({"budget": 0}, "--budget 0: give a share"),
        ({"budget": 1.5}, "--budget 1.5: give a share"),
        ({"rates": (0.01, -1.0)}, "--rates [0.01, -1.0]: give positive"),
    ],
)
def test_what_cannot_be_planned_is_one_line(kw, needle):
    with pytest.raises(AdviseError) as found:
        _plan(**kw)
    message = str(found.value)
    assert needle in message and "\n" not in message
    if "one image per class" in needle:
        # It names the budget that would do.
        needed = float(message.split("give --budget ")[1].split()[0])
        assert _plan(budget=needed).images_per_epoch >= DEMO["classes"]


def test_default_rates_surround_the_configs():
    assert default_rates(0.01) == (0.002, 0.01, 0.05)


POLICIES = {
    "full": {"type": "full"},
    "head_only": {"type": "head_only"},
    "last_n": {"type": "last_n", "n": 1},
    "lp_ft": {"type": "lp_ft", "probe_epochs": 1},
    "gradual": {"type": "gradual", "every": 1},
}


def _ranked(name: str, values, stage="confirmed", flops=1.0) -> Ranked:
    return Ranked(from_dict(POLICIES[name]), 0.01, list(values), stage, [], flops=flops)


def test_confirmed_candidates_rank_first_then_searched_then_broken():
    chosen = {
        "a": _ranked("head_only", [0.95], stage="searched"),  # one lucky run
        "b": _ranked("full", [0.90, 0.91, 0.92]),
        "c": _ranked("last_n", [], stage="none"),
        "d": _ranked("lp_ft", [0.80, 0.82, 0.81]),
    }
    order = [r.policy.type for r in rank_candidates(chosen)]
    assert order == ["full", "lp_ft", "head_only", "last_n"]


def test_the_survivors_are_the_best_searched_the_cheaper_on_a_tie():
    chosen = {
        "a": _ranked("head_only", [0.9], stage="searched", flops=1.0),
        "b": _ranked("full", [0.9], stage="searched", flops=3.0),
        "c": _ranked("lp_ft", [0.7], stage="searched"),
        "d": _ranked("gradual", [], stage="none"),
    }
    assert survivors_of(chosen, 2) == ["a", "b"]
    assert survivors_of(chosen, 5) == ["a", "b", "c"]  # a candidate with no run never


def test_the_tie_holds_those_whose_difference_interval_holds_zero():
    ranking = [
        _ranked("full", [0.90, 0.92, 0.91]),
        _ranked("lp_ft", [0.89, 0.93, 0.90]),  # overlapping: not told apart
        _ranked("head_only", [0.60, 0.61, 0.62]),  # far behind
        _ranked("gradual", [0.99], stage="searched"),  # no interval: not in the tie
    ]
    tied = tied_with_winner(ranking)
    assert [r.policy.type for r in tied] == ["full", "lp_ft"]
    low, high = ranking[0].interval()
    assert low < ranking[0].score < high
    assert ranking[3].interval() == (None, None)
    assert math.isnan(_ranked("full", [], stage="none").score)
