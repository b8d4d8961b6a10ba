"""Shared helpers of the benchmark scripts: arguments, the machine, statistics, tables.

Not a benchmark itself. Every script measures A and B inside one process (or one
driver), alternating them round-robin across repeats, so a neighbour's load on the
shared cores hits both sides alike and the ratio stays meaningful.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

# Scripts run as ``python benchmarks/NAME.py`` from the repository root: make the
# package and this helper importable without an install.
ROOT = Path(__file__).resolve().parent.parent
for _path in (str(ROOT), str(ROOT / "benchmarks")):
    if _path not in sys.path:
        sys.path.insert(0, _path)


def parser(description: str, repeats: int) -> argparse.ArgumentParser:
    """The arguments every benchmark takes."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--smoke", action="store_true", help="tiny sizes and 1 repeat (for tests)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--repeats", type=int, default=repeats, help="round-robin rounds")
    p.add_argument("--json", metavar="OUT", help="also write the rows as JSON here")
    p.add_argument(
        "--peak-tflops",
        type=float,
        help="the GPU's dense bf16 peak in TFLOP/s: with --device cuda, also report model "
        "FLOPs utilisation",
    )
    return p


def training_run_args(
    description: str,
    *,
    repeats: int,
    model: str,
    samples: int,
    batch: int,
    smoke: dict[str, Any] | None = None,
) -> argparse.Namespace:
    """Parse the arguments of a benchmark built on short training runs; ``--smoke``
    shrinks them to a tiny model, 32 pixels, 2 epochs and 1 repeat, or to the sizes in
    ``smoke`` (argument name to value) where a script's claim needs others."""
    p = parser(description, repeats=repeats)
    p.add_argument("--model", default=model)
    p.add_argument("--size", type=int, default=64, help="input side in pixels")
    p.add_argument("--samples", type=int, default=samples, help="synthetic samples (80%% train)")
    p.add_argument("--batch", type=int, default=batch)
    p.add_argument("--epochs", type=int, default=3, help="per run; the first is not counted")
    args = p.parse_args()
    check_device(args.device)
    if args.smoke:
        sizes = {"model": "test_resnet", "size": 32, "samples": 32, "batch": 8, "epochs": 2}
        vars(args).update({**sizes, "repeats": 1, **(smoke or {})})
    return args


def check_device(device: str) -> None:
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available here")


def train_step_flops(config: Any, epoch: int = 0) -> float:
    """FLOPs of one training step (forward and backward) of a full batch of ``config``'s
    model under its policy's plan at ``epoch``, counted on the CPU: a frozen layer's
    weight gradients are not computed, so this counts what the step really does
    (``freezelab.advise.costs.step_flops``, which advise's costs use too)."""
    from freezelab.advise.costs import step_flops
    from freezelab.trainers.data import input_size_of
    from freezelab.trainers.models import build_for_config

    model = build_for_config(config, with_weights=False)
    shape = (config.batch_size, *input_size_of(config.data, model))
    return float(step_flops(model, config.policy.plan(model, epoch), shape))


def mfu(flops_per_s: float, peak_tflops: float | None) -> float | None:
    """Model FLOPs utilisation: achieved over peak, or None without a peak."""
    return flops_per_s / (peak_tflops * 1e12) if peak_tflops else None


def machine() -> dict[str, Any]:
    """Cores, memory and GPU of this machine, for the record."""
    import torch

    memory_gb = None
    try:
        with open("/proc/meminfo") as handle:
            kb = int(handle.readline().split()[1])
        memory_gb = round(kb / 2**20, 1)
    except (OSError, ValueError, IndexError):
        pass
    return {
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "memory_gb": memory_gb,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none",
        "python": platform.python_version(),
        "torch": torch.__version__,
    }


def summary(values: Sequence[float]) -> dict[str, float]:
    """Median, min and max of repeated measurements."""
    return {
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
        "n": len(values),
    }


def print_table(title: str, columns: Sequence[str], rows: Sequence[dict[str, Any]]) -> None:
    """A small fixed-width table of ``rows`` (dicts) on the given columns."""
    cells = [[_fmt(row.get(c, "")) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    print(f"\n{title}")
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)))
    print("  ".join("-" * w for w in widths))
    for r in cells:
        print("  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)))
    sys.stdout.flush()


def write_json(
    path: str | None,
    name: str,
    args: argparse.Namespace,
    rows: list[dict],
    extra: dict[str, Any] | None = None,
) -> None:
    if not path:
        return
    payload = {
        "benchmark": name,
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "args": vars(args),
        "machine": machine(),
        "rows": rows,
        **(extra or {}),
    }
    Path(path).write_text(json.dumps(payload, indent=2, default=str) + "\n")


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 100 else f"{value:,.0f}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return str(value)
