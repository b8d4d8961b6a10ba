"""Where this process runs, and where freezelab keeps results that must outlive it.

Inside a Ray job (``ray job submit``) the working directory is Ray's temporary copy
of the upload, which Ray reuses for identical uploads and may delete: relative paths
there would lose the results. So inside a job, a relative ``storage_path`` and a
relative or default sqlite tracking file resolve under ``FREEZELAB_HOME`` (default
``~/freezelab``) on the driver's node instead, and freezelab says so.

>>> import os; os.environ.pop("RAY_JOB_CONFIG_JSON_ENV_VAR", None) and None
>>> job_submission_id() is None
True
"""

from __future__ import annotations

import json
import os
from pathlib import Path

HOME_ENV = "FREEZELAB_HOME"
LOG_LEVEL_ENV = "FREEZELAB_LOG_LEVEL"


def log_level() -> str:
    """How much of the libraries' own logging reaches the console: ``FREEZELAB_LOG_LEVEL``
    (set by ``freezelab -v``), else ``WARNING``. At the default, Ray Train's line per
    report and per checkpoint stay in Ray's log files; freezelab's own lines always show.

    >>> os.environ.pop("FREEZELAB_LOG_LEVEL", None) and None
    >>> log_level()
    'WARNING'
    """
    import logging

    level = (os.environ.get(LOG_LEVEL_ENV) or "WARNING").upper()
    return level if isinstance(logging.getLevelName(level), int) else "WARNING"


def verbose() -> bool:
    """True with ``freezelab -v`` (``FREEZELAB_LOG_LEVEL`` at INFO or DEBUG): the
    libraries' own progress output and INFO lines are shown too."""
    return log_level() in ("INFO", "DEBUG")


def job_submission_id() -> str | None:
    """The id of the Ray job this driver runs as (``ray job submit``), if any: Ray's job
    supervisor passes it to the entrypoint in the job config's metadata."""
    raw = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")
    if not raw:
        return None
    try:
        return json.loads(raw).get("metadata", {}).get("job_submission_id")
    except (ValueError, AttributeError):
        return None


def freezelab_home() -> Path:
    """``FREEZELAB_HOME``, else ``~/freezelab``: inside a Ray job, the default
    ``storage_path`` is ``freezelab_runs/`` there and the default MLflow store
    ``mlflow.db`` there."""
    return Path(os.path.expanduser(os.environ.get(HOME_ENV) or "~/freezelab")).resolve()


def results_base() -> Path:
    """What relative result paths are relative to: the working directory, except inside
    a Ray job, where it is :func:`freezelab_home`."""
    return freezelab_home() if job_submission_id() else Path.cwd()


def resolve_result_path(path: str) -> str:
    """An absolute local path for a result location (URIs are returned as they are)."""
    if "://" in path:
        return path
    expanded = Path(os.path.expanduser(path))
    if expanded.is_absolute():
        return str(expanded.resolve())
    return str((results_base() / expanded).resolve())
