"""Launch a training run on Ray Train: resources, the run config, and the TorchTrainer.

``run_training`` knows nothing of MLflow or of the cluster's checks: the caller
validates the config (``preflight.check_run``), starts Ray (``init_ray``) and passes
the Train callbacks that track the run (``freezelab.api.train`` does all three).

>>> from freezelab.trainers.config import load_config
>>> config = load_config("examples/train_tiny.yaml", overrides=["scaling.num_workers=0"])
>>> outcome = run_training(config)  # doctest: +SKIP
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from freezelab.env import LOG_LEVEL_ENV, log_level
from freezelab.errors import ConfigError, FreezelabError
from freezelab.progress import followed
from freezelab.redact import redact_uri
from freezelab.trainers import checkpoint as ckpt
from freezelab.trainers import ray_data
from freezelab.trainers.config import TrainConfig
from freezelab.trainers.location import RunLocation
from freezelab.trainers.reporting import LocalReporter, Reporter

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainOutcome:
    """How a run ended: its last epoch's metrics and where its last checkpoint is.

    ``checkpoint_dir`` is always a local directory that ``open()`` reads: on object
    storage, a local copy of the checkpoint (``checkpoint.local_copy``);
    ``checkpoint_location`` is where the checkpoint is stored (its URI there)."""

    name: str
    metrics: dict[str, Any]
    checkpoint_dir: str | None
    already_complete: bool = False
    history: list[dict[str, Any]] = field(default_factory=list)  # every epoch's metrics
    stored_at: str | None = None  # the checkpoint's URI, when not checkpoint_dir itself

    @property
    def weights_file(self) -> str | None:
        return str(Path(self.checkpoint_dir) / ckpt.MODEL_FILE) if self.checkpoint_dir else None

    @property
    def checkpoint_location(self) -> str | None:
        return self.stored_at or self.checkpoint_dir


def outcome_of(
    name: str,
    checkpoint: str | Path | None,
    *,
    already_complete: bool = False,
    metrics: dict[str, Any] | None = None,
) -> TrainOutcome:
    """The outcome of a run whose last checkpoint is ``checkpoint`` (a local directory
    or a URI; None: ``metrics`` are all there is)."""
    if checkpoint is None:
        return TrainOutcome(name, dict(metrics or {}), None, already_complete)
    state = ckpt.read_state(checkpoint)
    local = ckpt.local_copy(checkpoint)
    return TrainOutcome(
        name,
        state["metrics"],
        str(local),
        already_complete=already_complete,
        history=state.get("history", []),
        stored_at=str(checkpoint) if str(local) != str(checkpoint) else None,
    )


def run_training(
    config: TrainConfig,
    *,
    callbacks: Sequence[Any] = (),
    env_vars: dict[str, str] | None = None,
    reporter: Reporter | None = None,
    progress: bool = True,
) -> TrainOutcome:
    """Fit ``config`` with a ``TorchTrainer``; return its last metrics and checkpoint.

    ``num_workers: 0`` runs the loop in this process (no Ray cluster, no Train
    controller); with workers, Ray must be up (``init_ray``). Running the same config and name again
    resumes from its latest checkpoint. ``callbacks`` are ``ray.train.UserCallback``s
    (in local mode the loop's reporter calls them); ``reporter`` replaces the loop's
    default reporter (tests use it to inject faults). ``progress`` shows each epoch on
    this process's console as the run reports it (a sweep's trials leave it to the
    sweep's display).
    """
    where = RunLocation.of(config)
    where.claim(config)  # the same run again, or a new one: never another config's
    finished = where.completed_checkpoint(config.epochs)
    if finished is not None:
        log.info(
            f"run {config.name!r} is already complete ({config.epochs} epochs) under "
            f"{where.key}: nothing to train."
        )
        return outcome_of(config.name, finished, already_complete=True)
    if not progress:
        return _fit(config, where, callbacks, env_vars, reporter)
    in_process = config.scaling.num_workers == 0
    with followed(config.name, config.epochs, ray_train=not in_process) as feed:
        return _fit(config, where, [*callbacks, feed], env_vars, reporter)


def _fit(
    config: TrainConfig,
    where: RunLocation,
    callbacks: Sequence[Any],
    env_vars: dict[str, str] | None,
    reporter: Reporter | None,
) -> TrainOutcome:
    from ray.train import (
        CheckpointConfig,
        FailureConfig,
        LoggingConfig,
        RunConfig,
        ScalingConfig,
        TrainingFailedError,
    )
    from ray.train.torch import TorchConfig, TorchTrainer

    from freezelab.trainers.loop import train_loop_per_worker

    if config.scaling.num_workers == 0:
        return _run_in_process(config, where, callbacks, reporter)
    env_vars = {
        **worker_env_vars(config, env_vars),
        # Ray Train would log each print of a worker as well as print it: twice on the
        # console. The workers' log level follows the driver's (-v).
        "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
        LOG_LEVEL_ENV: log_level(),
    }
    # Ray Data: one dataset per rank and split, handed out by the trainer (ray_data.py).
    shards = ray_data_shards(config, config.scaling.num_workers)
    datasets = shards.pop("datasets") if shards else None
    resources = worker_resources(config, spare_cpus=RAY_DATA_CPUS if shards else 0.0)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"config": config.to_dict(), "reporter": reporter, "ray_data": shards},
        datasets=datasets,
        dataset_config=ray_data.dataset_config() if shards else None,
        scaling_config=ScalingConfig(
            num_workers=config.scaling.num_workers,
            use_gpu=config.scaling.use_gpu,
            resources_per_worker=resources,
            placement_strategy=config.scaling.placement_strategy,
        ),
        # gloo on CPU, NCCL on GPU: TorchConfig's default picks by device.
        torch_config=TorchConfig(),
        run_config=RunConfig(
            name=config.name,
            storage_path=config.storage_path,
            failure_config=FailureConfig(
                max_failures=config.max_failures,
                # Train V2 retries a worker group that cannot start (e.g. resources
                # held elsewhere) forever; give up after a few 60 s attempts instead.
                controller_failure_limit=config.max_controller_failures,
            ),
            checkpoint_config=CheckpointConfig(num_to_keep=config.checkpoint.keep),
            # Ray Train's INFO lines (each report, each checkpoint) only with -v.
            logging_config=LoggingConfig(log_level=log_level()),
            callbacks=list(callbacks) or None,
            # Env vars for the workers of this run (e.g. GLOO_SOCKET_IFNAME), also when
            # joining a Ray that is already up.
            worker_runtime_env={"env_vars": dict(env_vars)} if env_vars else None,
        ),
    )
    try:
        result = trainer.fit()
    except TrainingFailedError as err:
        raised = _freezelab_error_of(err)
        if raised is None:
            raise
        raise raised from err
    directory = None
    if result.checkpoint is not None:
        # On object storage the checkpoint's path is within its filesystem (bucket/key).
        directory = result.checkpoint.path
        if where.is_remote:
            from freezelab import objectstore

            _, root = objectstore.filesystem(where.storage_path)
            inside = directory.strip("/").removeprefix(root.strip("/"))
            directory = objectstore.join(where.storage_path, inside)
    return outcome_of(config.name, directory, metrics=result.metrics)


def _freezelab_error_of(err: Exception) -> FreezelabError | None:
    """The error a worker raised as freezelab's own (a ``FreezelabError``: one line for
    the CLI, with its exit code), None for any other. Ray Train wraps each rank's
    exception in a ``WorkerGroupError``; the lowest rank's is the one raised."""
    failures = getattr(err, "worker_failures", None) or {}
    for rank in sorted(failures):
        if isinstance(failures[rank], FreezelabError):
            return failures[rank]
    return None


def _run_in_process(
    config: TrainConfig, where: RunLocation, callbacks: Sequence[Any], reporter: Reporter | None
) -> TrainOutcome:
    """``num_workers: 0``: the loop runs in this process, as rank 0 of 1, with no Ray
    Train controller or worker group (so it also runs inside a Ray Tune trial, whose
    process is a Tune session). The reporter keeps the checkpoints where a rerun finds
    them (uploaded to remote storage) and calls the callbacks."""
    from freezelab.trainers.loop import train_loop_per_worker

    reporter = reporter or LocalReporter(
        where.local_checkpoint_dir, config.checkpoint.keep, callbacks
    )
    shards = ray_data_shards(config, 1, in_process=True)
    train_loop_per_worker(
        {"config": config.to_dict(), "reporter": reporter, "in_process": True, "ray_data": shards}
    )
    return outcome_of(config.name, where.latest_checkpoint())


def ray_data_shards(
    config: TrainConfig, world_size: int, *, in_process: bool = False
) -> dict[str, Any] | None:
    """The Ray Data shards of a run whose loader resolves to ``ray_data`` (else None).
    ``auto`` counts the cluster's nodes; in one process, Ray Data's tasks need a Ray,
    so a local one starts if none is up."""
    import ray

    from freezelab.trainers.data import resolve_loader

    if config.data.kind != "image_folder" or config.data.loader == "torch":
        return None
    if in_process and not ray.is_initialized():
        if resolve_loader(config.data, nodes=1) == "torch":
            return None
        init_ray()
    nodes = sum(1 for node in ray.nodes() if node.get("Alive"))
    if resolve_loader(config.data, nodes) == "torch":
        return None
    log.info(
        f"data: Ray Data reads {redact_uri(config.data.root)} ({world_size} shard(s) per split)"
    )
    return ray_data.shard_info(config, world_size)


# Network settings that are usually exported on the driver for the whole cluster.
PASSED_ON_ENV_VARS = ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME", "NCCL_DEBUG")


def worker_env_vars(config: TrainConfig, extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment added to every worker: the driver's network settings, then
    ``scaling.env_vars``, then ``extra``."""
    env = {name: os.environ[name] for name in PASSED_ON_ENV_VARS if os.environ.get(name)}
    return {**env, **config.scaling.env_vars, **(extra or {})}


# Below this a CPU worker spends its time waiting for a core, not training.
MIN_CPU_PER_WORKER = 0.25


# CPUs that Ray Data's read-and-decode tasks (1 CPU each) need beside the Train workers:
# with none left, they wait for a CPU forever.
RAY_DATA_CPUS = 1.0


def worker_resources(config: TrainConfig, spare_cpus: float = 0.0) -> dict[str, float]:
    """Resources of one worker, sized so that the run fits the cluster it is given.

    Without an explicit request a CPU worker takes min(1, CPUs / workers) CPUs, so a
    2-worker run starts on a 2-CPU machine (and inside a Tune trial that holds a CPU);
    an explicit request that can never fit raises instead of waiting forever, which is
    what Ray Train V2 would otherwise do. ``spare_cpus`` stay free for Ray Data's
    tasks: a default CPU worker takes min(1, (CPUs - spare) / workers), and a request
    that leaves fewer free raises.
    """
    import ray

    totals = ray.cluster_resources()
    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    workers = config.scaling.num_workers
    requested = config.scaling.resources_per_worker
    if requested is None:
        if config.scaling.use_gpu:
            requested = {"GPU": 1.0}
        else:
            cpus = totals.get("CPU", 1.0)
            requested = {"CPU": round(min(1.0, (cpus - spare_cpus) / workers), 3)}
            if requested["CPU"] < MIN_CPU_PER_WORKER:
                raise ConfigError(
                    f"scaling: {workers} workers on {cpus:g} CPUs would get {requested['CPU']:g} "
                    f"CPU each, below the minimum of {MIN_CPU_PER_WORKER} per worker: use at "
                    f"most {int(cpus / MIN_CPU_PER_WORKER)} workers, or set "
                    "scaling.resources_per_worker explicitly"
                )
    left = totals.get("CPU", 0.0) - requested.get("CPU", 0.0) * workers
    if spare_cpus and left < spare_cpus - 1e-9:
        raise ConfigError(
            f"scaling: {workers} workers x {{CPU: {requested.get('CPU', 0.0):g}}} leave "
            f"{max(left, 0):g} of {totals.get('CPU', 0.0):g} CPUs for Ray Data's read and decode "
            f"tasks, which need {spare_cpus:g}: request fewer CPUs per worker"
        )
    for resource, amount in requested.items():
        have = totals.get(resource, 0.0)
        largest = max((node.get(resource, 0.0) for node in nodes), default=0.0)
        if amount * workers > have + 1e-9 or amount > largest + 1e-9:
            raise ConfigError(
                f"scaling: {workers} workers x {{{resource}: {amount}}} can never fit this "
                f"cluster: it has {have:g} {resource} in all and at most {largest:g} on one node"
            )
    return requested


def init_ray(address: str | None = None) -> None:
    """Join ``address`` (or ``RAY_ADDRESS``) if given, else start a local Ray of its own.

    A bare ``ray.init()`` would join whatever cluster ``ray start`` left on this host:
    joining one takes an explicit address.
    """
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    # With "local", the dashboard still starts: it serves the state API that Ray Train's
    # placement-group cleaner needs, without which finished runs can leave resources held.
    # Ray's INFO lines on start (its dashboard's address among them) only with -v.
    ray.init(address=address or "local", logging_level=log_level())
