"""Fault injection for tests: reporters that fail right after an epoch's report.

They replace the loop's reporter (``run_training(..., reporter=...)``), so the
production loop carries no debug switch. Workers of a Ray session cannot import the
tests, so this module is pickled by value.
"""

from __future__ import annotations

import os
from pathlib import Path

import ray.cloudpickle

from freezelab.trainers.reporting import LocalReporter, RayTrainReporter

ray.cloudpickle.register_pickle_by_value(__import__(__name__))


class Interrupted(Exception):
    """Stands for a crash of the driver process in local mode."""


class CrashAfterEpoch(LocalReporter):
    """Local mode: report and checkpoint epoch ``epoch`` as usual, then crash."""

    def __init__(self, epoch: int, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.epoch = epoch

    def report(self, metrics, write_checkpoint):
        super().report(metrics, write_checkpoint)
        if metrics["epoch"] == self.epoch:
            raise Interrupted(f"after epoch {self.epoch}")


class KillRankAfterEpoch(RayTrainReporter):
    """Ray Train: rank ``rank`` dies (``os._exit``) right after reporting ``epoch``,
    once; the marker file records that it happened."""

    def __init__(self, rank: int, epoch: int, marker: str | Path):
        self.rank, self.epoch, self.marker = rank, epoch, str(marker)

    def report(self, metrics, write_checkpoint):
        import ray.train

        super().report(metrics, write_checkpoint)
        rank = ray.train.get_context().get_world_rank()
        if (rank, metrics["epoch"]) == (self.rank, self.epoch) and not Path(self.marker).exists():
            Path(self.marker).write_text(f"killed rank {rank} after epoch {self.epoch}\n")
            os._exit(1)


class RecordEnv(RayTrainReporter):
    """Ray Train: each rank writes the value of ``variable`` in its environment to
    ``directory/rank-N`` at its first report (what the worker process really got)."""

    def __init__(self, variable: str, directory: str | Path):
        self.variable, self.directory = variable, str(directory)

    def report(self, metrics, write_checkpoint):
        import ray.train

        rank = ray.train.get_context().get_world_rank()
        path = Path(self.directory) / f"rank-{rank}"
        if not path.exists():
            path.write_text(os.environ.get(self.variable, "<unset>"))
        super().report(metrics, write_checkpoint)


class KeepDdpWrapper(RayTrainReporter):
    """Ray Train: the loop's DDP wrapper outlives every change of phase, as if the loop
    forgot to wrap the model again when it unfreezes (Lightning issue 20340): the
    parameters that start training later are never synchronized, and the replicas
    drift apart. Installed on each rank when the loop asks where to resume, before its
    first phase; it needs ``performance.feature_cache: false``, so that every phase
    wraps the same module."""

    def resume_from(self):
        from freezelab.trainers import phase

        built = phase.wrap
        kept: dict[int, object] = {}

        def keep_first(module, world_size, device):
            if id(module) not in kept:
                kept[id(module)] = built(module, world_size, device)
            return kept[id(module)]

        phase.wrap = keep_first
        return super().resume_from()
