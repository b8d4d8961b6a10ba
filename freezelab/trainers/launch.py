"""Launch a training run on Ray Train: resources, run config, and the TorchTrainer.

>>> from freezelab.trainers.config import load_config
>>> config = load_config("examples/train_tiny.yaml", overrides=["scaling.num_workers=0"])
>>> result = run_training(config)  # doctest: +SKIP
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from freezelab.trainers import checkpoint as ckpt
from freezelab.trainers.config import ConfigError, TrainConfig


@dataclass(frozen=True)
class TrainOutcome:
    """How a run ended: its last epoch's metrics and where its last checkpoint is."""

    name: str
    metrics: dict[str, Any]
    checkpoint_dir: str | None
    already_complete: bool = False
    mlflow_run_id: str | None = None
    model_uri: str | None = None
    history: list[dict[str, Any]] = field(default_factory=list)  # every epoch's metrics

    @property
    def weights_file(self) -> str | None:
        return str(Path(self.checkpoint_dir) / ckpt.MODEL_FILE) if self.checkpoint_dir else None


def run_training(
    config: TrainConfig,
    *,
    address: str | None = None,
    callbacks: Sequence[Any] = (),
    env_vars: dict[str, str] | None = None,
    parent_run_id: str | None = None,
    check_cluster: bool = True,
) -> TrainOutcome:
    """Fit ``config`` with a ``TorchTrainer``; return its last metrics and checkpoint.

    ``num_workers: 0`` runs in-process (Ray Train's local mode, no Ray cluster). With
    workers it joins ``address`` (or ``RAY_ADDRESS``), else starts a local Ray.
    Running the same config and name again resumes from its latest checkpoint.
    With ``mlflow.enabled`` the run is tracked in MLflow (``parent_run_id`` nests it
    under a sweep's run). On a cluster of several nodes, storage and tracking are checked
    from every node first (``check_cluster=False`` when the caller already did).
    """
    validate_policy_for_model(config)
    if config.scaling.num_workers > 0:
        _init_ray(address)
        if check_cluster:
            from freezelab.cluster.checks import check_cluster as check_nodes

            check_nodes(config, logging_nodes="driver")
    tracked = None
    if config.mlflow.enabled:
        from freezelab.mlflow.run import TrackedRun

        # Before any worker starts: an unreachable server fails here (mlflow.required).
        tracked = TrackedRun.start(config, parent_run_id=parent_run_id)
    if tracked is not None:
        callbacks = [*callbacks, tracked.callback()]
    try:
        outcome = _fit(
            config,
            callbacks=callbacks,
            env_vars=worker_env_vars(config, env_vars),
        )
    except BaseException:
        if tracked is not None:
            tracked.finish(config, None, status="FAILED")
        raise
    if tracked is not None:
        model_uri = tracked.finish(config, outcome)
        outcome = replace(outcome, mlflow_run_id=tracked.run_id, model_uri=model_uri)
    return outcome


def _fit(config: TrainConfig, *, callbacks, env_vars) -> TrainOutcome:
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from freezelab.trainers.loop import train_loop_per_worker

    finished = completed_checkpoint(config)
    if finished is not None:
        state = ckpt.read_state(finished)
        print(
            f"[freezelab] run {config.name!r} is already complete ({config.epochs} epochs) under "
            f"{run_directory(config)}: nothing to train. Choose another name to train again."
        )
        return TrainOutcome(
            config.name,
            state["metrics"],
            str(finished),
            already_complete=True,
            history=state.get("history", []),
        )
    loop_config: dict[str, Any] = {"config": config.to_dict()}
    if config.scaling.num_workers == 0:
        loop_config["local_checkpoint_dir"] = str(run_directory(config) / "local_checkpoints")
        if "://" in config.storage_path:
            raise ConfigError("storage_path: local mode (num_workers: 0) needs a local path")
        scaling = ScalingConfig(num_workers=0)
        _install_local_callbacks(callbacks)
    else:
        scaling = ScalingConfig(
            num_workers=config.scaling.num_workers,
            use_gpu=config.scaling.use_gpu,
            resources_per_worker=worker_resources(config),
            placement_strategy=config.scaling.placement_strategy,
        )
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        scaling_config=scaling,
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
            callbacks=list(callbacks) or None,
            # Env vars for the workers of this run (e.g. GLOO_SOCKET_IFNAME), also when
            # joining a Ray that is already up.
            worker_runtime_env={"env_vars": dict(env_vars)} if env_vars else None,
        ),
    )
    try:
        result = trainer.fit()
    finally:
        _install_local_callbacks(())
    if result.checkpoint is not None and not scaling.num_workers == 0:
        directory = result.checkpoint.path
    else:
        latest = ckpt.latest_checkpoint(loop_config.get("local_checkpoint_dir", "/nonexistent"))
        directory = str(latest) if latest else None
    state = ckpt.read_state(directory) if directory else {"metrics": dict(result.metrics or {})}
    return TrainOutcome(config.name, state["metrics"], directory, history=state.get("history", []))


# Network settings that are usually exported on the driver for the whole cluster.
PASSED_ON_ENV_VARS = ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME", "NCCL_DEBUG")


def worker_env_vars(config: TrainConfig, extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment added to every worker: the driver's network settings, then
    ``scaling.env_vars``, then ``extra``."""
    env = {name: os.environ[name] for name in PASSED_ON_ENV_VARS if os.environ.get(name)}
    return {**env, **config.scaling.env_vars, **(extra or {})}


def completed_checkpoint(config: TrainConfig) -> Path | None:
    """The final checkpoint of a run of this name that already trained every epoch."""
    if "://" in config.storage_path:
        return None
    for state_file in run_directory(config).glob("**/" + ckpt.STATE_FILE):
        if ckpt.read_state(state_file.parent)["epoch"] >= config.epochs - 1:
            return state_file.parent
    return None


def summarize_result(config: TrainConfig, outcome: TrainOutcome) -> str:
    m = outcome.metrics
    lines = [
        f"run {outcome.name}: {m.get('epoch', -1) + 1} epochs, policy {config.policy.type}, "
        f"model {config.model.name}",
        f"  val_acc {m.get('val_acc', float('nan')):.4f} (best {m.get('best_val_acc', float('nan')):.4f}), "
        f"val_loss {m.get('val_loss', float('nan')):.4f}, train_loss {m.get('train_loss', float('nan')):.4f}",
        f"  trainable params {m.get('trainable_params', 0):,}, frozen {m.get('frozen_params', 0):,}",
    ]
    if outcome.checkpoint_dir:
        lines.append(f"  checkpoint: {outcome.checkpoint_dir}")
    return "\n".join(lines)


def run_directory(config: TrainConfig) -> Path:
    return Path(config.storage_path) / config.name


def build_for_config(
    config: TrainConfig, *, with_weights: bool = True, num_classes: int | None = None
):
    """The model of ``config``: built the same way on the driver and on every worker.

    ``model.weights`` may be a local file or an MLflow model URI (``models:/NAME@ALIAS``
    or ``runs:/RUN_ID/model``) of a model that freezelab logged: chained fine-tuning.
    The fresh layers are initialized from ``config.seed``, so every rank, a resumed run
    and the driver build the same starting weights (the reference of the drift metric).
    ``num_classes`` stands in for the data's class count where the data is not at hand.
    """
    import torch

    from freezelab.trainers.data import num_classes_of
    from freezelab.trainers.models import build_model

    section = config.model
    weights = section.weights if with_weights else None
    if weights and weights.startswith(("models:/", "runs:/")):
        from freezelab.mlflow.run import download_weights

        weights = download_weights(weights, config.mlflow.tracking_uri)
    torch.manual_seed(config.seed)
    return build_model(
        section.name,
        num_classes or num_classes_of(config.data),
        pretrained=section.pretrained and with_weights,
        weights=weights,
        head=section.head,
        in_chans=section.in_chans,
    )


def validate_policy_for_model(config: TrainConfig, *, num_classes: int | None = None) -> None:
    """Apply the policy's plan to the model for every epoch on the driver, before any
    worker starts: a policy that cannot work fails here, with its own message."""
    from freezelab.policies import PolicyError

    model = build_for_config(config, with_weights=False, num_classes=num_classes)
    try:
        for epoch in range(config.epochs):
            config.policy.plan(model, epoch)
    except PolicyError as err:
        raise ConfigError(f"policy: {err}") from None


def worker_resources(config: TrainConfig) -> dict[str, float]:
    """Resources of one worker, sized so that the run fits the cluster it is given.

    Without an explicit request a CPU worker takes min(1, CPUs / workers) CPUs, so a
    2-worker run starts on a 2-CPU machine (and inside a Tune trial that holds a CPU);
    an explicit request that can never fit raises instead of waiting forever, which is
    what Ray Train V2 would otherwise do.
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
            requested = {"CPU": round(min(1.0, cpus / workers), 3)}
    for resource, amount in requested.items():
        have = totals.get(resource, 0.0)
        largest = max((node.get(resource, 0.0) for node in nodes), default=0.0)
        if amount * workers > have + 1e-9 or amount > largest + 1e-9:
            raise ConfigError(
                f"scaling: {workers} workers x {{{resource}: {amount}}} can never fit this "
                f"cluster: it has {have:g} {resource} in all and at most {largest:g} on one node"
            )
    return requested


def _init_ray(address: str | None) -> None:
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address)
    else:
        # The dashboard also serves the state API that Ray Train's placement-group
        # cleaner needs: without it, finished runs can leave their resources held.
        ray.init()


# Local mode runs the loop in this process and calls no Train callbacks: the loop's
# report forwards to these instead, so MLflow logging works the same in both modes.
_LOCAL_CALLBACKS: list[Any] = []


def _install_local_callbacks(callbacks: Sequence[Any]) -> None:
    _LOCAL_CALLBACKS[:] = list(callbacks)


def local_callbacks() -> list[Any]:
    return list(_LOCAL_CALLBACKS)
