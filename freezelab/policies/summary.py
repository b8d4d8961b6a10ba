"""What a policy freezes on a model, group by group: the ``freezelab inspect`` view.

>>> from freezelab.trainers.models import build_model
>>> from freezelab.policies import from_dict
>>> report = summarize_plan(build_model("test_resnet", 2), from_dict({"type": "head_only"}), "test_resnet")
>>> report["groups"][-1]["name"], report["groups"][-1]["trainable"]
('head', True)
"""

from __future__ import annotations

from typing import Any

import torch.nn as nn

from freezelab.policies import FreezePolicy


def summarize_plan(
    model: nn.Module, policy: FreezePolicy, model_name: str, epoch: int = 0
) -> dict[str, Any]:
    """The plan of ``policy`` on ``model`` at ``epoch`` as a JSON-ready dict."""
    plan = policy.plan(model, epoch)
    groups = []
    for group in plan.groups:
        trainable = plan.trainable_params_of(group)
        groups.append(
            {
                "name": group.name,
                "params": group.num_params,
                "trainable_params": trainable,
                "trainable": trainable > 0,
                "lr_mult": round(plan.lr_mult[group.name], 6),
                "bn": plan.bn[group.name],
            }
        )
    total = plan.total_params
    # Backward work stops at the earliest group that needs a gradient: everything
    # below it is skipped entirely (bias-only groups still need the backward pass).
    first = next((i for i, g in enumerate(groups) if g["trainable"]), len(groups))
    skipped = sum(g["params"] for g in groups[:first])
    return {
        "model": model_name,
        "policy": policy.to_dict(),
        "epoch": epoch,
        "phase": plan.phase,
        "groups": groups,
        "trainable_params": plan.trainable_params,
        "total_params": total,
        "frozen_pct": round(100.0 * (total - plan.trainable_params) / total, 2),
        "backward_skipped_pct": round(100.0 * skipped / total, 2),
    }


def format_table(report: dict[str, Any]) -> str:
    rows = [("group", "params", "trainable", "lr_mult", "bn")]
    for g in report["groups"]:
        status = (
            "yes"
            if g["params"] == g["trainable_params"]
            else ("partial" if g["trainable"] else "frozen")
        )
        rows.append((g["name"], f"{g['params']:,}", status, f"{g['lr_mult']:.4g}", g["bn"]))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    lines = [
        f"model {report['model']}  policy {report['policy']['type']}  epoch {report['epoch']}"
        f"  phase {report['phase']}",
        "",
    ]
    for index, row in enumerate(rows):
        lines.append(
            "  ".join(
                cell.ljust(w) if i == 0 else cell.rjust(w)
                for i, (cell, w) in enumerate(zip(row, widths, strict=True))
            )
        )
        if index == 0:
            lines.append("  ".join("-" * w for w in widths))
    lines += [
        "",
        f"trainable parameters: {report['trainable_params']:,} of {report['total_params']:,}"
        f" ({report['frozen_pct']:.2f}% frozen)",
        f"backward pass skipped: {report['backward_skipped_pct']:.2f}% of the parameters lie"
        " below the first trainable group, so autograd never reaches them",
    ]
    return "\n".join(lines)
