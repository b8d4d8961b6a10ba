"""What choosing each policy's learning rate costs: one rate, successive halving, full grid.

Three whole `freezelab demo` runs of the built-in study, each in a process and a folder
of its own, timed from the command's start to its exit:

- **one rate**: every policy at the grid's middle rate, no choice (the demo before it
  chose);
- **selection (ASHA)**: `select.grid` over the rates, successive halving within each
  (variant, policy) on a selection seed of its own, then the verdict's seeds at each
  group's choice (the demo as shipped);
- **full grid**: every rate for every seed to the end (`grid:`), each policy then
  compared at the rate with the best mean val_acc over its seeds.

Besides wall time, the epochs that every fine-tuning and selection run trained (a count
that load does not change), the epochs spent choosing the rates (the selection's runs; the
full grid's every run), and whether the selection chose the rate that the full grid's
mean over seeds chose, group by group.

    python benchmarks/lr_selection_cost.py --seeds 1 --json lr_selection_cost.json
    python benchmarks/lr_selection_cost.py --smoke

``--smoke`` shrinks the study (a tiny model, one target, two policies, 3 epochs) and
leaves out the one-rate side: the ratios are then against the selection.
"""

from __future__ import annotations

import json
from typing import Any

import _common
from study_concurrency import SMOKE, run_demo

from freezelab.study import DEFAULT_STUDY


def main() -> None:
    p = _common.parser(__doc__.splitlines()[0], repeats=1)
    p.add_argument("--seeds", type=int, default=1, help="the verdict's seeds (the demo ships 3)")
    args = p.parse_args()
    seeds = [0] if args.smoke else list(range(args.seeds))
    base = []
    if args.smoke:  # one target, two policies, 3 epochs compared after the first
        base = [*SMOKE, "variants={}", "finetune.epochs=3", "select.grace_epochs=1"]
    rates = DEFAULT_STUDY["select"]["grid"]["optimizer.lr"]
    middle = rates[(len(rates) - 1) // 2]
    sides = {
        "one rate": [*base, f"seeds={seeds}", "select=null", f"finetune.optimizer.lr={middle}"],
        "selection (ASHA)": [*base, f"seeds={seeds}"],
        "full grid": [*base, f"seeds={seeds}", "select=null", f"grid={{optimizer.lr: {rates}}}"],
    }
    if args.smoke:
        del sides["one rate"]  # the two sides the claim compares, in half the time
    measured: dict[str, dict[str, Any]] = {}
    for side, overrides in sides.items():
        measured[side] = run_demo(overrides)
        run = measured[side]
        print(
            f"{side}: {run['wall_s']:.1f} s (fine-tuning {run['finetune_s']:.1f} s, "
            f"{run['epochs_trained']} epochs trained)",
            flush=True,
        )
    one = measured.get("one rate", measured["selection (ASHA)"])
    rows = []
    for side, run in measured.items():
        rows.append(
            {
                "study": side,
                "verdict_runs": len(run["runs"]),
                "epochs_trained": run["epochs_trained"],
                "choosing_epochs": run["selection_epochs"]
                if run["selection_epochs"]
                else (run["epochs_trained"] if side == "full grid" else 0),
                "wall_s": round(run["wall_s"], 1),
                "finetune_s": round(run["finetune_s"], 1),
                "wall_ratio": round(run["wall_s"] / one["wall_s"], 2),
                "finetune_ratio": round(run["finetune_s"] / one["finetune_s"], 2),
            }
        )
    agreement = _agreement(measured["selection (ASHA)"], measured["full grid"])
    _common.print_table(
        "lr_selection_cost: each policy's learning rate chosen, against one rate and a full grid",
        [
            "study",
            "verdict_runs",
            "epochs_trained",
            "choosing_epochs",
            "wall_s",
            "finetune_s",
            "wall_ratio",
            "finetune_ratio",
        ],
        rows,
    )
    print("the rate each (variant, policy) chose, selection against the full grid's mean:")
    for line in agreement["lines"]:
        print("  " + line)
    print(f"same rate in {agreement['same']} of {agreement['groups']} groups")
    _common.write_json(
        args.json,
        "lr_selection_cost",
        args,
        rows,
        extra={"agreement": agreement},
    )


def _agreement(selection: dict[str, Any], grid: dict[str, Any]) -> dict[str, Any]:
    """Per (variant, policy): the selection's choice and the full grid's best mean."""
    chosen = {}
    for group, choice in selection["choices"].items():
        variant, policy, _ = json.loads(group)
        chosen[(variant, json.dumps(policy, sort_keys=True))] = (choice["point"] or {}).get(
            "optimizer.lr"
        )
    means: dict[tuple[str, str], dict[float, list[float]]] = {}
    for row in grid["runs"].values():
        lr = float(row["setting"].split("=")[1])
        means.setdefault((row["variant"], row["policy"]), {}).setdefault(lr, []).append(
            row["val_acc"]
        )
    from freezelab.policies import from_dict

    lines, same = [], 0
    for (variant, policy_json), lr in sorted(chosen.items()):
        label = from_dict(json.loads(policy_json)).label()
        by_rate = means.get((variant, label), {})
        best = max(by_rate, key=lambda r: sum(by_rate[r]) / len(by_rate[r])) if by_rate else None
        same += best == lr
        lines.append(f"{variant} {label}: selection {lr}, full grid {best}")
    return {"lines": lines, "same": same, "groups": len(chosen)}


if __name__ == "__main__":
    main()
