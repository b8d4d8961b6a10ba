"""Two gloo ranks on this machine, for checks of the DDP helpers (``trainers/ddp.py``)
without Ray.

Run as a script (``python gloo_ranks.py CASE``) so the ranks never share a process
with a test's Ray session; it prints each rank's result as JSON.

- ``rebuilt`` / ``not-rebuilt``: DDP built while the backbone is frozen, the backbone
  unfrozen, one step on each rank's own batch, with or without rewrapping DDP; the
  result is the replica check (1 in sync, 0 not).
- ``buffers``: the same parameters everywhere, BatchNorm statistics updated on each
  rank's own batch; the replica check before and after averaging the buffers.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile

import torch


def _rank(rank: int, world_size: int, store: str, case: str, results) -> None:
    import timm
    import torch.distributed as dist

    from freezelab.policies import apply, from_dict
    from freezelab.trainers.ddp import average_buffers, replicas_in_sync, wrap

    # A file rendezvous: a port chosen up front can be taken by another process before
    # the ranks listen on it (EADDRINUSE on a busy machine).
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world_size)
    try:
        torch.manual_seed(0)
        model = timm.create_model("test_resnet", num_classes=3)
        if case == "buffers":
            model.train()
            torch.manual_seed(100 + rank)
            with torch.no_grad():
                model(torch.randn(4, 3, 32, 32))  # updates running statistics only
            before = replicas_in_sync(model, world_size)
            average_buffers(model, world_size)
            results[rank] = [before, replicas_in_sync(model, world_size)]
            return
        apply(model, from_dict({"type": "head_only"}).plan(model, 0))
        wrapped = wrap(model, world_size, torch.device("cpu"))
        apply(model, from_dict({"type": "full", "bn": "eval"}).plan(model, 0))
        if case == "rebuilt":
            wrapped = wrap(model, world_size, torch.device("cpu"))
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
        torch.manual_seed(100 + rank)  # each rank its own batch, as under a sampler
        wrapped(torch.randn(4, 3, 32, 32)).logsumexp(1).mean().backward()
        optimizer.step()
        results[rank] = replicas_in_sync(model, world_size)
    finally:
        dist.destroy_process_group()


def main(case: str) -> None:
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as scratch, mp.Manager() as manager:
        results = manager.dict()
        store = os.path.join(scratch, "rendezvous")
        mp.spawn(_rank, args=(2, store, case, results), nprocs=2, join=True)
        print(json.dumps({str(k): v for k, v in sorted(results.items())}))


if __name__ == "__main__":
    main(sys.argv[1])
