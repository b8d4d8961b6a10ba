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
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path
from typing import Any, Protocol

from freezelab import objectstore
from freezelab.trainers.checkpoint import STATE_FILE
from freezelab.trainers.metric_names import IMAGES_PER_S, NOT_LOGGED, mlflow_name, mlflow_value

WriteCheckpoint = Callable[[Path], None]

CHECKPOINT_PREFIX = "checkpoint_epoch="


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
    and the run's Train callbacks called after every report, as the controller would.

    ``directory`` may be a URI (``storage_path: s3://...``): each checkpoint is written
    locally, then uploaded with its ``state.json`` last (a checkpoint without one is
    incomplete and never resumed from), and resuming downloads the latest."""

    def __init__(self, directory: str | Path, keep: int | None, callbacks: Sequence[Any] = ()):
        self.remote = objectstore.is_uri(str(directory))
        self.directory = str(directory).rstrip("/") if self.remote else Path(directory)
        self.keep = keep
        self.callbacks = list(callbacks)
        self.last_metrics: dict[str, Any] = {}

    def resume_from(self) -> AbstractContextManager[str | None]:
        latest = self.latest()
        if latest is not None and self.remote:
            return _downloaded(str(latest))
        return nullcontext(str(latest) if latest is not None else None)

    def latest(self) -> Path | str | None:
        complete = self._checkpoints()
        return complete[-1] if complete else None

    def _checkpoints(self) -> list[Path | str]:
        """Complete checkpoints (with their ``state.json``), oldest first."""
        if self.remote:
            files = objectstore.list_files(self.directory)
            return sorted(
                {
                    file.rsplit("/", 1)[0]
                    for file in files
                    if file.endswith(f"/{STATE_FILE}")
                    and file[len(self.directory) + 1 :].startswith(CHECKPOINT_PREFIX)
                    and file[len(self.directory) + 1 :].count("/") == 1
                }
            )
        if not self.directory.is_dir():
            return []
        found = sorted(self.directory.glob(f"{CHECKPOINT_PREFIX}*"))
        return [d for d in found if (d / STATE_FILE).is_file()]

    def report(self, metrics: dict[str, Any], write_checkpoint: WriteCheckpoint | None) -> None:
        import ray.train

        checkpoint = None
        if write_checkpoint is not None:
            name = f"{CHECKPOINT_PREFIX}{int(metrics['epoch']):06d}"
            if self.remote:
                target = self._upload(name, write_checkpoint)
            else:
                target = self.directory / name
                partial = target.with_name("." + name + ".partial")
                shutil.rmtree(partial, ignore_errors=True)
                write_checkpoint(partial)
                shutil.rmtree(target, ignore_errors=True)
                partial.rename(target)  # a checkpoint is complete or absent, never half-written
            self._prune()
            checkpoint = ray.train.Checkpoint(str(target))
        self.last_metrics = metrics
        for callback in self.callbacks:
            callback.after_report(run_context=None, metrics=[metrics], checkpoint=checkpoint)

    def _upload(self, name: str, write_checkpoint: WriteCheckpoint) -> str:
        target = objectstore.join(self.directory, name)
        with tempfile.TemporaryDirectory() as scratch:
            files = Path(scratch) / name
            write_checkpoint(files)
            state = (files / STATE_FILE).read_text()
            (files / STATE_FILE).unlink()
            objectstore.delete(target)
            objectstore.copy_tree(str(files), target)
            objectstore.write_text(objectstore.join(target, STATE_FILE), state)
        return target

    def _prune(self) -> None:
        if self.keep is None:
            return
        for old in self._checkpoints()[: -self.keep]:
            if self.remote:
                objectstore.delete(str(old))
            else:
                shutil.rmtree(old, ignore_errors=True)


@contextmanager
def _downloaded(uri: str) -> Iterator[str]:
    """A checkpoint on object storage, downloaded whole (optimizer state included) into
    a temporary folder for the block."""
    with tempfile.TemporaryDirectory() as scratch:
        objectstore.copy_tree(uri, scratch)
        yield scratch


def history_from_epochs(epochs: Iterable[dict[str, Any]]) -> dict[str, dict[int, float]]:
    """The loop's per-epoch metrics as MLflow holds them: ``key -> {step: value}``, the
    numbers at ``step=epoch``, the early steps' gradient norms at their global step."""
    history: dict[str, dict[int, float]] = {}
    for key, value, step in (point for epoch in epochs for point in metric_points(epoch)):
        history.setdefault(key, {})[step] = value
    return history


def metric_points(report: dict[str, Any]) -> list[tuple[str, float, int]]:
    """``(name, value, step)`` of one epoch's report, as MLflow logs them: under their
    MLflow names and units (``metric_names``), and the run's throughput so far."""
    epoch = int(report["epoch"])
    points = [
        (mlflow_name(key), mlflow_value(key, float(value)), epoch)
        for key, value in report.items()
        if isinstance(value, (int, float))
        and not isinstance(value, bool)
        and key != "epoch"
        and key not in NOT_LOGGED
    ]
    images, seconds = report.get("train_images"), report.get("train_time_s")
    if images is not None and seconds:
        points.append((IMAGES_PER_S, float(images) / float(seconds), epoch))
    for row in json.loads(report.get("early_steps") or "[]"):
        step = int(row["step"])
        points += [(f"early/{k}", float(v), step) for k, v in row.items() if k != "step"]
    return points
