"""How the training loop reports an epoch, and where it finds the checkpoint to resume.

The loop calls one reporter, chosen by the caller:

- :class:`RayTrainReporter` in a Ray Train run: ``ray.train.report`` with a checkpoint
  that Ray Train stores and registers, and ``ray.train.get_checkpoint`` on resume.
- :class:`LocalReporter` for a run in one process (``num_workers: 0``), where no Ray
  Train controller keeps checkpoints or calls callbacks: it writes the checkpoints where
  a rerun finds them and calls the run's callbacks itself, so MLflow logging and resume
  work the same in both modes.

``report`` is a barrier in a Ray Train run: every rank calls it once per epoch.

>>> reporter = RayTrainReporter()
>>> # reporter.report(metrics, write_checkpoint=lambda directory: ...)  inside the loop
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Callable, Iterable, Sequence
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any, Protocol

WriteCheckpoint = Callable[[Path], None]


class Reporter(Protocol):
    def resume_from(self) -> AbstractContextManager[str | None]:
        """A context manager yielding the directory of the checkpoint to resume, or None."""
        ...

    def report(self, metrics: dict[str, Any], write_checkpoint: WriteCheckpoint | None) -> None:
        """Report one epoch's metrics; ``write_checkpoint(directory)`` saves one (rank 0)."""
        ...


class RayTrainReporter:
    """``ray.train.report`` with checkpoints that Ray Train stores under ``storage_path``."""

    def resume_from(self) -> AbstractContextManager[str | None]:
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        return checkpoint.as_directory() if checkpoint is not None else nullcontext(None)

    def report(self, metrics: dict[str, Any], write_checkpoint: WriteCheckpoint | None) -> None:
        import ray.train

        if write_checkpoint is None:
            ray.train.report(metrics)
            return
        with tempfile.TemporaryDirectory() as directory:
            write_checkpoint(Path(directory))
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory))


class LocalReporter:
    """Checkpoints in ``directory`` (``checkpoint_epoch=NNNNNN``, the newest ``keep``),
    and the run's Train callbacks called after every report, as the controller would."""

    def __init__(self, directory: str | Path, keep: int | None, callbacks: Sequence[Any] = ()):
        self.directory = Path(directory)
        self.keep = keep
        self.callbacks = list(callbacks)
        self.last_metrics: dict[str, Any] = {}

    def resume_from(self) -> AbstractContextManager[str | None]:
        latest = self.latest()
        return nullcontext(str(latest) if latest is not None else None)

    def latest(self) -> Path | None:
        found = sorted(self.directory.glob("checkpoint_epoch=*")) if self.directory.is_dir() else []
        complete = [d for d in found if (d / "state.json").is_file()]
        return complete[-1] if complete else None

    def report(self, metrics: dict[str, Any], write_checkpoint: WriteCheckpoint | None) -> None:
        import ray.train

        checkpoint = None
        if write_checkpoint is not None:
            directory = self.directory / f"checkpoint_epoch={int(metrics['epoch']):06d}"
            partial = directory.with_name("." + directory.name + ".partial")
            shutil.rmtree(partial, ignore_errors=True)
            write_checkpoint(partial)
            shutil.rmtree(directory, ignore_errors=True)
            partial.rename(directory)  # a checkpoint is complete or absent, never half-written
            self._prune()
            checkpoint = ray.train.Checkpoint.from_directory(str(directory))
        self.last_metrics = metrics
        for callback in self.callbacks:
            callback.after_report(run_context=None, metrics=[metrics], checkpoint=checkpoint)

    def _prune(self) -> None:
        if self.keep is None:
            return
        found = sorted(
            d for d in self.directory.iterdir() if d.name.startswith("checkpoint_epoch=")
        )
        for old in found[: -self.keep]:
            shutil.rmtree(old, ignore_errors=True)


def history_from_epochs(epochs: Iterable[dict[str, Any]]) -> dict[str, dict[int, float]]:
    """The loop's per-epoch metrics as MLflow holds them: ``key -> {step: value}``, the
    numbers at ``step=epoch``, the early steps' gradient norms at their global step."""
    history: dict[str, dict[int, float]] = {}
    for key, value, step in (point for epoch in epochs for point in metric_points(epoch)):
        history.setdefault(key, {})[step] = value
    return history


def metric_points(report: dict[str, Any]) -> list[tuple[str, float, int]]:
    """``(key, value, step)`` of one epoch's report, as MLflow logs them."""
    epoch = int(report["epoch"])
    points = [
        (key, float(value), epoch)
        for key, value in report.items()
        if isinstance(value, (int, float)) and not isinstance(value, bool) and key != "epoch"
    ]
    for row in json.loads(report.get("early_steps") or "[]"):
        step = int(row["step"])
        points += [(f"early/{k}", float(v), step) for k, v in row.items() if k != "step"]
    return points
