"""A registered winner says what the evidence supports: whether its runs separate it
from every other policy (Welch's 95% interval of the difference excludes 0), or which
policies it cannot be told apart from.

A study's or a sweep's ``register_best_as`` registers the winner through
``register_winner``: the model version carries the verdict as tags
(``freezelab.separated``, ``freezelab.tied_with``) and a description in words, and a
winner that nothing separates is announced on the console.

>>> verdict([0.80, 0.82, 0.81], {"head_only": [0.70, 0.74, 0.72]}, "val_acc").separated
True
>>> verdict([0.81], {"head_only": [0.72]}, "val_acc").reason
'n=1: no interval, nothing separates it from head_only.'
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

from freezelab.stats import Difference, difference, summarize, with_interval

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Verdict:
    """``separated``: the winner is ahead of every other policy by more than the 95%
    interval of the difference; ``tied_with``: the policies it is not told apart from;
    ``reason``: one sentence that says which, with the numbers."""

    separated: bool
    tied_with: tuple[str, ...]
    reason: str


def verdict(winner: Sequence[float], others: dict[str, Sequence[float]], metric: str) -> Verdict:
    """The verdict on a winner's values of ``metric`` (one per run of its setting)
    against each other policy's (its best setting's values, by policy label). The
    numbers in the reason are the winner's lead, mean minus mean, and its interval."""
    if not others:
        return Verdict(True, (), "The only policy compared: no other policy to separate it from.")
    found = {label: difference(winner, values) for label, values in others.items()}
    tied = tuple(label for label, d in found.items() if d.settled is not True)
    if not tied:
        label, closest = min(found.items(), key=lambda item: abs(item[1].delta))
        return Verdict(
            True,
            (),
            "Separated from every other policy: the 95% interval of its lead in "
            f"{metric} excludes 0 (against the runner-up {label}: {_lead(closest)}).",
        )
    if len(winner) == 1:
        return Verdict(
            False, tied, f"n=1: no interval, nothing separates it from {', '.join(tied)}."
        )
    why = []
    if any(found[label].settled is False for label in tied):
        why.append(f"the 95% interval of its lead in {metric} holds 0")
    if any(found[label].settled is None for label in tied):
        why.append("a single run gives no interval")
    leads = "; ".join(f"against {label}: {_lead(found[label])}" for label in tied)
    return Verdict(
        False,
        tied,
        f"Not told apart from {', '.join(tied)} by these runs: {', or '.join(why)} ({leads}).",
    )


def _lead(found: Difference) -> str:
    if found.settled is None:
        return f"{found.delta:+.4f}, no interval"
    return f"{found.delta:+.4f}, interval [{found.ci95_low:+.4f}, {found.ci95_high:+.4f}]"


def register_winner(
    tracking_uri: str,
    model_uri: str,
    name: str,
    alias: str,
    *,
    chosen_by: str,
    policy: str,
    setting: str,
    variant: str,
    metric: str,
    values: Sequence[float],
    others: dict[str, Sequence[float]],
    study: str = "",
) -> str:
    """Register ``model_uri`` as ``name`` (alias ``alias``) with the verdict of its
    setting (``values`` of ``metric``) against ``others``: tags ``freezelab.policy``,
    ``freezelab.variant``, ``freezelab.verdict`` (the metric with its interval),
    ``freezelab.chosen_by``, ``freezelab.study`` (a study's id, when ``study``),
    ``freezelab.separated`` (and ``freezelab.tied_with``), and a description that names
    the policy, the variant, the metric with its interval and ``chosen_by``
    (``"study NAME"``, ``"sweep NAME"``). Returns the version."""
    from freezelab.mlflow.models import register, registry_client

    found = verdict(values, others, metric)
    stats = summarize(values)
    shown = f"{policy} [{setting}]" if setting else policy
    measured = f"{metric} {with_interval(stats.mean, stats.ci95_low, stats.ci95_high, stats.n)}"
    description = (
        f"The winner of {chosen_by}: policy {shown}, variant {variant or '-'}, {measured}. "
        f"{found.reason}"
    )
    version = register(tracking_uri, model_uri, name, alias)
    client = registry_client(tracking_uri)
    tags = {
        "freezelab.policy": policy,
        "freezelab.variant": variant or "-",
        "freezelab.verdict": measured,
        "freezelab.chosen_by": chosen_by,
        "freezelab.separated": str(found.separated).lower(),
    }
    if setting:
        tags["freezelab.setting"] = setting
    if study:
        tags["freezelab.study"] = study
    if not found.separated:
        tags["freezelab.tied_with"] = ", ".join(found.tied_with)
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, value)
    client.update_model_version(name, version, description=description)
    if found.separated:
        log.info(f"{name} version {version} ({shown}): {found.reason}")
    else:
        log.warning(f"{name} version {version} ({shown}) is registered, but: {found.reason}")
    return version
