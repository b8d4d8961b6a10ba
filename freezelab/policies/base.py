"""The policy base class, the registry, and the plan a policy produces.

A freeze policy is plain data: a frozen pydantic model with a ``type`` tag and no
callables, so it can travel through a Ray Tune search space, an MLflow param and a
checkpoint. What it freezes is derived, never stored: ``policy.plan(model, epoch)``
is a pure function of (policy, model, epoch), so a resumed run re-derives exactly
the state it had.

>>> from freezelab.policies import from_dict
>>> policy = from_dict({"type": "last_n", "n": 2, "unit": "stage"})
>>> policy.to_dict()["n"]
2
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch.nn as nn
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from freezelab.policies.groups import LayerGroup, Unit, layer_groups

BNMode = Literal["frozen", "train", "eval"]


class PolicyError(ValueError):
    """A policy that is malformed, or that does not fit the model it is applied to."""


@dataclass(frozen=True)
class FreezePlan:
    """What trains in one epoch: the output of ``policy.plan(model, epoch)``.

    ``groups`` are the model's layer groups at the policy's unit, input to output;
    ``lr_mult`` and ``bn`` have one entry per group name.
    """

    epoch: int
    phase: str
    groups: tuple[LayerGroup, ...]
    trainable_param_names: frozenset[str]
    lr_mult: dict[str, float]
    bn: dict[str, str]

    def trainable_groups(self) -> list[LayerGroup]:
        """Groups with at least one trainable parameter, input to output."""
        return [g for g in self.groups if self.group_is_trainable(g)]

    def group_is_trainable(self, group: LayerGroup) -> bool:
        return any(n in self.trainable_param_names for n in group.param_names)

    @property
    def trainable_params(self) -> int:
        return sum(self.trainable_params_of(g) for g in self.groups)

    def trainable_params_of(self, group: LayerGroup) -> int:
        return sum(
            size
            for name, size in zip(group.param_names, group.param_sizes, strict=True)
            if name in self.trainable_param_names
        )

    @property
    def total_params(self) -> int:
        return sum(g.num_params for g in self.groups)

    def signature(self) -> tuple:
        """Equal for two plans that need the same optimizer layout and DDP wrapper."""
        return (self.trainable_param_names, tuple(sorted(self.lr_mult.items())))


class FreezePolicy(BaseModel):
    """Base of every freeze policy.

    Fields every policy has:

    - ``unit``: the granularity of the layer groups the policy speaks of, ``stage``
      (timm's coarse groups) or ``layer`` (fine groups: blocks or single layers).
    - ``lr_decay``: layer-wise LR decay; the group ``d`` groups below the head gets
      ``lr_decay ** d`` times the base LR (discriminative fine-tuning). 1.0 is off.
    - ``head_lr_mult``: multiplier of the head's LR.
    - ``bn``: ``frozen`` (default) keeps norm layers of frozen groups in eval mode with
      fixed statistics, also across ``model.train()``; ``train`` lets their running
      statistics update; ``eval`` keeps every norm layer of the model in eval mode.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    type: str
    unit: Unit = "stage"
    lr_decay: float = Field(1.0, gt=0.0, le=1.0)
    head_lr_mult: float = Field(1.0, gt=0.0)
    bn: BNMode = "frozen"

    description: ClassVar[str] = ""

    # -- what subclasses define -------------------------------------------------
    def trainable_groups(self, groups: Sequence[LayerGroup], epoch: int) -> list[str]:
        """Names of the groups that train in ``epoch`` (all their parameters)."""
        raise NotImplementedError

    def phase(self, groups: Sequence[LayerGroup], epoch: int) -> str:
        """A short name of the policy's phase in ``epoch`` (logged per epoch)."""
        return "main"

    def phase_lr_factor(self, epoch: int) -> float:
        """An extra LR factor for every group in ``epoch`` (LP-FT's fine-tuning phase)."""
        return 1.0

    def trainable_param_names(self, groups: Sequence[LayerGroup], epoch: int) -> set[str]:
        names = set(self.trainable_groups(groups, epoch))
        return {p for g in groups if g.name in names for p in g.param_names}

    def validate_for(self, groups: Sequence[LayerGroup]) -> None:
        """Raise PolicyError where the policy cannot mean anything for these groups."""

    def num_epochs_hint(self) -> int:
        """The last epoch at which the plan changes (0 for a static policy)."""
        return 0

    # -- shared machinery --------------------------------------------------------
    def plan(self, model: nn.Module, epoch: int) -> FreezePlan:
        """What trains in ``epoch``. Pure: depends only on (policy, model, epoch)."""
        if epoch < 0:
            raise PolicyError(f"epoch must be >= 0, got {epoch}")
        groups = layer_groups(model, self.unit)
        self.validate_for(groups)
        trainable = frozenset(self.trainable_param_names(groups, epoch))
        if not trainable:
            raise PolicyError(
                f"policy {self.type!r} leaves no trainable parameter at epoch {epoch} "
                f"on this model ({len(groups)} groups at unit {self.unit!r})"
            )
        factor = self.phase_lr_factor(epoch)
        depth_of_head = len(groups) - 1
        lr_mult: dict[str, float] = {}
        bn: dict[str, str] = {}
        for index, group in enumerate(groups):
            if group.is_head:
                mult = self.head_lr_mult
            else:
                mult = self.lr_decay ** (depth_of_head - index)
            lr_mult[group.name] = mult * factor
            trains = any(n in trainable for n in group.param_names)
            if self.bn == "eval" or (self.bn == "frozen" and not trains):
                bn[group.name] = "eval"
            else:
                bn[group.name] = "train"
        return FreezePlan(
            epoch=epoch,
            phase=self.phase(groups, epoch),
            groups=tuple(groups),
            trainable_param_names=trainable,
            lr_mult=lr_mult,
            bn=bn,
        )

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


_REGISTRY: dict[str, type[FreezePolicy]] = {}


def register_policy(name: str) -> Callable[[type[FreezePolicy]], type[FreezePolicy]]:
    """Class decorator: register a policy class under ``name`` (its ``type`` tag).

    Registering a name twice raises: two policies with one name would make a saved
    policy ambiguous.
    """

    def decorate(cls: type[FreezePolicy]) -> type[FreezePolicy]:
        if name in _REGISTRY:
            raise ValueError(f"a freeze policy named {name!r} is already registered")
        if not issubclass(cls, FreezePolicy):
            raise TypeError(f"{cls.__name__} is not a FreezePolicy")
        if cls.model_fields["type"].default != name:
            raise TypeError(f"{cls.__name__}.type must default to {name!r}")
        _REGISTRY[name] = cls
        return cls

    return decorate


def list_policies() -> dict[str, type[FreezePolicy]]:
    """The catalog: registered policy names to their classes, in registration order."""
    return dict(_REGISTRY)


def get_policy_class(name: str) -> type[FreezePolicy]:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise PolicyError(
            f"unknown policy type {name!r}; registered types: {', '.join(_REGISTRY)}"
        ) from None


def from_dict(data: dict[str, Any] | FreezePolicy) -> FreezePolicy:
    """Build a policy from its dict form (the inverse of ``to_dict``)."""
    if isinstance(data, FreezePolicy):
        return data
    if not isinstance(data, dict):
        raise PolicyError(
            f"a policy must be a mapping with a 'type' key, got {type(data).__name__}"
        )
    if "type" not in data:
        raise PolicyError(
            f"policy {data!r} has no 'type'; registered types: {', '.join(_REGISTRY)}"
        )
    cls = get_policy_class(data["type"])
    try:
        return cls.model_validate(data)
    except ValidationError as err:
        raise PolicyError(_describe(data["type"], err)) from None


def _describe(policy_type: str, err: ValidationError) -> str:
    lines = [f"invalid {policy_type!r} policy:"]
    for e in err.errors():
        field = ".".join(str(p) for p in e["loc"]) or "(policy)"
        if e["type"] == "extra_forbidden":
            lines.append(f"  unknown field {field!r}")
        elif e["type"] == "missing":
            lines.append(f"  missing field {field!r}")
        else:
            lines.append(f"  field {field!r}: {e['msg']} (got {e.get('input')!r})")
    return "\n".join(lines)


def backbone_groups(groups: Sequence[LayerGroup]) -> list[LayerGroup]:
    return [g for g in groups if not g.is_head]


def head_group_names(groups: Sequence[LayerGroup]) -> list[str]:
    return [g.name for g in groups if g.is_head]
