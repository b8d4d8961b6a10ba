"""The sweep file: a base train config plus a conditional search space over policies
and training params, validated against the model before any trial starts.

A range is one of ``{choice: [...]}``, ``{randint: [low, high]}`` (both ends
included), ``{uniform: [low, high]}`` or ``{loguniform: [low, high]}``; anything else
is a fixed value. A policy entry's ``type`` decides which fields exist.

>>> space = SearchSpace.model_validate({"policies": [{"type": "last_n", "n": {"randint": [1, 3]}}]})
>>> [p["n"] for p in space.grid_policies()]
[1, 2, 3]
"""

from __future__ import annotations

import copy
import itertools
import math
import random
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, field_validator, model_validator

from freezelab.config_io import ConfigModel
from freezelab.errors import describe_validation_error
from freezelab.policies import PolicyError, from_dict, get_policy_class
from freezelab.trainers.config import (
    ConfigError,
    TrainConfig,
    apply_override,
    read_mapping,
    validate_config,
)

RANGE_KINDS = ("choice", "randint", "uniform", "loguniform")


def is_range(value: Any) -> bool:
    return isinstance(value, dict) and len(value) == 1 and next(iter(value)) in RANGE_KINDS


def range_values(value: Any) -> list[Any] | None:
    """Every value of a discrete range (or the fixed value); None for a float range."""
    if not is_range(value):
        return [value]
    kind, spec = next(iter(value.items()))
    if kind == "choice":
        return list(spec)
    if kind == "randint":
        return list(range(int(spec[0]), int(spec[1]) + 1))
    return None


def sample_value(value: Any, rng: random.Random) -> Any:
    if not is_range(value):
        return copy.deepcopy(value)
    kind, spec = next(iter(value.items()))
    if kind == "choice":
        return copy.deepcopy(rng.choice(list(spec)))
    if kind == "randint":
        return rng.randint(int(spec[0]), int(spec[1]))
    if kind == "uniform":
        return rng.uniform(float(spec[0]), float(spec[1]))
    low, high = math.log(float(spec[0])), math.log(float(spec[1]))
    return math.exp(rng.uniform(low, high))


class SearchSpace(ConfigModel):
    policies: list[dict[str, Any]] = Field(min_length=1)
    params: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _ranges_are_well_formed(self) -> SearchSpace:
        for entry in self.policies:
            if "type" not in entry or is_range(entry["type"]):
                raise ValueError(f"every policy entry needs a fixed 'type'; got {entry!r}")
            cls = get_policy_class(entry["type"])
            for field in entry:
                if field not in cls.model_fields:
                    raise ValueError(
                        f"policy {entry['type']!r} has no field {field!r}; fields: {', '.join(cls.model_fields)}"
                    )
        for where, value in self._all_ranges():
            kind, spec = next(iter(value.items()))
            if kind == "choice" and (not isinstance(spec, list) or not spec):
                raise ValueError(f"{where}: choice needs a non-empty list")
            if kind != "choice":
                if not (isinstance(spec, list) and len(spec) == 2 and spec[0] <= spec[1]):
                    raise ValueError(
                        f"{where}: {kind} needs [low, high] with low <= high, got {spec!r}"
                    )
                if kind == "loguniform" and spec[0] <= 0:
                    raise ValueError(f"{where}: loguniform needs low > 0, got {spec[0]!r}")
        return self

    def _all_ranges(self):
        for entry in self.policies:
            for field, value in entry.items():
                if is_range(value):
                    yield f"policies.{entry['type']}.{field}", value
        for name, value in self.params.items():
            if is_range(value):
                yield f"params.{name}", value

    def grid_policies(self) -> list[dict[str, Any]]:
        """Every policy of the space (discrete ranges expanded)."""
        policies = []
        for entry in self.policies:
            fields = list(entry)
            choices = [range_values(entry[f]) for f in fields]
            if any(c is None for c in choices):
                raise ValueError(
                    f"grid search needs discrete ranges; policy {entry['type']!r} has a float range"
                )
            for combo in itertools.product(*choices):
                policies.append(dict(zip(fields, combo, strict=True)))
        return policies

    def grid_params(self) -> list[dict[str, Any]]:
        names = list(self.params)
        choices = [range_values(self.params[n]) for n in names]
        if any(c is None for c in choices):
            raise ValueError("grid search needs discrete ranges for params (use choice)")
        return [dict(zip(names, combo, strict=True)) for combo in itertools.product(*choices)]

    def sample(self, rng: random.Random) -> dict[str, Any]:
        entry = rng.choice(self.policies)
        return {
            "policy": {k: sample_value(v, rng) for k, v in entry.items()},
            "params": {k: sample_value(v, rng) for k, v in self.params.items()},
        }

    def probe_params(self, limit: int = 64) -> list[dict[str, Any]]:
        """Param settings that the up-front validation tries: every discrete value, and
        both ends and three interior points of every float range; all combinations
        while they are few, else each param's values with the others at their first."""
        names = list(self.params)
        values = [_probe_values(self.params[n]) for n in names]
        if math.prod(len(v) for v in values) <= limit:
            return [dict(zip(names, c, strict=True)) for c in itertools.product(*values)]
        first = {n: v[0] for n, v in zip(names, values, strict=True)}
        return [
            {**first, name: value}
            for name, options in zip(names, values, strict=True)
            for value in options
        ]

    def extreme_policies(self) -> list[dict[str, Any]]:
        """Policies at every discrete value and at both ends of float ranges: what the
        up-front validation checks, so no sampled policy can fail later."""
        out = []
        for entry in self.policies:
            fields = list(entry)
            choices = []
            for f in fields:
                values = range_values(entry[f])
                choices.append(
                    values if values is not None else list(next(iter(entry[f].values())))
                )
            out += [dict(zip(fields, combo, strict=True)) for combo in itertools.product(*choices)]
        return out


def _probe_values(value: Any) -> list[Any]:
    discrete = range_values(value)
    if discrete is not None:
        return discrete
    kind, (low, high) = next(iter(value.items()))
    if kind == "loguniform":
        low, high = math.log(low), math.log(high)
    points = [low + (high - low) * t for t in (0.0, 0.25, 0.5, 0.75, 1.0)]
    return [math.exp(p) for p in points] if kind == "loguniform" else points


class AshaSection(ConfigModel):
    """Successive halving: at epochs ``grace_period``, x ``reduction_factor``, ... a trial
    behind the others stops. ``within: policy`` compares a trial with the trials of its
    own policy only, so that each policy keeps its best params (say, its own learning
    rate) however it compares with the other policies."""

    grace_period: int = Field(1, ge=1)
    reduction_factor: float = Field(2.0, gt=1.0)
    within: Literal["all", "policy"] = "all"


class SweepConfig(ConfigModel):
    """A sweep: base train config + search space + algorithm and budget."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.=-]*$")
    base: dict[str, Any]
    overrides: list[str] = Field(default_factory=list)  # KEY=VALUE applied to base
    space: SearchSpace
    algorithm: Literal["grid", "random", "optuna"] = "grid"
    num_samples: int = Field(1, ge=1)
    max_concurrent_trials: int | None = Field(None, ge=1)
    metric: str = "val_acc"
    mode: Literal["max", "min"] = "max"
    asha: AshaSection | None = None
    seed: int = 0
    # Every trial repeated once per seed (the train config's seed: data order, the new
    # head's initialization): the best policy is chosen on the mean over seeds.
    seeds: list[int] | None = Field(None, min_length=1)
    register_best_as: str | None = None

    @field_validator("metric")
    @classmethod
    def _not_chosen_on_test(cls, value: str) -> str:
        # test_acc, test_loss, and the test split under a shift (shifted/test_acc/...)
        if any(part.startswith("test_") for part in value.split("/")):
            raise ValueError(
                f"metric {value!r}: the held-out test set judges the chosen run, it never "
                "chooses one; choose on val_acc (or another val metric)"
            )
        return value

    @model_validator(mode="after")
    def _seeds_need_a_fixed_set_of_trials(self) -> SweepConfig:
        if self.seeds and self.algorithm == "optuna":
            raise ValueError(
                "seeds: repeats need a fixed set of trials (grid or random); Optuna suggests "
                "each trial from the results so far"
            )
        if self.seeds and len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds: {self.seeds} repeats a seed")
        return self

    def trial_config(
        self, policy: dict[str, Any], params: dict[str, Any], name: str
    ) -> TrainConfig:
        data = copy.deepcopy(self.base)
        for override in self.overrides:
            apply_override(data, override)
        for key, value in params.items():
            apply_override(data, f"{key}={yaml.safe_dump(value, default_flow_style=True).strip()}")
        data["policy"] = policy
        data["name"] = name
        return validate_config(data, origin=f"sweep {self.name!r}")


def load_sweep(path: str | Path, overrides: list[str] | None = None) -> SweepConfig:
    """Read a sweep file; ``base`` may be a mapping or the path of a train config
    (relative to the sweep file)."""
    from pydantic import ValidationError

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"sweep file {str(path)!r} does not exist")
    data = read_mapping(path, "a sweep file")
    if isinstance(data.get("base"), str):
        base_path = (path.parent / data["base"]).resolve()
        if not base_path.is_file():
            raise ConfigError(f"{path}: base config {data['base']!r} does not exist")
        data["base"] = read_mapping(base_path, "a train config")
    for override in overrides or []:
        apply_override(data, override)
    try:
        sweep = SweepConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(describe_validation_error(str(path), err, "invalid sweep")) from None
    return resolved_on_driver(sweep)


def resolved_on_driver(sweep: SweepConfig) -> SweepConfig:
    """Pin what the driver's working directory decides (storage path, the sqlite file
    of MLflow): trials run in directories of their own."""
    from freezelab.mlflow.tracking import resolve_tracking_uri

    base = copy.deepcopy(sweep.base)
    for override in sweep.overrides:
        apply_override(base, override)
    probe = validate_config(
        {**base, "policy": {"type": "full"}, "name": f"{sweep.name}-probe"},
        origin=f"sweep {sweep.name!r}",
    )
    base["storage_path"] = probe.storage_path
    if probe.mlflow.enabled:
        base.setdefault("mlflow", {})["tracking_uri"] = resolve_tracking_uri(
            probe.mlflow.tracking_uri
        )
    if probe.scaling.num_workers == 0:
        # One worker: `run_sweep` trains such trials in the trial's own process.
        base.setdefault("scaling", {})["num_workers"] = 1
    return SweepConfig.model_validate(
        {**sweep.model_dump(mode="json"), "base": base, "overrides": []}
    )


def validate_space(sweep: SweepConfig, *, num_classes: int | None = None) -> None:
    """Check every policy the space can produce against the model, for every epoch,
    before any trial uses resources."""
    from freezelab.trainers.models import build_for_config

    probe = sweep.trial_config(sweep.space.extreme_policies()[0], {}, f"{sweep.name}-check")
    model = build_for_config(probe, with_weights=False, num_classes=num_classes)
    epochs = probe.epochs
    for policy in sweep.space.extreme_policies():
        try:
            parsed = from_dict(policy)
            parsed.validate_epochs(epochs)
            for epoch in range(epochs):
                parsed.plan(model, epoch)
        except PolicyError as err:
            raise ConfigError(
                f"sweep {sweep.name!r}: policy {policy} cannot run on {probe.model.name}: {err}"
            ) from None
    for params in sweep.space.probe_params():
        sweep.trial_config(sweep.space.extreme_policies()[0], params, f"{sweep.name}-check")
