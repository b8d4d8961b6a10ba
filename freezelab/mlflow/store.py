"""The records in the tracking store that several runs share or look up: experiments,
a run found by its key, datasets.

Runs that start at once (sweep trials, two Ray jobs) race on these, so creating them
tolerates another run having just done it. A run is found again by its key (storage
path and name, ``RunLocation.mlflow_key``), which freezelab puts in a tag.

>>> client = mlflow.MlflowClient(tracking_uri="sqlite:///mlflow.db")  # doctest: +SKIP
>>> find_run_by_key(client, experiment_id_for(client, "freezelab"), key)  # doctest: +SKIP
'1f0c...'
"""

from __future__ import annotations

import logging
import random
import re
import time
from pathlib import Path
from typing import Any

from freezelab.mlflow.tracking import EXPERIMENT_KIND

RUN_KEY_TAG = "freezelab.run_key"

log = logging.getLogger(__name__)


def experiment_id_for(client: Any, name: str) -> str:
    """The id of experiment ``name``, created when missing.

    The experiment is marked as model training (MLflow's ``mlflow.experimentKind``),
    so the UI opens it on its runs, not on the GenAI overview.

    With a sqlite store, a new experiment keeps its artifacts in ``mlruns/`` next to
    the database file. MLflow's default is ``./mlruns`` in the current directory, which
    for a Ray job is its temporary working directory: the logged models would be lost.
    """
    experiment = client.get_experiment_by_name(name)
    if experiment:
        if EXPERIMENT_KIND[0] not in experiment.tags:
            client.set_experiment_tag(experiment.experiment_id, *EXPERIMENT_KIND)
        return experiment.experiment_id
    uri = client.tracking_uri
    location = None
    if uri.startswith("sqlite:///"):
        database = Path(uri.removeprefix("sqlite:///")).resolve()
        # The experiment's name as a folder name, never a path out of mlruns/ ("..").
        slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", name).lstrip(".") or "_"
        location = (database.parent / "mlruns" / slug).as_uri()
    from mlflow.exceptions import MlflowException

    try:
        return client.create_experiment(
            name, artifact_location=location, tags=dict([EXPERIMENT_KIND])
        )
    except MlflowException as err:
        # Two runs that start at once (two Ray jobs) both found it missing.
        experiment = client.get_experiment_by_name(name)
        if err.error_code != "RESOURCE_ALREADY_EXISTS" or experiment is None:
            raise
        return experiment.experiment_id


def log_datasets(client: Any, run_id: str, datasets: list[Any], attempts: int = 5) -> None:
    """Record ``datasets`` as the run's inputs.

    MLflow's store looks a dataset up by experiment, name and digest, then inserts it
    when missing. Sweep trials start together and log the same datasets, so two of them
    can both find it missing and the second insert fails on the key. Retried, the
    lookup finds the row the other trial wrote. Inputs describe the run; if the store
    keeps refusing them, the run goes on without them, with a warning.
    """
    from mlflow.exceptions import MlflowException

    for attempt in range(1, attempts + 1):
        try:
            client.log_inputs(run_id, datasets=datasets)
            return
        except MlflowException as err:
            if attempt == attempts:
                log.warning(
                    "MLflow refused the datasets of run %s (%s); the run goes on without them",
                    run_id,
                    str(err).splitlines()[0][:200],
                )
                return
            time.sleep(0.05 * attempt + random.random() * 0.1)


def find_run_by_key(client: Any, experiment_id: str, key: str) -> str | None:
    """The run that freezelab opened for ``key`` (storage path and name), if any: a
    rerun of the same name continues its MLflow run as it continues training."""
    found = client.search_runs([experiment_id], filter_string=run_key_filter(key), max_results=1)
    return found[0].info.run_id if found else None


def run_key_filter(key: str) -> str:
    """The ``search_runs`` filter that finds the run of ``key``."""
    quoted = key.replace("'", "\\'")
    return f"tags.`{RUN_KEY_TAG}` = '{quoted}'"
