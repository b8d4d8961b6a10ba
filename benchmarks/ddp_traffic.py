"""Bytes all-reduced per step under DDP, per freeze policy, against ``full``.

Two processes (``torch.multiprocessing``, a gloo group on CPU, NCCL with ``--device
cuda``; no Ray) wrap the model in ``DistributedDataParallel`` after applying each
policy's plan, the way freezelab's loop does. A communication hook adds up the bytes
of every gradient bucket and then does the default all-reduce. Expected: the bytes
equal the trainable parameters times the gradient's element size.

    python benchmarks/ddp_traffic.py --json ddp_traffic.json
    python benchmarks/ddp_traffic.py --smoke
"""

from __future__ import annotations

import os
import socket
import tempfile
import time

import _common

POLICIES = {
    "full": {"type": "full"},
    "head_only": {"type": "head_only"},
    "last_n": {"type": "last_n", "n": 1, "unit": "stage"},
    "bitfit": {"type": "bitfit"},
}


def counting_allreduce(state: dict, bucket):
    """Count the bucket's bytes, then all-reduce it as DDP does by default."""
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    buffer = bucket.buffer()
    state["bytes"] += buffer.numel() * buffer.element_size()
    return allreduce_hook(None, bucket)


def worker(rank: int, world_size: int, port: int, args, out_dir: str) -> None:
    import json

    import torch
    import torch.distributed as dist
    import torch.nn.functional as F

    from freezelab.policies import apply, from_dict
    from freezelab.trainers.models import build_model

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    backend = "nccl" if args.device == "cuda" else "gloo"
    dist.init_process_group(backend, rank=rank, world_size=world_size)
    device = torch.device(f"cuda:{rank}" if args.device == "cuda" else "cpu")
    torch.manual_seed(0)
    model = build_model(args.model, num_classes=2).to(device)
    generator = torch.Generator().manual_seed(rank)
    images = torch.randn(args.batch, 3, args.size, args.size, generator=generator).to(device)
    labels = torch.randint(0, 2, (args.batch,), generator=generator).to(device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=args.device == "cuda")
    rows = []
    for _ in range(args.repeats):
        for name, policy in POLICIES.items():
            plan = from_dict(policy).plan(model, 0)
            apply(model, plan)
            model.train()
            # A new wrapper per plan, as in freezelab: DDP registers the parameters that
            # require grad when it is built.
            ddp = torch.nn.parallel.DistributedDataParallel(
                model, device_ids=[rank] if args.device == "cuda" else None
            )
            state = {"bytes": 0}
            ddp.register_comm_hook(state, counting_allreduce)
            optimizer = torch.optim.SGD(
                [p for p in model.parameters() if p.requires_grad], lr=1e-3, momentum=0.9
            )
            started = time.perf_counter()
            for _ in range(args.steps):
                with autocast:
                    loss = F.cross_entropy(ddp(images), labels)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
            if args.device == "cuda":
                torch.cuda.synchronize()
            seconds = (time.perf_counter() - started) / args.steps
            element = next(p for p in model.parameters() if p.requires_grad).element_size()
            rows.append(
                {
                    "policy": name,
                    "trainable": plan.trainable_params,
                    "bytes_per_step": state["bytes"] / args.steps,
                    "expected_bytes": plan.trainable_params * element,
                    "step_s": seconds,
                }
            )
            del ddp
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as handle:
        json.dump(rows, handle)
    # Both ranks leave together: a rank tearing gloo down while its peer still talks
    # to it aborts the peer ("terminate called without an active exception").
    dist.barrier()
    dist.destroy_process_group()
    # gloo's threads can still abort the interpreter's own teardown; the results are
    # written, so leave without it.
    os._exit(0)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def main() -> None:
    import json

    import torch.multiprocessing as mp

    p = _common.parser(__doc__.splitlines()[0], repeats=2)
    p.add_argument("--model", default="resnet50")
    p.add_argument("--size", type=int, default=64, help="input side (bytes do not depend on it)")
    p.add_argument("--batch", type=int, default=2, help="per process")
    p.add_argument("--steps", type=int, default=2, help="steps per policy and repeat")
    args = p.parse_args()
    _common.check_device(args.device)
    if args.smoke:
        args.model, args.size, args.batch, args.steps, args.repeats = "test_resnet", 32, 2, 1, 1
    world_size = 2
    with tempfile.TemporaryDirectory() as out_dir:
        mp.spawn(worker, args=(world_size, free_port(), args, out_dir), nprocs=world_size)
        with open(os.path.join(out_dir, "rank0.json")) as handle:
            measured = json.load(handle)
    full_bytes = next(r["bytes_per_step"] for r in measured if r["policy"] == "full")
    rows = []
    for name in POLICIES:
        mine = [r for r in measured if r["policy"] == name]
        bytes_per_step = {r["bytes_per_step"] for r in mine}
        steps = _common.summary([r["step_s"] for r in mine])
        row = {
            "model": args.model,
            "policy": name,
            "trainable": mine[0]["trainable"],
            "MB_per_step": max(bytes_per_step) / 2**20,
            "expected_MB": mine[0]["expected_bytes"] / 2**20,
            "matches_trainable": max(bytes_per_step) == mine[0]["expected_bytes"],
            "ratio_vs_full": max(bytes_per_step) / full_bytes,
            "same_every_repeat": len(bytes_per_step) == 1,
            "step_s": steps["median"],
            "min_s": steps["min"],
            "max_s": steps["max"],
        }
        if args.device == "cuda":
            row["images_per_s"] = world_size * args.batch / steps["median"]
        rows.append(row)
    title = (
        f"ddp_traffic: {world_size} processes ({'nccl' if args.device == 'cuda' else 'gloo'}), "
        f"{args.model}, batch {args.batch} per process, {args.steps} steps x {args.repeats} "
        "repeats; bytes counted by a DDP comm hook on rank 0"
    )
    _common.print_table(title, list(rows[0]), rows)
    _common.write_json(args.json, "ddp_traffic", args, rows)


if __name__ == "__main__":
    main()
