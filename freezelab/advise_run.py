"""``freezelab advise`` put in order: read and check the input, rank on the driver or
on one Ray worker, log the MLflow run. (This module is orchestration, beside ``api``
and ``study``; the measurements it puts in order live in ``freezelab.advise``, below
MLflow.)

Everything that can be wrong with the input fails before any MLflow run or file is
created, in one line: the config or sweep file, the model and its weights, the data,
``samples``, every candidate policy against the model for every epoch, and a tracking
server that must be reachable.

>>> outcome = run_advise("examples/train_tiny.yaml")  # doctest: +SKIP
>>> outcome.advice.recommended.label(), outcome.run_id  # doctest: +SKIP
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from freezelab.advise.advice import Advice
from freezelab.advise.candidates import default_candidates, distinct_valid
from freezelab.advise.measure import DEFAULT_SAMPLES, AdviseError, advise
from freezelab.policies import FreezePolicy, from_dict
from freezelab.trainers.config import TrainConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AdviseOutcome:
    advice: Advice
    config: TrainConfig
    run_id: str | None = None
    experiment_id: str | None = None


def prepare(
    path: str | Path, *, samples: int = DEFAULT_SAMPLES, overrides: list[str] | None = None
) -> tuple[TrainConfig, list[FreezePolicy], str]:
    """The config to measure on, the candidates (validated), and where they came from
    (``default`` or ``sweep NAME``): every check, nothing created."""
    from freezelab.config_io import config_kind
    from freezelab.trainers.config import load_config
    from freezelab.trainers.data import num_classes_of
    from freezelab.trainers.models import build_unallocated
    from freezelab.trainers.preflight import check_run

    if samples < 2:
        raise AdviseError(f"--samples {samples}: at least 2 images are needed")
    policies: list[FreezePolicy] | None = None
    if config_kind(path) == "sweep":
        from freezelab.sweep.space import load_sweep, validate_space

        sweep = load_sweep(path, overrides)
        validate_space(sweep)  # every policy the space can produce, against the model
        entries = _sweep_policies(sweep)
        config = sweep.trial_config(entries[0], {}, f"{sweep.name}-advise")
        policies, origin = [from_dict(e) for e in entries], f"sweep {sweep.name}"
    else:
        config, origin = load_config(path, overrides=overrides), "default"
    # The config's own policy is not advise's business: check the rest as training would.
    check_run(config.model_copy(update={"policy": from_dict({"type": "full"})}))
    classes = num_classes_of(config.data)
    if samples < classes:
        raise AdviseError(
            f"--samples {samples}: the data has {classes} classes, and LogME needs at least "
            "one image of each"
        )
    model = build_unallocated(config)
    if policies is None:
        candidates = default_candidates(model, config.epochs)
    else:
        candidates = distinct_valid(model, policies, config.epochs)
    return config, candidates, origin


def _sweep_policies(sweep: Any) -> list[dict[str, Any]]:
    """The sweep's candidate policies: every policy of its grid, or where a field is a
    float range, the ends of the range."""
    try:
        return sweep.space.grid_policies()
    except ValueError:
        log.info("advise: the sweep has float ranges; ranking the ends of each range")
        return sweep.space.extreme_policies()


def run_advise(
    path: str | Path,
    *,
    samples: int = DEFAULT_SAMPLES,
    overrides: list[str] | None = None,
    address: str | None = None,
) -> AdviseOutcome:
    """Check, rank (on one Ray worker when ``address`` is given), and log the advice
    as an MLflow run when the config tracks."""
    from freezelab.mlflow.tracked import tracking_available

    config, candidates, origin = prepare(path, samples=samples, overrides=overrides)
    tracking = tracking_available(config)  # an unreachable required server fails here
    log.info(
        f"advise: {config.model.name} on {config.data.kind} data, {len(candidates)} candidate "
        f"policies ({origin})"
    )
    if address:
        advice = _on_a_ray_worker(address, config, candidates, samples)
    else:
        advice = advise(config, candidates, samples=samples)
    if not tracking:
        return AdviseOutcome(advice, config)
    from freezelab.mlflow.advice import log_advice

    run_id, experiment_id = log_advice(config, advice, candidates_from=origin)
    return AdviseOutcome(advice, config, run_id, experiment_id)


def _on_a_ray_worker(
    address: str, config: TrainConfig, candidates: list[FreezePolicy], samples: int
) -> Advice:
    """``advise`` as a Ray task of one CPU on the cluster at ``address`` (where the
    data and the weights are); the result comes back to the driver."""
    import ray

    from freezelab.trainers.launch import init_ray

    init_ray(address)
    task = ray.remote(num_cpus=1)(_remote_advise)
    return ray.get(task.remote(config.to_dict(), [p.to_dict() for p in candidates], samples))


def _remote_advise(
    config: dict[str, Any], candidates: list[dict[str, Any]], samples: int
) -> Advice:
    from freezelab.trainers.config import validate_config

    return advise(validate_config(config), [from_dict(c) for c in candidates], samples=samples)
