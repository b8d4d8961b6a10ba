"""The policies that ``freezelab advise`` ranks when the config names none: concrete,
group-based policies that the signals speak to, each validated against the model for
every epoch of the run, without two of the same plan.

>>> import timm
>>> model = timm.create_model("test_resnet", num_classes=3)
>>> [p.label() for p in default_candidates(model, epochs=8)][:4]
['head_only', 'full', 'last_n(n=1)', 'last_n(n=2)']
"""

from __future__ import annotations

from collections.abc import Iterable

import torch.nn as nn

from freezelab.policies import FreezePolicy, PolicyError, from_dict, layer_groups


def default_candidates(model: nn.Module, epochs: int) -> list[FreezePolicy]:
    """``head_only``, ``full``, ``last_n`` for n = 1..3, ``surgical`` on each backbone
    group, and, for runs of 2 epochs or more, ``lp_ft`` (probing the first third) and
    ``gradual`` (a group more every quarter of the run)."""
    backbone = [g for g in layer_groups(model, "stage") if not g.is_head]
    entries: list[dict] = [{"type": "head_only"}, {"type": "full"}]
    entries += [{"type": "last_n", "n": n} for n in range(1, min(3, len(backbone)) + 1)]
    entries += [{"type": "surgical", "first": i} for i in range(len(backbone))]
    if epochs >= 2:
        entries.append({"type": "lp_ft", "probe_epochs": max(1, epochs // 3)})
        entries.append({"type": "gradual", "every": max(1, epochs // 4)})
    return distinct_valid(model, (from_dict(e) for e in entries), epochs, strict=False)


def distinct_valid(
    model: nn.Module, policies: Iterable[FreezePolicy], epochs: int, *, strict: bool = True
) -> list[FreezePolicy]:
    """``policies`` that plan on ``model`` for every epoch, the first of each set of
    policies with the same plans. ``strict``: a policy that cannot plan raises."""
    kept: list[FreezePolicy] = []
    seen: set[tuple] = set()
    for policy in policies:
        try:
            policy.validate_epochs(epochs)
            plans = tuple(policy.plan(model, e).signature() for e in range(epochs))
        except PolicyError:
            if strict:
                raise
            continue
        if plans not in seen:
            seen.add(plans)
            kept.append(policy)
    return kept
