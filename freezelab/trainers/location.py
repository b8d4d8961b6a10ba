"""Where a run lives: ``storage_path/name``, its checkpoints, its identity and its
MLflow key.

One value object for a convention that the launcher, the loop's local mode, MLflow,
the report and the sweep all share.

A run's directory records the config it was started with (``freezelab_run.json``).
Running a name again resumes only the same run: a config that differs in anything
that changes the result is refused, naming the keys that differ, before Ray or MLflow
start (``claim``). Bookkeeping keys (``RESULT_NEUTRAL``) may change between attempts.

>>> where = RunLocation("/data/runs", "vgg16-last5")
>>> where.directory, where.key, where.is_remote
('/data/runs/vgg16-last5', '/data/runs/vgg16-last5', False)
>>> RunLocation("s3://bucket/runs/", "a").directory
's3://bucket/runs/a'

On object storage (``storage_path: s3://...``) the same holds: the record, the claim
and the checkpoints are read and written through ``freezelab.objectstore``, and a
checkpoint is read on this machine from a local copy (``checkpoint.local_copy``).
"""

from __future__ import annotations

import json
import logging
import os
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from freezelab import objectstore
from freezelab.errors import ConfigError, quote
from freezelab.redact import redact_config, redact_uri
from freezelab.trainers import checkpoint as ckpt

log = logging.getLogger(__name__)

PENDING_METRICS_FILE = "mlflow_pending_metrics.jsonl"
LOCAL_CHECKPOINTS = "local_checkpoints"
RECORD_FILE = "freezelab_run.json"

# Config keys (and key prefixes) that do not change what a run computes: where it is
# stored and tracked, how often it checkpoints, how failures are retried, where its
# workers go and how many loader processes feed them. Everything else does.
RESULT_NEUTRAL = (
    "name",
    "storage_path",
    "mlflow",
    "checkpoint",
    "metrics",
    "max_failures",
    "max_controller_failures",
    "scaling.resources_per_worker",
    "scaling.placement_strategy",
    "scaling.env_vars",
    "performance.torch_threads",
    "data.num_workers",
)


# Fields added after runs were recorded, with the value that computes what configs
# without the field computed: at that value a config hashes and compares as one
# recorded before the field existed, so a new release neither renames ({hash}) nor
# refuses the runs of an old one. A field added with another default is a change.
ADDED_FIELDS = {
    "data.loader": "auto",
    "data.skip_corrupt": False,
    "model.head_norm": "none",
    "data.test_fraction": None,
    "forgetting.source.test_fraction": None,  # the source task is a data section too
}


def result_fields(config: dict[str, Any]) -> dict[str, Any]:
    """The flattened config (``a.b`` keys) without the result-neutral keys, and
    without fields added later at the value that keeps the earlier result
    (``ADDED_FIELDS``)."""
    flat: dict[str, Any] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict) and node:
            for key, value in node.items():
                walk(value, f"{prefix}{key}.")
            return
        key = prefix[:-1]
        if key in ADDED_FIELDS and node == ADDED_FIELDS[key]:
            return
        if not any(key == n or key.startswith(n + ".") for n in RESULT_NEUTRAL):
            flat[key] = node

    walk(config, "")
    return flat


def config_changes(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """What differs between two configs in what changes the result:
    ``["epochs: 3 -> 2", "optimizer.lr: 0.05 -> 0.5"]``."""
    before, after = result_fields(old), result_fields(new)
    missing = object()
    return [
        f"{key}: {_shown(before.get(key, missing))} -> {_shown(after.get(key, missing))}"
        for key in sorted(before.keys() | after.keys())
        if before.get(key, missing) != after.get(key, missing)
    ]


def config_hash(config: dict[str, Any]) -> str:
    """8 hex digits that change with anything that changes the result."""
    import hashlib

    text = json.dumps(result_fields(config), sort_keys=True, default=str)
    return hashlib.sha1(text.encode()).hexdigest()[:8]


def _shown(value: Any) -> str:
    return (
        "(unset)"
        if not isinstance(value, (str, int, float, bool, list, type(None)))
        else quote(value, 60)
    )


def is_remote(path: str) -> bool:
    """True for a URI (``s3://``, ``gs://``, ``http://``, ...), False for a local path."""
    return objectstore.is_uri(path)


@dataclass(frozen=True)
class RunLocation:
    """A run's directory, local or on object storage: everything that reads or writes
    a run's files goes through here (``objectstore`` for a URI)."""

    storage_path: str
    name: str

    @classmethod
    def of(cls, config: Any) -> RunLocation:
        return cls(config.storage_path, config.name)

    @property
    def is_remote(self) -> bool:
        return is_remote(self.storage_path)

    @property
    def directory(self) -> str:
        return f"{self.storage_path.rstrip('/')}/{self.name}"

    @property
    def path(self) -> Path:
        """The run's directory on this machine (local storage only)."""
        if self.is_remote:
            raise ValueError(f"{self.directory} is remote storage, not a local path")
        return Path(self.directory)

    @property
    def key(self) -> str:
        """The run's identity in MLflow (the tag ``freezelab.run_key``): its directory,
        with any password in a storage URI hidden."""
        return redact_uri(self.directory)

    @property
    def local_checkpoint_dir(self) -> Path | str:
        """Where a run in one process (``num_workers: 0``) keeps its checkpoints (a URI
        on remote storage)."""
        return (
            objectstore.join(self.directory, LOCAL_CHECKPOINTS)
            if self.is_remote
            else (self.path / LOCAL_CHECKPOINTS)
        )

    def file(self, name: str) -> str:
        """The path (or URI) of the file ``name`` in the run's directory."""
        return objectstore.join(self.directory, name)

    def read_file(self, name: str) -> str | None:
        """The text of the run's file ``name``, None when there is none."""
        try:
            return objectstore.read_text(self.file(name))
        except FileNotFoundError:
            return None

    def write_file(self, name: str, text: str) -> None:
        objectstore.write_text(self.file(name), text)

    def remove_file(self, name: str) -> None:
        objectstore.delete(self.file(name))

    @property
    def pending_metrics_file(self) -> str:
        """Metrics that MLflow could not take yet, as JSON lines (a path or a URI)."""
        return self.file(PENDING_METRICS_FILE)

    def checkpoints(self) -> list[Path | str]:
        """Complete checkpoints of this run (Ray Train's or local mode's), oldest first:
        local directories, or their URIs on remote storage."""
        if self.is_remote:
            return self._remote_checkpoints()
        if not self.path.is_dir():
            return []
        found = []
        for state_file in self.path.glob(f"**/{ckpt.STATE_FILE}"):
            directory = state_file.parent
            if directory.name.startswith(".") or not (directory / ckpt.MODEL_FILE).is_file():
                continue
            epoch = _epoch_of(directory)
            if epoch is not None:
                found.append((epoch, directory.stat().st_mtime, directory))
        return [directory for *_, directory in sorted(found)]

    def _remote_checkpoints(self) -> list[str]:
        files = set(objectstore.list_files(self.directory))
        found = []
        for file in files:
            directory, _, base = file.rpartition("/")
            hidden = any(
                part.startswith(".") for part in directory[len(self.directory) :].split("/")
            )
            if base != ckpt.STATE_FILE or hidden or f"{directory}/{ckpt.MODEL_FILE}" not in files:
                continue
            epoch = _epoch_of(directory)
            if epoch is not None:
                # Ray Train names its checkpoints by time: the name orders one epoch's.
                found.append((epoch, directory))
        return [directory for _, directory in sorted(found)]

    def latest_checkpoint(self) -> Path | str | None:
        found = self.checkpoints()
        return found[-1] if found else None

    @property
    def record_file(self) -> Path:
        return self.path / RECORD_FILE

    def read_record(self) -> dict[str, Any] | None:
        """The run's identity (``uid``) and the config it was started with, if any.

        A run from before records existed is identified by its latest checkpoint."""
        text = self.read_file(RECORD_FILE)
        if text is not None:
            return json.loads(text)
        latest = self.latest_checkpoint()
        if latest is not None:
            return {"uid": None, "config": ckpt.read_state(latest).get("config") or {}}
        return None

    def claim(self, config: Any, *, overwrite: bool = False) -> str | None:
        """Make this directory the run of ``config``; returns the run's uid.

        A new run records its config. The same config again resumes (same uid). A
        changed config raises, naming the keys that differ, unless ``overwrite``: then
        the old run is moved aside (``NAME.replaced-TIMESTAMP``), never deleted. On
        object storage, moving is copying every object, then deleting the originals.
        """
        mine = config.safe_dict()
        record = self.read_record()
        if record is not None and not overwrite:
            # Older checkpoints saved the config unredacted: compare like with like.
            changes = config_changes(redact_config(record["config"]), mine)
            if changes:
                shown = "; ".join(changes[:6]) + (
                    f"; and {len(changes) - 6} more" if len(changes) > 6 else ""
                )
                raise ConfigError(
                    f"run {self.name!r} at {self.key} was trained with another config "
                    f"({shown}). Choose another name, pass --overwrite to move the old run "
                    "aside, or use a name template such as name: "
                    f"'{self.name}-{{policy}}-{{hash}}' so that each config gets its own run"
                )
            if record.get("uid") or self.read_file(RECORD_FILE) is not None:
                return record.get("uid")
            # A run from before records existed: recorded without a uid, so it keeps
            # its MLflow run (whose key has none).
            return self._record(None, mine)
        if overwrite:
            self._move_aside()
        return self._record(uuid.uuid4().hex[:12], mine)

    def _move_aside(self) -> None:
        aside = f"{self.name}.replaced-{time.strftime('%Y%m%d-%H%M%S')}"
        if not self.is_remote:
            if self.path.exists():
                self.path.rename(self.path.with_name(aside))
                log.info(f"--overwrite: the old run {self.name!r} moved to {aside}")
            return
        if not objectstore.exists(self.directory):
            return
        target = objectstore.join(self.storage_path, aside)
        # Every object is copied before any is deleted: an interruption leaves the old
        # run complete in one place at least.
        objectstore.copy_tree(self.directory, target)
        objectstore.delete(self.directory)
        log.info(f"--overwrite: the old run {self.name!r} moved to {redact_uri(target)}")

    def _record(self, uid: str | None, config: dict[str, Any]) -> str | None:
        """Write the record, unless another process just did: then that one decides."""
        text = json.dumps({"uid": uid, "config": config}, indent=2, sort_keys=True)
        if self.is_remote:
            return self._record_remote(uid, config, text)
        self.path.mkdir(parents=True, exist_ok=True)
        partial = self.path / f".{RECORD_FILE}.{uuid.uuid4().hex}"
        partial.write_text(text)
        try:
            os.link(partial, self.record_file)  # fails if the record exists: no race
        except FileExistsError:
            return self._settled(json.loads(self.record_file.read_text()), config)
        finally:
            partial.unlink(missing_ok=True)
        return uid

    def _record_remote(self, uid: str | None, config: dict[str, Any], text: str) -> str | None:
        """pyarrow has no create-if-absent on object stores: write, then read back. A
        record that is not ours then was written in between by another process, which
        decides. (Two writes within the same instant can still both read their own.)"""
        existing = self.read_file(RECORD_FILE)
        if existing is not None:
            return self._settled(json.loads(existing), config)
        self.write_file(RECORD_FILE, text)
        back = json.loads(self.read_file(RECORD_FILE) or text)
        if back.get("uid") != uid or back.get("config") != config:
            return self._settled(back, config)
        return uid

    def _settled(self, other: dict[str, Any], config: dict[str, Any]) -> str | None:
        if config_changes(other["config"], config):
            raise ConfigError(
                f"run {self.name!r} at {self.key} was just started by another "
                "process with another config; choose another name"
            )
        return other.get("uid")

    def mlflow_key(self) -> str:
        """The run's key in MLflow: its directory and uid, so a run started again under
        the same name (``--overwrite``) never continues the old run's MLflow run."""
        record = self.read_record()
        uid = record.get("uid") if record else None
        return f"{self.key}#{uid}" if uid else self.key

    def completed_checkpoint(self, epochs: int) -> Path | str | None:
        """The final checkpoint of a run that already trained all ``epochs``."""
        latest = self.latest_checkpoint()
        if latest is not None and ckpt.read_state(latest)["epoch"] >= epochs - 1:
            return latest
        return None


def _epoch_of(directory: Path | str) -> int | None:
    try:
        return int(ckpt.read_state(directory)["epoch"])
    except (OSError, ValueError, KeyError, TypeError):
        return None  # a checkpoint being written, or not one of ours
