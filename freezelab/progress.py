"""Progress on the driver: what each run is doing while it trains.

On a terminal, a live bar per run (epoch x/N, phase, train_loss, val_acc, img/s and
the time left), and for a sweep one bar per running trial over a count of the
finished ones. Anywhere else (CI, a ``ray job submit`` log, a pipe), one plain line
per epoch, the same line a terminal keeps once its bar is done:

>>> import io
>>> progress = Progress(stream=io.StringIO())
>>> progress.start("run", "tiny-full", epochs=3)
>>> progress.update("run", {"epoch": 0, "phase": "main", "train_loss": 1.25, "train_acc": 0.5,
...     "val_loss": 1.5, "val_acc": 0.4, "epoch_time_s": 2.0, "images_per_s": 60.0})
>>> progress.stream.getvalue().split(": ")[0]
'[freezelab] tiny-full epoch 1/3 phase main'

The display reads the reports that reach the driver: a Tune callback's results for a
sweep, and for a training run the lines that :class:`ProgressFeed` (a Ray Train
callback) appends to a file. Ray Train runs its controller, and so its callbacks, on
the driver's node, so a local file reaches the driver from any cluster.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

# What a progress line needs of an epoch's report (the report has ~40 keys).
EPOCH_KEYS = (
    "epoch",
    "phase",
    "train_loss",
    "train_acc",
    "val_loss",
    "val_acc",
    "epoch_time_s",
    "images_per_s",
    "feature_cache",
)


def epoch_line(name: str, epochs: int, m: dict[str, Any]) -> str:
    """One epoch as one line: the plain output, and what a finished bar leaves."""
    return (
        f"[freezelab] {name} epoch {int(m['epoch']) + 1}/{epochs} phase {m['phase']}: "
        f"train_loss {m['train_loss']:.4f} train_acc {m['train_acc']:.3f} "
        f"val_loss {m['val_loss']:.4f} val_acc {m['val_acc']:.3f} "
        f"({m['epoch_time_s']:.1f}s, {m['images_per_s']:.0f} img/s"
        f"{', cached features' if m.get('feature_cache') else ''})"
    )


def _postfix(m: dict[str, Any]) -> str:
    # What a narrow terminal cuts off first comes last.
    return (
        f"val_acc {m['val_acc']:.3f} train_loss {m['train_loss']:.3f} "
        f"{m['images_per_s']:.0f} img/s phase {m['phase']}"
    )


class Progress:
    """Bars on a terminal (``live``), plain lines elsewhere; safe to call from threads.

    ``start``, ``update`` and ``finish`` take a key per run (a sweep's trial id); a
    sweep calls ``expect`` first, which adds the count of finished trials.
    """

    def __init__(self, stream: IO[str] | None = None, live: bool | None = None):
        self.stream = stream if stream is not None else sys.stdout
        isatty = getattr(self.stream, "isatty", None)
        self.live = bool(isatty and isatty()) if live is None else live
        self._lock = threading.RLock()
        self._runs: dict[str, dict[str, Any]] = {}
        self._counter: Any = None  # the bar of finished trials (a sweep, live)
        self._sweep = False
        self._finished = self._failed = 0
        self._expected: int | None = None

    def expect(self, label: str, total: int | None, done: int = 0) -> None:
        """A sweep: ``total`` trials (None: unknown) counted as they finish, ``done`` of
        them finished already (a resumed sweep's)."""
        self._sweep = True
        self._expected = total
        self._finished = done
        if self.live:
            from tqdm import tqdm

            self._counter = tqdm(
                total=total,
                desc=f"[freezelab] {label}: trials finished",
                file=self.stream,
                **_size(),
                bar_format="{desc} {n_fmt}/{total_fmt} [{elapsed}<{remaining}]{postfix}",
            )

    def start(self, key: str, name: str, epochs: int) -> None:
        with self._lock:
            run = {"name": name, "epochs": epochs, "bar": None, "last": None}
            if self.live:
                from tqdm import tqdm

                run["bar"] = tqdm(
                    total=epochs,
                    desc=f"{name} epoch",
                    unit="epoch",
                    file=self.stream,
                    **_size(),
                    leave=self._counter is None,
                    # tqdm puts ", " before the postfix: it reads as the bar's tail.
                    bar_format="{desc} {n_fmt}/{total_fmt} |{bar:10}| ETA {remaining}{postfix}",
                )
            self._runs[key] = run

    def __contains__(self, key: str) -> bool:
        return key in self._runs

    def update(self, key: str, metrics: dict[str, Any]) -> None:
        """One epoch of run ``key`` (a report: ``epoch`` counts from 0)."""
        with self._lock:
            run = self._runs.get(key)
            if run is None or not all(k in metrics for k in EPOCH_KEYS[:-1]):
                return
            run["last"] = metrics
            bar = run["bar"]
            if bar is None:
                self._write(epoch_line(run["name"], run["epochs"], metrics))
                return
            bar.n = int(metrics["epoch"]) + 1
            bar.set_postfix_str(_postfix(metrics), refresh=False)
            bar.refresh()

    def finish(self, key: str, outcome: str | None = None, *, failed: bool = False) -> None:
        """Run ``key`` ended; ``outcome`` (a sweep's ``stopped after ...``, ``failed: ...``)
        is printed as a line of its own, and ``failed`` counts it as a failed trial."""
        with self._lock:
            run = self._runs.pop(key, None)
            if run is None:
                return
            if run["bar"] is not None:
                run["bar"].close()
            if not self._sweep:
                return
            self._finished += 1
            self._failed += failed
            if run["last"] is not None and self.live:
                self._write(epoch_line(run["name"], run["epochs"], run["last"]))
            if outcome:
                self._write(f"[freezelab] {run['name']}: {outcome}")
            if self._counter is not None:
                self._counter.n = self._finished
                if self._failed:
                    self._counter.set_postfix_str(f"{self._failed} failed", refresh=False)
                self._counter.refresh()
            else:
                total = "?" if self._expected is None else self._expected
                self._write(f"[freezelab] trials finished: {self._finished}/{total}")

    def close(self) -> None:
        with self._lock:
            for key in list(self._runs):
                self.finish(key)
            if self._counter is not None:
                self._counter.close()
                self._counter = None

    def _write(self, text: str) -> None:
        if self.live:
            from tqdm import tqdm

            tqdm.write(text, file=self.stream)
        else:
            print(text, file=self.stream, flush=True)


def _size() -> dict[str, int]:
    """The terminal's size for tqdm: one that reports none (0x0) gets 100x24, as tqdm
    would otherwise hide every bar below row 0."""
    columns, rows = shutil.get_terminal_size((100, 24))
    return {"ncols": columns or 100, "nrows": rows or 24}


class ProgressFeed:
    """A Ray Train callback (it runs in the Train controller, on the driver's node)
    that appends each epoch's report to ``path``, one JSON line; the driver tails it."""

    def __init__(self, path: str):
        self.path = path

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any):
        report = metrics[0] if metrics else {}
        line = json.dumps({k: report[k] for k in EPOCH_KEYS if k in report})
        with open(self.path, "a", encoding="utf-8") as out:
            out.write(line + "\n")


class _Direct:
    """The feed of a run that trains in this process: straight to the display."""

    def __init__(self, progress: Progress, key: str):
        self.progress = progress
        self.key = key

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any):
        self.progress.update(self.key, metrics[0] if metrics else {})


def _feed_class() -> type:
    """``ProgressFeed`` as a ``ray.train.UserCallback`` (Ray imported only when used)."""
    from ray.train import UserCallback

    class _RayProgressFeed(ProgressFeed, UserCallback):
        pass

    return _RayProgressFeed


@contextlib.contextmanager
def followed(
    name: str, epochs: int, progress: Progress | None = None, *, ray_train: bool = True
) -> Iterator[Any]:
    """The feed for one training run, and a thread on the driver that shows what it
    receives until the run ends: ``with followed(name, epochs) as feed: train(feed)``."""
    progress = progress or Progress()
    with tempfile.TemporaryDirectory(prefix="freezelab-progress-") as tmp:
        path = Path(tmp) / "reports.jsonl"
        path.touch()
        # In this process, the loop's reporter calls the display itself: each epoch
        # shows before the loop prints anything of the next.
        feed = _feed_class()(str(path)) if ray_train else _Direct(progress, name)
        progress.start(name, name, epochs)
        done = threading.Event()
        reader = threading.Thread(
            target=_tail, args=(path, progress, name, done), name="freezelab-progress", daemon=True
        )
        reader.start()
        try:
            yield feed
        finally:
            done.set()
            reader.join()
            progress.finish(name)


def _tail(path: Path, progress: Progress, key: str, done: threading.Event) -> None:
    """Show each complete line of ``path`` as it arrives; read the rest once ``done``."""
    offset = 0
    while True:
        finished = done.wait(0.2)
        with open(path, "rb") as src:
            src.seek(offset)
            chunk = src.read()
        complete = chunk[: chunk.rfind(b"\n") + 1]
        offset += len(complete)
        for line in complete.splitlines():
            with contextlib.suppress(ValueError):
                progress.update(key, json.loads(line))
        if finished:
            return
