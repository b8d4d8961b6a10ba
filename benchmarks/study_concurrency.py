"""The study's fine-tuning runs one at a time against side by side, as Ray Tune trials.

Each side is a whole `freezelab demo` (the built-in study: the 2-worker pretraining,
then every fine-tuning run, the tables and the report) in a process and a folder of its
own, timed from the command's start to its exit: `max_concurrent: 1` (one run at a time,
as the study ran before it ran on Tune) against the default (as many at once as the
CPUs hold: two single-thread runs on 2 CPUs). The sides alternate across repeats. The
per-run accuracies of the two sides are compared run for run: a run's result must not
depend on what runs beside it. Then, with ``--seeds 3``, the demo as shipped (3 seeds)
is timed once more.

    python benchmarks/study_concurrency.py --json study_concurrency.json
    python benchmarks/study_concurrency.py --smoke

``--smoke`` shrinks the study (a tiny model, 1 + 2 epochs, two policies) and runs each
side once.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import _common

SMOKE = [
    "base.model.name=test_resnet",
    "base.scaling.num_workers=0",
    "base.batch_size=32",
    "pretrain.epochs=1",
    "finetune.epochs=2",
    "policies=[{type: full}, {type: head_only}]",
]


def run_demo(overrides: list[str]) -> dict[str, Any]:
    """``freezelab demo --set ...`` in a fresh folder and process: its wall time and each
    fine-tuning run's accuracies, by run name."""
    with tempfile.TemporaryDirectory(prefix="study-bench-") as folder:
        command = [sys.executable, "-m", "freezelab", "demo"]
        for override in overrides:
            command += ["--set", override]
        env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS",)}
        started = time.perf_counter()
        done = subprocess.run(command, cwd=folder, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - started
        if done.returncode != 0:
            raise SystemExit(
                f"freezelab demo failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
            )
        rows = {}
        for path in sorted(Path(folder, "freezelab_runs").glob("*/study_row.json")):
            row = json.loads(path.read_text())
            rows[row["run_name"]] = {
                "val_acc": row["val_acc"],
                "best_val_acc": row["best_val_acc"],
                "evaluations": row.get("evaluations"),
            }
        return {"wall_s": wall, "runs": rows}


def main() -> None:
    p = _common.parser(__doc__.splitlines()[0], repeats=1)
    p.add_argument("--seeds", type=int, default=3, help="seeds of the last, shipped demo (0: skip)")
    args = p.parse_args()
    base = [*SMOKE] if args.smoke else []
    if args.smoke:
        args.repeats, args.seeds = 1, 0
    one_seed = [*base, "seeds=[0]"]
    sides = {"one at a time": [*one_seed, "max_concurrent=1"], "side by side": one_seed}
    walls: dict[str, list[float]] = {side: [] for side in sides}
    results: dict[str, dict[str, Any]] = {}
    for repeat in range(args.repeats):
        order = list(sides) if repeat % 2 == 0 else list(reversed(sides))
        for side in order:
            measured = run_demo(sides[side])
            walls[side].append(measured["wall_s"])
            results[side] = measured["runs"]
            print(f"repeat {repeat + 1}, {side}: {measured['wall_s']:.1f} s", flush=True)
    one, two = results["one at a time"], results["side by side"]
    same = sorted(one) == sorted(two) and all(one[name] == two[name] for name in one)
    sequential = _common.summary(walls["one at a time"])["median"]
    concurrent = _common.summary(walls["side by side"])["median"]
    rows = [
        {
            "study": "demo, 1 seed",
            "runs": len(one),
            "one_at_a_time_s": round(sequential, 1),
            "side_by_side_s": round(concurrent, 1),
            "ratio": round(concurrent / sequential, 3),
            "same_accuracies": same,
        }
    ]
    if args.seeds:
        shipped = run_demo([*base, f"seeds={list(range(args.seeds))}"])
        rows.append(
            {
                "study": f"demo, {args.seeds} seeds (as shipped)",
                "runs": len(shipped["runs"]),
                "one_at_a_time_s": None,
                "side_by_side_s": round(shipped["wall_s"], 1),
                "ratio": None,
                "same_accuracies": None,
            }
        )
    _common.print_table(
        "study: fine-tuning runs one at a time against side by side (wall time of `freezelab demo`)",
        ["study", "runs", "one_at_a_time_s", "side_by_side_s", "ratio", "same_accuracies"],
        rows,
    )
    if not same:
        different = [name for name in one if one.get(name) != two.get(name)]
        print(f"runs whose accuracies differ between the sides: {different}")
    _common.write_json(args.json, "study_concurrency", args, rows)


if __name__ == "__main__":
    main()
