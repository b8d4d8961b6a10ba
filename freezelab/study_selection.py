"""Each policy at its own learning rate: a study's selection stage.

Before the runs that the verdict compares, every (variant, policy, grid point) group
chooses its own values of ``select.grid`` (say ``optimizer.lr``) on the validation
split: one run per value, on a seed of its own (``select.seed``, none of the verdict's
seeds), with successive halving within the group (``GroupedASHA``) stopping the values
that fall behind at each rung. The value whose run reached the last epoch with the best
val_acc, not diverged, is the group's choice; the verdict runs (every seed) train at it.
Nothing of the test split enters the choice.

>>> choice = Choice({"optimizer.lr": 0.02}, 0.81, [])  # doctest: +SKIP
>>> choice.describe(SelectionConfig(grid={"optimizer.lr": [0.005, 0.02, 0.08]}))  # doctest: +SKIP
'lr=0.02'
"""

from __future__ import annotations

import itertools
import json
import logging
import math
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from pydantic import Field, field_validator

from freezelab.config_io import ConfigModel
from freezelab.console import Column, format_table
from freezelab.report.runs import SELECTED_TAG as POINT_TAG  # a run's values, as JSON
from freezelab.trainers.location import RunLocation

log = logging.getLogger(__name__)

SELECTION_FILE = "selection.json"  # in the study's folder: the choices, made once
GROUP_TAG = "freezelab.select.group"  # its (variant, policy, grid point), as JSON


class SelectionConfig(ConfigModel):
    """How each (variant, policy, grid point) chooses its own values of ``grid``.

    ``method: asha`` stops a group's values that fall behind at each rung (epochs
    ``grace_epochs``, x ``reduction_factor``, ...); ``method: grid`` trains every value
    to the end (the full grid, for comparison)."""

    grid: dict[str, list[Any]] = Field(min_length=1)
    method: Literal["asha", "grid"] = "asha"
    grace_epochs: int = Field(2, ge=1)
    reduction_factor: float = Field(3.0, gt=1.0)
    # The selection runs' seed: none of the verdict's, so that the runs the verdict
    # compares were not themselves picked for a lucky seed.
    seed: int = 100

    @field_validator("grid")
    @classmethod
    def _values(cls, grid: dict[str, list[Any]]) -> dict[str, list[Any]]:
        for key, values in grid.items():
            if len(values) < 2:
                raise ValueError(f"select.grid {key!r}: give at least 2 values to choose from")
            if len({json.dumps(v) for v in values}) != len(values):
                raise ValueError(f"select.grid {key!r}: values repeat: {values}")
        return grid


@dataclass
class Choice:
    """What a group chose: its point, that run's val_acc, and every candidate's
    (point, epochs trained, last val_acc, diverged reason or None)."""

    point: dict[str, Any] | None
    val_acc: float
    candidates: list[dict[str, Any]] = field(default_factory=list)
    note: str = ""

    def describe(self, select: SelectionConfig, with_note: bool = False) -> str:
        """The choice as the tables print it, flagged when it sits at an end of a numeric
        grid (the best value may lie beyond it: widen the grid), and with ``with_note``
        the note on how it was made."""
        if self.point is None:
            return self.note or "none finished"
        values = ", ".join(f"{short(k)}={v}" for k, v in self.point.items())
        remarks = [
            "at the grid's edge"
            for key, value in self.point.items()
            if _numeric(select.grid[key])
            and len(select.grid[key]) > 2
            and value in (min(select.grid[key]), max(select.grid[key]))
        ][:1]
        remarks += [self.note] if with_note and self.note else []
        return values + (f" ({'; '.join(remarks)})" if remarks else "")


def short(key: str) -> str:
    return key.rsplit(".", 1)[-1]


def _numeric(values: list[Any]) -> bool:
    return all(isinstance(v, int | float) and not isinstance(v, bool) for v in values)


def points(select: SelectionConfig) -> list[dict[str, Any]]:
    """The grid's points, the middle ones first: a group's first trial is never stopped
    by successive halving (nothing to compare it with yet), so it should be the most
    plausible value, not an extreme.

    >>> points(SelectionConfig(grid={"optimizer.lr": [0.005, 0.02, 0.08]}))
    [{'optimizer.lr': 0.02}, {'optimizer.lr': 0.005}, {'optimizer.lr': 0.08}]
    """
    combos = _combinations(select)
    middle = (len(combos) - 1) / 2
    return sorted(combos, key=lambda p: abs(combos.index(p) - middle))


def _combinations(select: SelectionConfig) -> list[dict[str, Any]]:
    keys = sorted(select.grid)
    return [
        dict(zip(keys, values, strict=True))
        for values in itertools.product(*(select.grid[k] for k in keys))
    ]


def _key(point: dict[str, Any]) -> str:
    return json.dumps(point, sort_keys=True)


def group_key(variant: str, policy: dict[str, Any], point: dict[str, Any]) -> str:
    """The group a selection chooses within: the variant, the policy, the study's own
    grid point."""
    return json.dumps([variant, policy, point], sort_keys=True)


def choose(
    configs: dict[str, list[Any]],
    rows: dict[str, dict[str, Any] | None],
    outcomes: dict[str, dict[str, Any]],
    epochs: int,
) -> dict[str, Choice]:
    """Each group's choice from its selection runs (``configs``: group -> configs, each
    with its values in its ``freezelab.select.point`` tag): the best last-epoch val_acc
    among the runs that trained every epoch and did not diverge (a tie goes to the value
    tried first, the grid's middle). A group whose every finished run diverged takes the
    best of them, with a note."""
    choices = {}
    for group, members in configs.items():
        candidates = []
        for config in members:
            point = json.loads(config.mlflow.tags[POINT_TAG])
            row = rows.get(config.name)
            outcome = outcomes.get(config.name, {})
            if row is not None:
                candidates.append(
                    {
                        "point": point,
                        "epochs": epochs,
                        "val_acc": row["val_acc"],
                        "diverged": row.get("diverged_reason") if row.get("diverged") else None,
                        "run_name": config.name,
                    }
                )
            else:
                candidates.append(
                    {
                        "point": point,
                        "epochs": outcome.get("epochs", 0),
                        "val_acc": outcome.get("metrics", {}).get("val_acc", math.nan),
                        "diverged": None,
                        "error": outcome.get("error") or "stopped early",
                        "run_name": config.name,
                    }
                )
        complete = [c for c in candidates if c["epochs"] >= epochs and "error" not in c]
        healthy = [c for c in complete if not c["diverged"]]
        pool, note = healthy, ""
        if not healthy and complete:
            pool, note = complete, "every value that finished diverged"
        if not pool:
            choices[group] = Choice(None, math.nan, candidates, "no selection run finished")
            continue
        best = max(pool, key=lambda c: _finite(c["val_acc"]))
        choices[group] = Choice(best["point"], best["val_acc"], candidates, note)
    return choices


def _finite(value: Any) -> float:
    return -math.inf if value is None or math.isnan(float(value)) else float(value)


def save_choices(home: RunLocation, choices: dict[str, Choice]) -> None:
    home.write_file(SELECTION_FILE, json.dumps({k: asdict(v) for k, v in choices.items()}))


def load_choices(home: RunLocation) -> dict[str, Choice] | None:
    text = home.read_file(SELECTION_FILE)
    if text is None:
        return None
    return {k: Choice(**v) for k, v in json.loads(text).items()}


def format_choices(choices: dict[str, Choice], select: SelectionConfig, labels: dict[str, str]):
    """A row per group: its candidates (epochs trained, last val_acc) and its choice."""
    order = [_key(p) for p in _combinations(select)]
    rows = []
    for group, choice in choices.items():
        tried = []
        for c in sorted(choice.candidates, key=lambda c: order.index(_key(c["point"]))):
            value = ",".join(f"{v}" for v in c["point"].values())
            mark = " diverged" if c.get("diverged") else ""
            mark = " failed" if c.get("error") not in (None, "stopped early") else mark
            tried.append(f"{value}: {c['val_acc']:.3f}@{c['epochs']}{mark}")
        rows.append(
            {
                "group": labels[group],
                "tried": "  ".join(tried),
                "chosen": choice.describe(select, with_note=True),
            }
        )
    columns = (
        Column("group", "variant / policy", max_width=48),
        Column("tried", "value: val_acc@epochs"),
        Column("chosen"),
    )
    return format_table(rows, columns)
