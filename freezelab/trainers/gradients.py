"""How hard the loss pulls on each layer group: the gradient-shock measurement.

A new, untrained head sends large gradients into the backbone in the first steps of
``full`` fine-tuning; ``lp_ft`` trains the head first so that the backbone never sees
them. ``GradientMeter`` measures it per layer group, from the gradients the backward
pass already left (after DDP's all-reduce, so every rank measures the same):

- ``grad_norm/<group>``: the L2 norm of the group's gradient, averaged over the steps
  of an epoch (0 for a group that does not train);
- ``rel_grad_norm/<group>``: that norm over the group's weight norm (Lee et al. 2023's
  relative gradient norm), averaged the same way;
- for the first ``early_steps`` steps of the run and of every phase, the same two per
  step (``early/grad_norm/<group>``, MLflow step = the global step).

Everything stays on the device until the epoch ends: one ``_foreach_norm`` over the
trainable gradients and one over their weights per step, no host sync.

>>> import timm, torch
>>> from freezelab.policies import apply, from_dict
>>> model = timm.create_model("test_resnet", num_classes=3)
>>> plan = from_dict({"type": "head_only"}).plan(model, 0)
>>> apply(model, plan)
>>> meter = GradientMeter(model, plan, early_steps=1)
>>> model(torch.randn(2, 3, 32, 32)).sum().backward()
>>> meter.measure(step=0)
>>> metrics = meter.epoch_metrics()
>>> metrics["grad_norm/stem"], metrics["grad_norm/head"] > 0
(0.0, True)
"""

from __future__ import annotations

import torch
import torch.nn as nn

from freezelab.policies import FreezePlan


class GradientMeter:
    """Per-group gradient norms of one phase (a fixed set of trainable parameters)."""

    def __init__(self, model: nn.Module, plan: FreezePlan, early_steps: int = 20):
        params = dict(model.named_parameters())
        self.groups = [g.name for g in plan.groups]
        names, index = [], []
        for position, group in enumerate(plan.groups):
            for name in group.param_names:
                if name in plan.trainable_param_names and params[name].requires_grad:
                    names.append(name)
                    index.append(position)
        self.params = [params[n] for n in names]
        device = self.params[0].device if self.params else torch.device("cpu")
        self.index = torch.tensor(index, dtype=torch.long, device=device)
        self.early_left = early_steps
        self.sum_norm = torch.zeros(len(self.groups), dtype=torch.float64, device=device)
        self.sum_relative = torch.zeros_like(self.sum_norm)
        self.steps = 0
        self.early: list[tuple[int, torch.Tensor, torch.Tensor]] = []

    @torch.no_grad()
    def measure(self, step: int) -> None:
        """Call after backward (and after unscaling fp16 gradients), before the
        optimizer steps: the weights are still those that produced the gradients."""
        present = [(i, p) for i, p in enumerate(self.params) if p.grad is not None]
        if not present:
            return
        grads = torch._foreach_norm([p.grad for _, p in present])
        weights = torch._foreach_norm([p.detach() for _, p in present])
        index = self.index[[i for i, _ in present]]
        squares = torch.zeros(len(self.groups), dtype=torch.float64, device=index.device)
        norm = squares.index_add(0, index, torch.stack(grads).double().pow(2)).sqrt()
        weight = squares.index_add(0, index, torch.stack(weights).double().pow(2)).sqrt()
        relative = torch.where(weight > 0, norm / weight.clamp_min(1e-30), torch.zeros_like(norm))
        self.sum_norm += norm
        self.sum_relative += relative
        self.steps += 1
        if self.early_left > 0:
            self.early.append((step, norm, relative))
            self.early_left -= 1

    def epoch_metrics(self) -> dict[str, float]:
        """The epoch's means per group (then starts the next epoch's)."""
        steps = max(self.steps, 1)
        norms = (self.sum_norm / steps).tolist()
        relatives = (self.sum_relative / steps).tolist()
        self.sum_norm.zero_()
        self.sum_relative.zero_()
        self.steps = 0
        metrics = {f"grad_norm/{g}": v for g, v in zip(self.groups, norms, strict=True)}
        metrics.update(
            {f"rel_grad_norm/{g}": v for g, v in zip(self.groups, relatives, strict=True)}
        )
        return metrics

    def early_metrics(self) -> list[dict[str, float]]:
        """The early steps measured since the last call: one dict per step, with its
        global ``step``."""
        rows = []
        for step, norm, relative in self.early:
            row: dict[str, float] = {"step": step}
            row.update(
                {f"grad_norm/{g}": v for g, v in zip(self.groups, norm.tolist(), strict=True)}
            )
            row.update(
                {
                    f"rel_grad_norm/{g}": v
                    for g, v in zip(self.groups, relative.tolist(), strict=True)
                }
            )
            rows.append(row)
        self.early = []
        return rows
