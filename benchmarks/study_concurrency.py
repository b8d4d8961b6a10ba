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
import re
import shutil
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
    """``freezelab demo --set ...`` in a fresh folder and process: its wall time, the
    time of its fine-tuning phase (from the line that starts its first trials, the
    selection's if it has one, to the last run's end), each fine-tuning run's accuracies
    by run name, and the epochs that every fine-tuning and selection run trained."""
    with tempfile.TemporaryDirectory(prefix="study-bench-") as folder:
        command = [sys.executable, "-m", "freezelab", "demo"]
        for override in overrides:
            command += ["--set", override]
        # A local Ray of the demo's own, in a temporary folder of its own: its address
        # file never points another Ray session on this machine elsewhere.
        ray_tmp = tempfile.mkdtemp(prefix="ray", dir="/tmp")
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        env["RAY_TMPDIR"] = ray_tmp
        phase: dict[str, float] = {}
        lines = []
        started = time.perf_counter()
        with subprocess.Popen(
            command, cwd=folder, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True,
        ) as demo:  # fmt: skip
            for line in demo.stdout:
                lines.append(line)
                if " at once, " in line and "start" not in phase:
                    phase["start"] = time.perf_counter()
                finished = re.search(r"trials finished: (\d+)/(\d+)", line)
                if finished and finished[1] == finished[2]:
                    phase["end"] = time.perf_counter()
        wall = time.perf_counter() - started
        shutil.rmtree(ray_tmp, ignore_errors=True)
        if demo.returncode != 0 or len(phase) != 2:
            raise SystemExit("freezelab demo failed:\n" + "".join(lines[-60:]))
        rows, epochs = {}, 0
        for path in sorted(Path(folder, "freezelab_runs").glob("*/study_row.json")):
            row = json.loads(path.read_text())
            if "-select-" in row["run_name"]:
                continue  # counted below, with the selection runs stopped early
            epochs += row["epochs"]
            rows[row["run_name"]] = {
                "val_acc": row["val_acc"],
                "test_acc": row.get("test_acc"),
                "best_val_acc": row["best_val_acc"],
                "evaluations": row.get("evaluations"),
                "policy": row["policy"],
                "variant": row.get("variant", ""),
                "setting": row.get("setting", ""),
            }
        choices, selection_epochs = {}, 0
        for path in Path(folder, "freezelab_runs").glob("*/selection.json"):
            for group, choice in json.loads(path.read_text()).items():
                choices[group] = choice
                selection_epochs += sum(c["epochs"] for c in choice["candidates"])
        return {
            "wall_s": wall,
            "finetune_s": phase["end"] - phase["start"],
            "runs": rows,
            "epochs_trained": epochs + selection_epochs,
            "selection_epochs": selection_epochs,
            "choices": choices,
            "output": "".join(lines),
        }


def main() -> None:
    p = _common.parser(__doc__.splitlines()[0], repeats=1)
    p.add_argument("--seeds", type=int, default=3, help="seeds of the last, shipped demo (0: skip)")
    args = p.parse_args()
    base = [*SMOKE, "select=null"] if args.smoke else []  # 2 epochs: no rung to compare at
    if args.smoke:
        args.repeats, args.seeds = 1, 0
    one_seed = [*base, "seeds=[0]"]
    sides = {"one at a time": [*one_seed, "max_concurrent=1"], "side by side": one_seed}
    measured: dict[str, list[dict[str, Any]]] = {side: [] for side in sides}
    for repeat in range(args.repeats):
        order = list(sides) if repeat % 2 == 0 else list(reversed(sides))
        for side in order:
            run = run_demo(sides[side])
            measured[side].append(run)
            print(
                f"repeat {repeat + 1}, {side}: {run['wall_s']:.1f} s "
                f"(fine-tuning {run['finetune_s']:.1f} s)",
                flush=True,
            )
    one, two = measured["one at a time"][-1]["runs"], measured["side by side"][-1]["runs"]
    same = sorted(one) == sorted(two) and all(one[name] == two[name] for name in one)

    def median(side: str, key: str) -> float:
        return _common.summary([run[key] for run in measured[side]])["median"]

    rows = []
    for what, key in (("its fine-tuning runs", "finetune_s"), ("the whole command", "wall_s")):
        sequential, concurrent = median("one at a time", key), median("side by side", key)
        rows.append(
            {
                "study": f"demo, 1 seed: {what}",
                "runs": len(one),
                "one_at_a_time_s": round(sequential, 1),
                "side_by_side_s": round(concurrent, 1),
                "ratio": round(concurrent / sequential, 3),
                "same_accuracies": same,
            }
        )
    if args.seeds:
        shipped = run_demo([*base, f"seeds={list(range(args.seeds))}"])
        for what, key in (("its fine-tuning runs", "finetune_s"), ("the whole command", "wall_s")):
            rows.append(
                {
                    "study": f"demo as shipped, {args.seeds} seeds: {what}",
                    "runs": len(shipped["runs"]),
                    "side_by_side_s": round(shipped[key], 1),
                }
            )
    _common.print_table(
        "study_concurrency: fine-tuning runs one at a time against side by side (`freezelab demo`)",
        ["study", "runs", "one_at_a_time_s", "side_by_side_s", "ratio", "same_accuracies"],
        rows,
    )
    if not same:
        different = sorted(name for name in set(one) | set(two) if one.get(name) != two.get(name))
        print(f"runs whose accuracies differ between the sides: {different}")
    _common.write_json(args.json, "study_concurrency", args, rows)


if __name__ == "__main__":
    main()
