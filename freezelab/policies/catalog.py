"""The catalog of freeze policies.

Each policy says which layer groups train in an epoch; the base class turns that into
a plan (trainable parameters, LR multipliers, BatchNorm modes).

>>> from freezelab.policies import from_dict
>>> import timm
>>> model = timm.create_model("test_resnet", num_classes=2)
>>> plan = from_dict({"type": "gradual", "every": 2}).plan(model, epoch=4)
>>> plan.phase, [g.name for g in plan.trainable_groups()]
('unfrozen_2', ['layer3', 'layer4', 'head'])
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Sequence
from typing import Literal

from pydantic import Field, model_validator

from freezelab.policies.base import (
    FreezePolicy,
    PolicyError,
    backbone_groups,
    head_group_names,
    register_policy,
)
from freezelab.policies.groups import LayerGroup


@register_policy("full")
class Full(FreezePolicy):
    """Nothing frozen: every parameter trains (the question's "not freezing")."""

    type: Literal["full"] = "full"
    description = "nothing frozen: the whole model trains"

    def trainable_groups(self, groups: Sequence[LayerGroup], epoch: int) -> list[str]:
        return [g.name for g in groups]


@register_policy("head_only")
class HeadOnly(FreezePolicy):
    """The backbone frozen, the head trains (linear probe, feature extraction)."""

    type: Literal["head_only"] = "head_only"
    description = "backbone frozen, only the head trains (linear probe / feature extraction)"

    def trainable_groups(self, groups: Sequence[LayerGroup], epoch: int) -> list[str]:
        return head_group_names(groups)


@register_policy("last_n")
class LastN(FreezePolicy):
    """Only the last ``n`` backbone groups (at ``unit``) plus the head train.

    Keras's ``for layer in model.layers[:-5]: layer.trainable = False`` on VGG16
    without its top leaves block5's three convolutions trainable (the other two of the
    last five Keras layers are pooling layers, which have no weights): that is
    ``{"type": "last_n", "n": 3, "unit": "layer"}`` here.
    """

    type: Literal["last_n"] = "last_n"
    n: int = Field(ge=1)
    description = "only the last n groups (unit stage or layer) plus the head train"

    def validate_for(self, groups: Sequence[LayerGroup]) -> None:
        available = len(backbone_groups(groups))
        if self.n > available:
            raise PolicyError(
                f"last_n: n={self.n} is larger than the model's {available} backbone "
                f"groups at unit {self.unit!r}"
            )

    def trainable_groups(self, groups: Sequence[LayerGroup], epoch: int) -> list[str]:
        backbone = backbone_groups(groups)
        return [g.name for g in backbone[len(backbone) - self.n :]] + head_group_names(groups)


@register_policy("surgical")
class Surgical(FreezePolicy):
    """Surgical fine-tuning (Lee et al., ICLR 2023): one contiguous range of backbone
    groups trains, plus the head. Name the groups (``groups: [stem, layer1]``) or give
    their positions among the backbone groups (``first: 0, last: 1``; ``last``
    defaults to ``first``), which a sweep can search over. Lee et al. found the first
    block best for input-level shifts (image corruptions), the last layers for
    label-level shifts."""

    type: Literal["surgical"] = "surgical"
    groups: tuple[str, ...] | None = Field(None, min_length=1)
    first: int | None = Field(None, ge=0)
    last: int | None = Field(None, ge=0)
    description = "one contiguous range of backbone groups plus the head train"

    @model_validator(mode="after")
    def _one_range(self) -> Surgical:
        if (self.groups is None) == (self.first is None):
            raise ValueError("set either groups or first (and optionally last), not both")
        if self.groups is not None and self.last is not None:
            raise ValueError("last goes with first, not with groups")
        if self.first is not None and self.last is not None and self.last < self.first:
            raise ValueError(f"last={self.last} is before first={self.first}")
        return self

    def _range(self, groups: Sequence[LayerGroup]) -> tuple[int, int]:
        backbone = [g.name for g in backbone_groups(groups)]
        if self.first is not None:
            last = self.first if self.last is None else self.last
            if last >= len(backbone):
                raise PolicyError(
                    f"surgical: index {last} is past the model's {len(backbone)} backbone groups "
                    f"at unit {self.unit!r} (0..{len(backbone) - 1}: {', '.join(backbone)})"
                )
            return self.first, last
        assert self.groups is not None
        unknown = [name for name in self.groups if name not in backbone]
        if unknown:
            raise PolicyError(
                f"surgical: {', '.join(map(repr, unknown))} is not a backbone group of the "
                f"model at unit {self.unit!r}; groups: {', '.join(backbone)}"
            )
        positions = sorted(backbone.index(name) for name in self.groups)
        if positions != list(range(positions[0], positions[-1] + 1)):
            missing = [
                backbone[i] for i in range(positions[0], positions[-1]) if i not in positions
            ]
            raise PolicyError(
                f"surgical: groups {list(self.groups)} are not one contiguous range "
                f"({', '.join(missing)} between them is missing)"
            )
        return positions[0], positions[-1]

    def validate_for(self, groups: Sequence[LayerGroup]) -> None:
        self._range(groups)

    def trainable_groups(self, groups: Sequence[LayerGroup], epoch: int) -> list[str]:
        first, last = self._range(groups)
        backbone = backbone_groups(groups)
        return [g.name for g in backbone[first : last + 1]] + head_group_names(groups)


@register_policy("patterns")
class Patterns(FreezePolicy):
    """Freeze or train the parameters whose names match ``include`` and not ``exclude``.

    ``mode: train`` trains the selected parameters (plus the head unless
    ``with_head: false``); ``mode: freeze`` freezes them and trains the rest.
    ``syntax`` is ``glob`` (``layer4.*``) or ``regex`` (``re.search``).
    Every pattern must match at least one parameter.
    """

    type: Literal["patterns"] = "patterns"
    mode: Literal["train", "freeze"] = "train"
    include: tuple[str, ...] = Field(min_length=1)
    exclude: tuple[str, ...] = ()
    syntax: Literal["glob", "regex"] = "glob"
    with_head: bool = True
    description = "train (or freeze) parameters by glob or regex, with include and exclude lists"

    @model_validator(mode="after")
    def _patterns_compile(self) -> Patterns:
        if self.syntax == "regex":
            for pattern in (*self.include, *self.exclude):
                try:
                    re.compile(pattern)
                except re.error as err:
                    raise ValueError(f"invalid regex {pattern!r}: {err}") from None
        return self

    def _matches(self, pattern: str, name: str) -> bool:
        if self.syntax == "regex":
            return re.search(pattern, name) is not None
        return fnmatch.fnmatchcase(name, pattern)

    def validate_for(self, groups: Sequence[LayerGroup]) -> None:
        names = [n for g in groups for n in g.param_names]
        for field, patterns in (("include", self.include), ("exclude", self.exclude)):
            for pattern in patterns:
                if not any(self._matches(pattern, n) for n in names):
                    raise PolicyError(
                        f"patterns: {field} pattern {pattern!r} ({self.syntax}) matches no "
                        f"parameter; parameter names look like {names[0]!r} ... {names[-1]!r}"
                    )

    def trainable_groups(self, groups: Sequence[LayerGroup], epoch: int) -> list[str]:
        raise NotImplementedError("patterns select parameters, not groups")

    def trainable_param_names(self, groups: Sequence[LayerGroup], epoch: int) -> set[str]:
        selected = {
            n
            for g in groups
            for n in g.param_names
            if any(self._matches(p, n) for p in self.include)
            and not any(self._matches(p, n) for p in self.exclude)
        }
        if self.mode == "freeze":
            return {n for g in groups for n in g.param_names} - selected
        if self.with_head:
            selected |= {n for g in groups if g.is_head for n in g.param_names}
        return selected


@register_policy("gradual")
class Gradual(FreezePolicy):
    """Gradual unfreezing (ULMFiT, fastai): the head first, then one more group from
    the top down every ``every`` epochs; or an explicit ``schedule`` of epoch to the
    groups that unfreeze then (cumulative)."""

    type: Literal["gradual"] = "gradual"
    every: int | None = Field(None, ge=1)
    schedule: dict[int, tuple[str, ...]] | None = None
    description = "head first, then one more group every k epochs (or an epoch->groups map)"

    @model_validator(mode="after")
    def _one_schedule(self) -> Gradual:
        if (self.every is None) == (self.schedule is None):
            raise ValueError("set exactly one of 'every' and 'schedule'")
        if self.schedule is not None and any(epoch < 0 for epoch in self.schedule):
            raise ValueError("schedule epochs must be >= 0")
        return self

    def validate_for(self, groups: Sequence[LayerGroup]) -> None:
        if self.schedule is None:
            return
        known = {g.name for g in groups}
        for epoch, names in self.schedule.items():
            for name in names:
                if name not in known:
                    raise PolicyError(
                        f"gradual: schedule epoch {epoch} names group {name!r}, which the "
                        f"model does not have at unit {self.unit!r}; groups: {', '.join(known)}"
                    )

    def _unfrozen_count(self, epoch: int) -> int:
        assert self.every is not None
        return epoch // self.every

    def trainable_groups(self, groups: Sequence[LayerGroup], epoch: int) -> list[str]:
        if self.schedule is not None:
            names = {n for start, ns in self.schedule.items() if start <= epoch for n in ns}
            return [g.name for g in groups if g.name in names]
        backbone = backbone_groups(groups)
        count = min(self._unfrozen_count(epoch), len(backbone))
        return [g.name for g in backbone[len(backbone) - count :]] + head_group_names(groups)

    def phase(self, groups: Sequence[LayerGroup], epoch: int) -> str:
        if self.schedule is not None:
            return f"step_{sum(1 for start in self.schedule if start <= epoch)}"
        count = min(self._unfrozen_count(epoch), len(backbone_groups(groups)))
        return f"unfrozen_{count}"

    def num_epochs_hint(self) -> int:
        if self.schedule is not None:
            return max(self.schedule)
        return 0


@register_policy("lp_ft")
class LPFT(FreezePolicy):
    """Linear probe, then fine-tune (Kumar et al., ICLR 2022): the head alone for
    ``probe_epochs``, then the whole model with every LR times ``ft_lr_factor``."""

    type: Literal["lp_ft"] = "lp_ft"
    probe_epochs: int = Field(ge=1)
    ft_lr_factor: float = Field(0.1, gt=0.0)
    description = "linear probe for k epochs, then full fine-tuning at its own LR factor"

    def trainable_groups(self, groups: Sequence[LayerGroup], epoch: int) -> list[str]:
        if epoch < self.probe_epochs:
            return head_group_names(groups)
        return [g.name for g in groups]

    def phase(self, groups: Sequence[LayerGroup], epoch: int) -> str:
        return "probe" if epoch < self.probe_epochs else "finetune"

    def phase_lr_factor(self, epoch: int) -> float:
        return 1.0 if epoch < self.probe_epochs else self.ft_lr_factor

    def num_epochs_hint(self) -> int:
        return self.probe_epochs

    def validate_epochs(self, epochs: int) -> None:
        if self.probe_epochs >= epochs:
            raise PolicyError(
                f"lp_ft: probe_epochs={self.probe_epochs} leaves no fine-tuning epoch in a run "
                f"of {epochs} epochs (it would be a head-only run); use probe_epochs < epochs"
            )


@register_policy("bitfit")
class BitFit(FreezePolicy):
    """BitFit (Ben Zaken et al., 2022): only bias terms train, plus the whole head;
    ``include_norm`` also trains the affine weights of normalization layers."""

    type: Literal["bitfit"] = "bitfit"
    include_norm: bool = False
    description = "only biases (optionally norm affine weights) plus the head train"

    def trainable_groups(self, groups: Sequence[LayerGroup], epoch: int) -> list[str]:
        raise NotImplementedError("bitfit selects parameters, not groups")

    def trainable_param_names(self, groups: Sequence[LayerGroup], epoch: int) -> set[str]:
        names = {n for g in groups if g.is_head for n in g.param_names}
        for g in groups:
            for n in g.param_names:
                if n.endswith(".bias") or n == "bias":
                    names.add(n)
            if self.include_norm:
                names.update(g.norm_param_names)
        return names


@register_policy("progressive_freeze")
class ProgressiveFreeze(FreezePolicy):
    """Progressive freezing (FreezeOut, Composer's layer freezing): everything trains
    until ``start``, then the earliest backbone group freezes, and one more every
    ``every`` epochs, until only the last ``keep`` backbone groups and the head train."""

    type: Literal["progressive_freeze"] = "progressive_freeze"
    start: int = Field(1, ge=0)
    every: int = Field(1, ge=1)
    keep: int = Field(0, ge=0)
    description = "the earliest groups freeze one after another during training, to save compute"

    def _frozen_count(self, epoch: int, available: int) -> int:
        if epoch < self.start:
            return 0
        return min((epoch - self.start) // self.every + 1, max(available - self.keep, 0))

    def validate_for(self, groups: Sequence[LayerGroup]) -> None:
        available = len(backbone_groups(groups))
        if self.keep > available:
            raise PolicyError(
                f"progressive_freeze: keep={self.keep} is larger than the model's {available} "
                f"backbone groups at unit {self.unit!r}"
            )

    def trainable_groups(self, groups: Sequence[LayerGroup], epoch: int) -> list[str]:
        backbone = backbone_groups(groups)
        frozen = self._frozen_count(epoch, len(backbone))
        return [g.name for g in backbone[frozen:]] + head_group_names(groups)

    def phase(self, groups: Sequence[LayerGroup], epoch: int) -> str:
        frozen = self._frozen_count(epoch, len(backbone_groups(groups)))
        return f"frozen_{frozen}" if frozen else "train_all"
