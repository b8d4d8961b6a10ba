"""The per-worker training function that Ray Train runs on every rank.

It reads top to bottom: set up, resume, the epoch loop, report. The freeze plan of
each epoch is derived from (policy, model, epoch); when it changes, the loop enters a
new phase (``phase.enter_phase``): among other things the model is re-wrapped in DDP
and the optimizer rebuilt, because DDP only synchronizes the parameters that required
grad when it was built.

The Ray-specific steps stand out as in Ray Train's own examples: [1] prepare the data
(``prepare_data_loader``, or with Ray Data this rank's dataset shards: ``rank_data.py``),
[2] prepare the model (the DDP wrapper, at every change of phase), [3] report through
the reporter that the caller chose (``reporting.py``); the rest is plain PyTorch.
Replicas that stop agreeing (the replica check, ``ddp.py``) fail the run on every rank
right after that epoch's report, which saves no checkpoint.
A loss that diverges (non-finite, or a phase that ends above chance: ``divergence.py``)
fails nothing: the epoch's metrics carry ``diverged`` (0/1) and ``diverged_reason``,
and the run goes on to its last epoch.
"""

from __future__ import annotations

import json
import logging
import random
import resource
import time
from contextlib import nullcontext
from functools import partial
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import BatchSampler, DataLoader
from torch.utils.flop_counter import FlopCounterMode

from freezelab.env import log_level
from freezelab.policies import FreezePlan
from freezelab.trainers import checkpoint as ckpt
from freezelab.trainers.config import TrainConfig, validate_config
from freezelab.trainers.data import build_eval_sets, build_splits, build_test_sets, label_names_of
from freezelab.trainers.ddp import (
    ReplicasDivergedError,
    SingleProcess,
    all_reduce,
    average_buffers,
    differing_tensors,
    groups_holding,
    per_rank,
    placement,
)
from freezelab.trainers.divergence import divergence_of
from freezelab.trainers.feature_cache import FeatureCache, classifier_of
from freezelab.trainers.forgetting import SourceProbe, source_data
from freezelab.trainers.head_init import labels_metadata
from freezelab.trainers.models import build_for_config
from freezelab.trainers.optim import lr_factor, set_lr, state_by_name
from freezelab.trainers.phase import Phase, enter_phase, same_phase
from freezelab.trainers.rank_data import eval_loaders, rank_data
from freezelab.trainers.reporting import RayTrainReporter, Reporter
from freezelab.trainers.shifts import shifted_metric

log = logging.getLogger(__name__)


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """One rank's training. ``loop_config``: ``config`` (a TrainConfig's dict),
    ``reporter`` (default: Ray Train's), ``in_process: True`` for a single process
    outside any Ray Train worker group (local mode: rank 0 of 1), and ``ray_data``
    (``ray_data.shard_info``) when Ray Data delivers the images."""
    import ray.train
    import ray.train.torch

    config = validate_config(loop_config["config"])
    reporter: Reporter = loop_config.get("reporter") or RayTrainReporter()
    in_process = bool(loop_config.get("in_process"))
    shards = loop_config.get("ray_data")
    context = SingleProcess() if in_process else ray.train.get_context()
    if not in_process:
        # Ray Train sets a worker's root logger to INFO, with a line per report
        # ("Reporting training result ..."): shown only with -v.
        logging.getLogger().setLevel(log_level())
    rank, world_size = context.get_world_rank(), context.get_world_size()
    device = _local_device(config) if in_process else ray.train.torch.get_device()
    workers = placement(context, device)
    if rank == 0 and world_size > 1:
        nodes = sorted({str(w["node_id"])[:12] for w in workers})
        log.info(f"{world_size} workers on {len(nodes)} node(s): {', '.join(nodes)}")
    if config.performance.torch_threads:
        torch.set_num_threads(config.performance.torch_threads)

    # -- [1] set up: the same initial weights on every rank (seeded), data, loaders ---
    _seed_everything(config.seed)
    model = build_for_config(config)
    initial_weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    if shards is None:
        train_set, val_set, test_set, _ = build_splits(config.data, model)
    else:  # Ray Data reads the images; the loop knows their classes and counts
        train_set, val_set, test_set = None, SimpleNamespace(classes=shards["classes"]), None
    eval_sets = build_eval_sets(config.data, model, val_set)
    num_classes = len(val_set.classes)
    test_sets = build_test_sets(config.data, model, test_set)
    probe = _source_probe(config, model, device) if rank == 0 else None
    # The weights that rank 0 saves record what their labels mean (head_init.py).
    weights_metadata = labels_metadata(label_names_of(config.data)) if rank == 0 else None
    model.to(device)
    if config.performance.channels_last:
        model.to(memory_format=torch.channels_last)
    eval_batch = _eval_batch_size(config, device)
    # [1] prepare the data: a seeded DataLoader (prepared by Ray Train), or this rank's
    # Ray Data shards, read and decoded by Ray Data's tasks on any node's CPUs.
    data = rank_data(
        config, shards, train_set, val_set, test_sets, rank, world_size, eval_batch, in_process
    )
    extra_loaders = eval_loaders(eval_sets, rank, world_size, eval_batch, config.data.num_workers)

    # -- resume ------------------------------------------------------------------
    start_epoch, step, optimizer_state, best_val_acc, probe_start = 0, 0, {}, None, None
    history: list[dict[str, Any]] = []  # every epoch's metrics, kept in each checkpoint
    with reporter.resume_from() as directory:
        resumed = directory is not None
        if resumed:
            ckpt.load_model_weights(directory, model)
            state = ckpt.read_state(directory)
            optimizer_state = ckpt.load_optimizer_state(directory)
    if resumed:
        start_epoch, step, best_val_acc = (
            state["epoch"] + 1,
            state["step"],
            state.get("best_val_acc"),
        )
        history = state.get("history", [])
        probe_start = state.get("source_probe_acc_start")
        if rank == 0:
            log.info(f"resuming {config.name} at epoch {start_epoch} (step {step})")

    if probe is not None and not resumed:
        probe_start = probe.accuracy_at_start(model)  # what the backbone knows of the source

    # -- the epoch loop ------------------------------------------------------------
    plan: FreezePlan | None = None
    phase: Phase | None = None
    scaler = torch.amp.GradScaler(device.type, enabled=config.performance.amp == "fp16")
    steps_per_epoch = -(-data.rows_per_epoch // config.batch_size)
    counted_flops: dict[tuple[str, bool], int] = {}  # a step's FLOPs by (phase, cached)
    for epoch in range(start_epoch, config.epochs):
        _seed_everything(config.seed, epoch=epoch, rank=rank)
        data.set_epoch(epoch)
        epoch_plan = config.policy.plan(model, epoch)
        if plan is None or not same_phase(plan, epoch_plan):
            phase = enter_phase(
                config,
                model,
                epoch_plan,
                epoch,
                data=data,
                eval_sizes={name: len(loader.dataset) for name, loader in extra_loaders.items()},
                previous=phase.optimizer if phase is not None else None,
                optimizer_state=optimizer_state,
                device=device,
                rank=rank,
                world_size=world_size,
            )
            optimizer_state = {}  # a resumed state goes into the first phase's optimizer only
            if rank == 0 and plan is not None:
                # Each epoch's line names its phase; this says when, with -v.
                log.debug(
                    "epoch %d/%d: the plan changes to phase %r",
                    epoch + 1,
                    config.epochs,
                    epoch_plan.phase,
                )
        plan = epoch_plan
        assert phase is not None
        optimizer, cache, meter = phase.optimizer, phase.cache, phase.meter

        model.train()
        started = time.perf_counter()
        totals = torch.zeros(3, dtype=torch.float64, device=device)  # loss sum, correct, count
        use_cached = cache is not None and cache.complete
        batches = (
            BatchSampler(data.cached_order(), config.batch_size, drop_last=False)
            if use_cached
            else data.train
        )
        step_flops = 0
        # FLOPs per step change with the phase and with the cache, not from epoch to
        # epoch: counting costs a step's time again (every op goes through the counter).
        flops_key = (plan.phase, use_cached)
        count = flops_key not in counted_flops
        for index, batch in enumerate(batches):
            set_lr(
                optimizer,
                config.optimizer.lr,
                lr_factor(config.schedule, step / steps_per_epoch, config.epochs),
            )
            # The epoch's first step is counted: the FLOPs of what really runs (a frozen
            # layer's weight gradient is never computed; a cached backbone runs only in
            # the epoch that fills the cache).
            counter = FlopCounterMode(display=False) if index == 0 and count else nullcontext()
            with counter:
                if use_cached:
                    inputs, labels = cache.batch(batch)
                    inputs, labels = inputs.to(device), labels.to(device)
                else:
                    images, labels, indices = (t.to(device) for t in batch)
                    if config.performance.channels_last:
                        images = images.contiguous(memory_format=torch.channels_last)
                    inputs = cache.features_for(model, images, labels, indices) if cache else images
                with _autocast(config, device):
                    # The counted step runs eager: FLOPs of the ops, not of compiled kernels.
                    logits = (phase.eager if index == 0 and count else phase.trained)(inputs)
                    loss = F.cross_entropy(
                        logits, labels, label_smoothing=config.optimizer.label_smoothing
                    )
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                if meter is not None:
                    if scaler.is_enabled():
                        scaler.unscale_(optimizer)  # measure the true gradients
                    meter.measure(step)
                scaler.step(optimizer)
                scaler.update()
            if index == 0:
                step_flops = counter.get_total_flops() if count else counted_flops[flops_key]
                counted_flops[flops_key] = step_flops
            step += 1
            # Accumulated on the device: no host sync in the training step.
            totals += torch.stack(
                [
                    loss.detach().double() * len(labels),
                    (logits.argmax(1) == labels).sum().double(),
                    torch.tensor(len(labels), dtype=torch.float64, device=device),
                ]
            )
        if cache is not None and not cache.complete:
            cache.share()
        train_time = time.perf_counter() - started

        # Every rank evaluates, and rank 0 saves, the same model: BatchNorm statistics
        # that each rank updated on its own batches are averaged first.
        average_buffers(model, world_size)
        val_loss, val_acc, val_images = _evaluate(model, data.val, device, config, phase.val_cache)
        last = epoch == config.epochs - 1
        extra: dict[str, float] = {}
        if last or (epoch + 1) % config.metrics.eval_every == 0:
            for name, loader in extra_loaders.items():
                _, extra[shifted_metric("val", name)], _ = _evaluate(
                    model, loader, device, config, phase.eval_caches[name]
                )
        if last:
            extra.update(_test_metrics(model, data.tests, device, config))
        every = config.forgetting.every
        if probe is not None and (last or (every and (epoch + 1) % every == 0)):
            extra["source_probe_acc"] = probe.accuracy(model)
            if probe_start is not None:  # None: resumed from a checkpoint without it
                extra["source_probe_acc_start"] = probe_start
                extra["forgetting"] = probe_start - extra["source_probe_acc"]
        # The same answer on every rank: each compares every rank's checksums.
        out_of_sync = differing_tensors(model, world_size)
        # This epoch's training images on each rank: the run's proof of its world size.
        rank_images = per_rank(totals[2], rank, world_size)
        totals = all_reduce(totals)
        so_far = history[-1] if history else {}
        metrics = {
            "epoch": epoch,
            "phase": plan.phase,
            # The phase as a number, for charts: 0, then +1 at every change of phase.
            "phase_index": so_far.get("phase_index", 0)
            + int(bool(so_far) and so_far.get("phase") != plan.phase),
            "train_loss": float(totals[0] / totals[2]),
            "train_acc": float(totals[1] / totals[2]),
            "val_loss": val_loss,
            "val_acc": val_acc,
            "val_images": val_images,  # over all ranks: the whole val set, once
            "epoch_time_s": time.perf_counter() - started,
            "images_per_s": float(totals[2]) / train_time,
            # The run's cost so far (README, "What a run costs"): summed over epochs.
            "train_time_s": so_far.get("train_time_s", 0.0) + train_time,
            "train_images": so_far.get("train_images", 0) + int(totals[2]),
            **{
                f"train_images/rank{r}": so_far.get(f"train_images/rank{r}", 0) + int(images)
                for r, images in enumerate(rank_images)
            },
            "train_flops": so_far.get("train_flops", 0) + step_flops * steps_per_epoch * world_size,
            "trainable_share": plan.trainable_params / plan.total_params,
            "trainable_params": plan.trainable_params,
            "frozen_params": plan.total_params - plan.trainable_params,
            "feature_cache": int(use_cached),
            "peak_memory_mb": _peak_memory_mb(device),
            "replicas_in_sync": int(not out_of_sync),
            "nodes": len({w["node_id"] for w in workers}),
            "world_size": world_size,
            **{f"lr/{g['name']}": g["lr"] for g in optimizer.param_groups},
            **{
                f"drift/{name}": value
                for name, value in _drift(model, initial_weights, plan).items()
            },
            **extra,
        }
        if meter is not None:
            metrics.update(meter.epoch_metrics())
            early = meter.early_metrics()
            if early:
                # One string, not a list: Tune and MLflow take scalars and strings.
                metrics["early_steps"] = json.dumps(early)
        best_val_acc = val_acc if best_val_acc is None else max(best_val_acc, val_acc)
        metrics["best_val_acc"] = best_val_acc
        # A loss that went non-finite or ended a phase above chance: flagged, not
        # raised. The run goes on to its last epoch, so that its history and its
        # checkpoint (and a rerun's resume) stay those of any run.
        reason = divergence_of([*history, metrics], num_classes, finished=last)
        metrics["diverged"] = int(reason is not None)
        if reason is not None:
            metrics["diverged_reason"] = reason
        history.append(metrics)

        # -- [3] report (a barrier: every rank calls it once per epoch) ------------
        # Replicas that disagree are no one model: nothing of theirs is saved.
        save = not out_of_sync and (
            (epoch + 1) % config.checkpoint.every == 0 or epoch == config.epochs - 1
        )
        state = {
            "epoch": epoch,
            "step": step,
            "best_val_acc": best_val_acc,
            "source_probe_acc_start": probe_start,
            "config": config.safe_dict(),
            "policy": config.policy.to_dict(),
            "metrics": metrics,
            "history": history,
            "workers": workers,
        }
        write = (
            partial(_write_checkpoint, model, optimizer, state, weights_metadata)
            if save and rank == 0
            else None
        )
        reporter.report(metrics, write)
        if out_of_sync:
            # After the report, which every rank reaches: the failed check shows in the
            # run's metrics, and every rank fails together.
            raise ReplicasDivergedError(
                epoch, config.epochs, groups_holding(out_of_sync, plan.groups)
            )


def _local_device(config: TrainConfig) -> torch.device:
    if config.scaling.use_gpu and torch.cuda.is_available():
        return torch.device("cuda", 0)
    return torch.device("cpu")


def _seed_everything(seed: int, epoch: int = -1, rank: int = 0) -> None:
    # Every epoch draws from a seed of (seed, epoch, rank): a resumed run continues
    # with the random numbers the uninterrupted run would have drawn.
    value = (seed * 1_000_003 + (epoch + 1) * 7_919 + rank) % 2**31
    random.seed(value)
    np.random.seed(value)
    torch.manual_seed(value)


def _source_probe(
    config: TrainConfig, model: nn.Module, device: torch.device
) -> SourceProbe | None:
    source = config.forgetting.source
    if source is None:
        return None
    return SourceProbe(
        source_data(source, config.data), model, device, max_iter=config.forgetting.max_iter
    )


# On the CPU, a forward pass of 16 images costs nearly as much as one of 64 (resnet18
# at 32x32: 1.1 s against 0.6 s for 1,080 images): evaluation, which keeps no
# activations for a backward pass, takes at least this many at once there.
CPU_EVAL_BATCH = 64


def _eval_batch_size(config: TrainConfig, device: torch.device) -> int:
    """The batch of the validation and evaluation passes: the training batch on a GPU
    (whose memory it was sized for), at least ``CPU_EVAL_BATCH`` on the CPU. The model
    is in eval mode there, so each image's prediction does not depend on the batch."""
    if device.type == "cpu":
        return max(config.batch_size, CPU_EVAL_BATCH)
    return config.batch_size


def _autocast(config: TrainConfig, device: torch.device):
    if config.performance.amp is None:
        return nullcontext()
    dtype = torch.bfloat16 if config.performance.amp == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


@torch.no_grad()
def _evaluate(
    model: nn.Module,
    loader: DataLoader,
    device: torch.device,
    config: TrainConfig,
    cache: FeatureCache | None,
) -> tuple[float, float, int]:
    """Loss, accuracy and image count over the whole validation set: each rank takes a
    disjoint stride of it (no padding, unlike DistributedSampler), then the sums are
    reduced.
    In a frozen phase the backbone's features of the validation set are cached too."""
    model.eval()
    totals = torch.zeros(3, dtype=torch.float64, device=device)
    for images, labels, indices in loader:
        images, labels = images.to(device), labels.to(device)
        if config.performance.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with _autocast(config, device):
            if cache is None:
                logits = model(images)
            else:
                logits = classifier_of(model)(cache.features_for(model, images, labels, indices))
        loss = F.cross_entropy(logits.float(), labels, reduction="sum")
        correct = (logits.argmax(1) == labels).sum()
        totals += torch.stack(
            [
                loss.double(),
                correct.double(),
                torch.tensor(len(labels), dtype=torch.float64, device=device),
            ]
        )
    model.train()
    totals = all_reduce(totals)
    return float(totals[0] / totals[2]), float(totals[1] / totals[2]), int(totals[2])


def _test_metrics(
    model: nn.Module, loaders: dict[str, Any], device: torch.device, config: TrainConfig
) -> dict[str, float]:
    """The held-out test set's metrics (``test_loss``, ``test_acc``, ``test_images``,
    and ``shifted/test_acc/<shift>``): of the model the run hands over, at the last epoch only,
    so that no per-epoch test number is there to choose by. No feature cache: one pass
    would only fill it."""
    metrics: dict[str, float] = {}
    for name, loader in loaders.items():
        loss, accuracy, images = _evaluate(model, loader, device, config, None)
        if name:
            metrics[shifted_metric("test", name)] = accuracy
        else:
            metrics.update(test_loss=loss, test_acc=accuracy, test_images=images)
    return metrics


@torch.no_grad()
def _drift(
    model: nn.Module, initial: dict[str, torch.Tensor], plan: FreezePlan
) -> dict[str, float]:
    """Relative L2 distance of each group's weights from where training started."""
    params = dict(model.named_parameters())
    drift = {}
    for group in plan.groups:
        delta = sum(
            float((params[n] - initial[n].to(params[n].device)).float().pow(2).sum())
            for n in group.param_names
        )
        base = sum(float(initial[n].float().pow(2).sum()) for n in group.param_names)
        drift[group.name] = (delta / base) ** 0.5 if base > 0 else delta**0.5
    return drift


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _write_checkpoint(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    state: dict[str, Any],
    metadata: dict[str, str] | None,
    directory: Path,
) -> None:
    ckpt.save_checkpoint(directory, model, state_by_name(optimizer), state, metadata)
