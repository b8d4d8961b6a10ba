"""Training step time with ``performance.compile`` (``torch.compile``) against eager.

For each policy, one model is stepped eager and one through ``torch.compile``, as the
loop does (the module of the training step, compiled anew for the phase). The first
compiled step includes the compilation and is reported apart; the timed steps after
it alternate eager and compiled round-robin across repeats.

    python benchmarks/compile_step.py --repeats 3 --json compile_step.json
    python benchmarks/compile_step.py --smoke

``--smoke`` checks the script only: a tiny model and dynamo's ``eager`` backend, which
traces but generates no code (inductor's first compile takes 30-60 s on 2 cores).
"""

from __future__ import annotations

import time

import _common

POLICIES = {"full": {"type": "full"}, "last_n": {"type": "last_n", "n": 1, "unit": "stage"}}


def make_step(model, policy: dict, images, labels, compiled: bool, backend: str):
    import torch
    import torch.nn.functional as F

    from freezelab.policies import apply, from_dict

    apply(model, from_dict(policy).plan(model, 0))
    model.train()
    optimizer = torch.optim.SGD(
        [p for p in model.parameters() if p.requires_grad], lr=1e-3, momentum=0.9
    )
    module = torch.compile(model, backend=backend) if compiled else model

    def step() -> None:
        loss = F.cross_entropy(module(images), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def timed(step, n: int) -> float:
    started = time.perf_counter()
    for _ in range(n):
        step()
    return (time.perf_counter() - started) / n


def main() -> None:
    p = _common.parser(__doc__.splitlines()[0], repeats=3)
    p.add_argument("--model", default="resnet18")
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=5, help="timed steps per measurement")
    args = p.parse_args()
    _common.check_device(args.device)
    backend = "inductor"
    if args.smoke:
        args.model, args.size, args.batch, args.steps, args.repeats = "test_resnet", 32, 4, 1, 1
        backend = "eager"
    import torch

    from freezelab.trainers.models import build_model

    rows = []
    for name, policy in POLICIES.items():
        torch.compiler.reset()
        steps, first = {}, {}
        for compiled in (False, True):
            torch.manual_seed(0)
            model = build_model(args.model, num_classes=2).to(args.device)
            images = torch.randn(args.batch, 3, args.size, args.size, device=args.device)
            labels = torch.randint(0, 2, (args.batch,), device=args.device)
            steps[compiled] = make_step(model, policy, images, labels, compiled, backend)
            first[compiled] = timed(steps[compiled], 1)  # compiles, or warms up
        times: dict[bool, list[float]] = {False: [], True: []}
        for _ in range(args.repeats):
            for compiled in (False, True):  # alternate eager and compiled
                times[compiled].append(timed(steps[compiled], args.steps))
        eager = _common.summary(times[False])["median"]
        for compiled in (False, True):
            stats = _common.summary(times[compiled])
            rows.append(
                {
                    "model": args.model,
                    "policy": name,
                    "mode": f"compile ({backend})" if compiled else "eager",
                    "step_ms": stats["median"] * 1e3,
                    "min_ms": stats["min"] * 1e3,
                    "max_ms": stats["max"] * 1e3,
                    "ratio_vs_eager": stats["median"] / eager,
                    "first_step_s": first[compiled],
                }
            )
    title = (
        f"compile_step: {args.size}x{args.size}, batch {args.batch}, {args.steps} steps x "
        f"{args.repeats} repeats, device {args.device} (first_step_s includes the compilation)"
    )
    _common.print_table(title, list(rows[0]), rows)
    _common.write_json(args.json, "compile_step", args, rows)


if __name__ == "__main__":
    main()
