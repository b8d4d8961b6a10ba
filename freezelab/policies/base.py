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

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar, Literal

import torch.nn as nn
from pydantic import Field, SerializeAsAny, ValidationError

from freezelab.config_io import ConfigModel
from freezelab.errors import FreezelabError, describe_validation_error, quote
from freezelab.policies.groups import LayerGroup, Unit, layer_groups

BNMode = Literal["frozen", "train", "eval", "adapt"]


class PolicyError(FreezelabError, ValueError):
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


class FreezePolicy(ConfigModel):
    """Base of every freeze policy.

    Fields every policy has:

    - ``unit``: the granularity of the layer groups the policy speaks of, ``stage``
      (timm's coarse groups) or ``layer`` (fine groups: blocks or single layers).
    - ``lr_decay``: layer-wise LR decay; the group ``d`` groups below the head gets
      ``lr_decay ** d`` times the base LR (discriminative fine-tuning). 1.0 is off.
    - ``head_lr_mult``: multiplier of the head's LR.
    - ``bn``: ``frozen`` (default) keeps norm layers of frozen groups in eval mode with
      fixed statistics, also across ``model.train()``; ``train`` lets their running
      statistics update; ``eval`` keeps every norm layer of the model in eval mode;
      ``adapt`` is ``frozen`` after the norm layers of frozen groups re-estimate their
      running statistics on the target's training data at the start of each phase
      (AdaBN, Li et al. 2016: a train-mode pass without gradients, the affine weights
      untouched).
    """

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

    def validate_epochs(self, epochs: int) -> None:
        """Raise PolicyError where the policy cannot mean what it says in ``epochs``."""

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
            elif self.bn == "adapt" and not trains:
                bn[group.name] = "adapt"
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

    def label(self) -> str:
        """The type and the fields that differ from their defaults, as people read it:
        ``gradual(every=2)``, ``lp_ft(probe_epochs=3, ft_lr_factor=0.5)``, ``full``."""
        fields = self.model_dump(mode="json", exclude_defaults=True)
        fields.pop("type", None)
        shown = ", ".join(f"{k}={_short(v)}" for k, v in fields.items())
        return f"{self.type}({shown})" if shown else self.type

    def slug(self) -> str:
        """:meth:`label` in the characters a run name allows: ``gradual-every2``."""
        text = self.label().replace("(", "-").replace(")", "").replace(", ", "-")
        text = text.replace("=", "").replace(".", "p")
        return "".join(c if c.isalnum() or c in "_-" else "_" for c in text)[:48].strip("-_")


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
            f"policy {quote(data)} has no 'type'; registered types: {', '.join(_REGISTRY)}"
        )
    if not isinstance(data["type"], str):
        raise PolicyError(f"policy type must be a name, got {quote(data['type'])}")
    cls = get_policy_class(data["type"])
    try:
        return cls.model_validate(data)
    except ValidationError as err:
        raise PolicyError(
            describe_validation_error("", err, f"invalid {data['type']!r} policy")
        ) from None


def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, list) and all(isinstance(v, str) and v.isidentifier() for v in value):
        return "[" + ",".join(value) + "]"  # group names: surgical(groups=[stem,layer1])
    if isinstance(value, (list, dict)):
        return json.dumps(value, separators=(",", ":"))
    return str(value)


def backbone_groups(groups: Sequence[LayerGroup]) -> list[LayerGroup]:
    return [g for g in groups if not g.is_head]


def head_group_names(groups: Sequence[LayerGroup]) -> list[str]:
    return [g.name for g in groups if g.is_head]


class _RegisteredPolicies:
    """JSON-schema marker: a policy field is the union of every registered policy,
    told apart by ``type`` (read from the registry when the schema is made, so a policy
    registered later appears too). Validation stays ``from_dict``'s, with its errors."""

    def __get_pydantic_json_schema__(self, core_schema: Any, handler: Any) -> dict[str, Any]:
        variants = []
        for name, cls in _REGISTRY.items():
            variant = handler.resolve_ref_schema(handler(cls.__pydantic_core_schema__))
            variant = {**variant, "title": name}
            # The tag is what tells the variants apart: required in each, though the
            # class has it as a default.
            variant["required"] = ["type", *[r for r in variant.get("required", []) if r != "type"]]
            variants.append(variant)
        return {
            "oneOf": variants,
            "discriminator": {"propertyName": "type"},
            "description": "A freeze policy: one of the registered types, chosen by `type`.",
        }


# The annotation of a config field that holds any registered policy.
AnyPolicy = Annotated[SerializeAsAny[FreezePolicy], _RegisteredPolicies()]
