"""Step time and peak memory of freeze policies against ``full``.

One training step is forward + backward + optimizer step on a batch; the forward pass
alone (no grad) is the floor that no freeze policy can beat. Policies alternate
round-robin across repeats on one model, so the shared cores' load hits all alike.
Peak memory is measured in a fresh subprocess per (model, policy): the growth of the
peak RSS (``VmHWM``) over the built model on CPU, ``torch.cuda.max_memory_allocated`` on GPU.

    python benchmarks/freeze_compute.py --repeats 3 --json freeze_compute.json
    python benchmarks/freeze_compute.py --smoke
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from contextlib import nullcontext

import _common

POLICIES = {
    "full": {"type": "full"},
    "head_only": {"type": "head_only"},
    "last_n": {"type": "last_n", "n": 1, "unit": "stage"},
    "bitfit": {"type": "bitfit"},
}
FORWARD_ONLY = "forward_only"


def setup(model_name: str, size: int, batch: int, device: str):
    """The model (on ``device``), an input batch and its labels."""
    import torch

    from freezelab.trainers.models import build_model

    torch.manual_seed(0)
    model = build_model(model_name, num_classes=2).to(device)
    images = torch.randn(batch, 3, size, size, device=device)
    labels = torch.randint(0, 2, (batch,), device=device)
    if device == "cuda":
        model = model.to(memory_format=torch.channels_last)
        images = images.contiguous(memory_format=torch.channels_last)
    return model, images, labels


def make_step(model, policy_name: str, images, labels, device: str):
    """Apply the policy's plan and return (a function doing one step, trainable count)."""
    import torch
    import torch.nn.functional as F

    from freezelab.policies import apply, from_dict

    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device == "cuda" else nullcontext()
    if policy_name == FORWARD_ONLY:
        # The floor: inference, norm layers on their running statistics, no autograd.
        apply(model, from_dict({"type": "full"}).plan(model, 0))
        model.eval()

        def forward_only() -> None:
            with torch.no_grad(), autocast:
                model(images)

        return forward_only, 0
    plan = from_dict(POLICIES[policy_name]).plan(model, 0)
    apply(model, plan)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=1e-3, momentum=0.9)

    def step() -> None:
        with autocast:
            loss = F.cross_entropy(model(images), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step, plan.trainable_params


def timed(step, steps: int, device: str) -> float:
    """Seconds per step: one untimed warm-up step, then the mean of ``steps`` steps."""
    import torch

    step()
    if device == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(steps):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - started) / steps


def peak_rss_bytes() -> int:
    """This process's peak resident set size.

    Linux keeps ``ru_maxrss`` across fork and exec, so a child forked from a big parent
    starts with the parent's peak and a delta reads 0. ``VmHWM`` belongs to the
    process's own address space and starts afresh at exec; ``ru_maxrss`` is the
    fallback elsewhere.
    """
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def memory_child(model_name: str, policy_name: str, size: int, batch: int, device: str) -> None:
    """In a fresh process: peak memory growth (MiB) of two steps over the built model."""
    import torch

    model, images, labels = setup(model_name, size, batch, device)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = peak_rss_bytes()
    step, _ = make_step(model, policy_name, images, labels, device)
    step()
    step()
    if device == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = peak_rss_bytes()
    print(json.dumps({"peak_delta_mb": (peak - base) / 2**20}))


def peak_memory(model_name: str, policy_name: str, size: int, batch: int, device: str) -> float:
    command = [sys.executable, __file__, "--memory-child", model_name, policy_name]
    command += ["--size", str(size), "--batch", str(batch), "--device", device]
    out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])["peak_delta_mb"]


def main() -> None:
    p = _common.parser(__doc__.splitlines()[0], repeats=3)
    p.add_argument("--models", nargs="+", default=["vgg16", "resnet50"])
    p.add_argument("--size", type=int, default=224, help="input side in pixels")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=2, help="timed steps per measurement")
    p.add_argument("--no-memory", action="store_true", help="skip the memory subprocesses")
    p.add_argument("--memory-child", nargs=2, metavar=("MODEL", "POLICY"), help=argparse.SUPPRESS)
    args = p.parse_args()
    _common.check_device(args.device)
    if args.memory_child:
        memory_child(*args.memory_child, args.size, args.batch, args.device)
        return
    if args.smoke:
        args.models, args.size, args.batch, args.steps, args.repeats = ["test_resnet"], 32, 4, 1, 1
    names = [*POLICIES, FORWARD_ONLY]
    rows = []
    for model_name in args.models:
        model, images, labels = setup(model_name, args.size, args.batch, args.device)
        times: dict[str, list[float]] = {n: [] for n in names}
        trainable: dict[str, int] = {}
        for _ in range(args.repeats):
            for name in names:  # round-robin: every policy once per round
                step, trainable[name] = make_step(model, name, images, labels, args.device)
                times[name].append(timed(step, args.steps, args.device))
        del model
        full = _common.summary(times["full"])["median"]
        for name in names:
            stats = _common.summary(times[name])
            row = {
                "model": model_name,
                "policy": name,
                "trainable": trainable[name],
                "step_ms": 1000 * stats["median"],
                "min_ms": 1000 * stats["min"],
                "max_ms": 1000 * stats["max"],
                "ratio_vs_full": stats["median"] / full,
                "images_per_s": args.batch / stats["median"],
                "repeats": stats["n"],
            }
            # Smoke mode spawns one memory subprocess only: each costs seconds of imports.
            if not args.no_memory and (not args.smoke or name == "full"):
                row["peak_mem_mb"] = peak_memory(
                    model_name, name, args.size, args.batch, args.device
                )
            rows.append(row)
    columns = ["model", "policy", "trainable", "step_ms", "min_ms", "max_ms", "ratio_vs_full"]
    columns += ["images_per_s", "repeats"] + ([] if args.no_memory else ["peak_mem_mb"])
    title = (
        f"freeze_compute: {args.size}x{args.size}, batch {args.batch}, device {args.device}, "
        f"{args.steps} timed steps x {args.repeats} round-robin repeats"
    )
    _common.print_table(title, columns, rows)
    _common.write_json(args.json, "freeze_compute", args, rows)


if __name__ == "__main__":
    main()
