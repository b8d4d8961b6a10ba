"""How a sweep chooses its trials: Tune's param space (a grid, or samples drawn up
front) or Optuna's define-by-run search over the conditional space of policies.

>>> space, searcher, samples = search_for(sweep)  # doctest: +SKIP
"""

from __future__ import annotations

import random
from typing import Any

from freezelab.sweep.space import SweepConfig, is_range


def search_for(sweep: SweepConfig) -> tuple[dict[str, Any], Any, int]:
    """Tune's ``param_space``, its search algorithm (None for grid and random) and
    ``num_samples``. Each trial's entry is ``{"trial": {"policy": ..., "params": ...}}``."""
    from ray import tune

    space = sweep.space
    if sweep.algorithm == "grid":
        trials = [
            {"policy": p, "params": q} for p in space.grid_policies() for q in space.grid_params()
        ]
        return {"trial": tune.grid_search(per_seed(trials, sweep.seeds))}, None, sweep.num_samples
    if sweep.algorithm == "random":
        rng = random.Random(sweep.seed)
        if sweep.seeds:
            # Drawn up front, so each sample is the same setting under every seed.
            samples = [space.sample(rng) for _ in range(sweep.num_samples)]
            return {"trial": tune.grid_search(per_seed(samples, sweep.seeds))}, None, 1
        return {"trial": tune.sample_from(lambda _spec: space.sample(rng))}, None, sweep.num_samples
    from ray.tune.search.optuna import OptunaSearch

    searcher = OptunaSearch(
        space=DefineByRun(sweep.space.policies, sweep.space.params),
        metric=sweep.metric,
        mode=sweep.mode,
        seed=sweep.seed,
    )
    return {}, searcher, sweep.num_samples


def per_seed(trials: list[dict[str, Any]], seeds: list[int] | None) -> list[dict[str, Any]]:
    """Each trial once per seed (the seed as one of its params)."""
    if not seeds:
        return trials
    return [
        {"policy": t["policy"], "params": {**t["params"], "seed": seed}}
        for t in trials
        for seed in seeds
    ]


class DefineByRun:
    """Optuna's define-by-run space: the policy type decides which fields are sampled.

    A module-level class holding the space as data, not a closure: Tune checkpoints
    its searcher by pickling it, and ``--resume`` restores it with its trials so far.
    """

    def __init__(self, policies: list[dict[str, Any]], params: dict[str, Any]):
        self.policies = [dict(p) for p in policies]
        self.params = dict(params)

    def __call__(self, trial) -> dict[str, Any]:
        index = trial.suggest_categorical("policy_entry", list(range(len(self.policies))))
        entry = self.policies[index]
        policy = {k: _suggest(trial, f"{entry['type']}.{k}.{index}", v) for k, v in entry.items()}
        values = {k: _suggest(trial, f"param.{k}", v) for k, v in self.params.items()}
        return {"policy": policy, "params": values}


def _suggest(trial, name: str, value: Any) -> Any:
    if not is_range(value):
        return value
    kind, spec = next(iter(value.items()))
    if kind == "choice":
        picked = trial.suggest_categorical(name, list(range(len(spec))))
        return spec[picked]
    if kind == "randint":
        return trial.suggest_int(name, int(spec[0]), int(spec[1]))
    return trial.suggest_float(name, float(spec[0]), float(spec[1]), log=kind == "loguniform")
