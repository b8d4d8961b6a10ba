"""Where runs are tracked, and what a run's params and tags are.

The tracking URI is always explicit: the config's ``mlflow.tracking_uri``, else
``MLFLOW_TRACKING_URI``, else ``sqlite:///mlflow.db`` in the working directory.

>>> flatten_params({"policy": {"type": "last_n", "n": 3}, "epochs": 5})
{'policy.type': 'last_n', 'policy.n': '3', 'epochs': '5'}
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import urllib.parse
from pathlib import Path
from typing import Any

from freezelab.env import job_submission_id
from freezelab.errors import FreezelabError
from freezelab.redact import redact_text, redact_uri, strip_credentials
from freezelab.trainers.artifacts import (  # noqa: F401  (re-exported: the MLflow layer's API)
    DEFAULT_TRACKING_URI,
    resolve_tracking_uri,
    tracking_uri_set,
)


class TrackingUnavailable(FreezelabError, RuntimeError):
    """The tracking server cannot be reached before training starts."""


def ensure_reachable(uri: str, timeout_s: float = 10.0) -> None:
    """Raise TrackingUnavailable unless the tracking store answers."""
    if uri.startswith(("http://", "https://")):
        import urllib.error
        import urllib.request

        # The probe never resolves a host with user:password@ in front of it.
        bare, _ = strip_credentials(uri)
        shown = redact_uri(uri)
        try:
            with urllib.request.urlopen(
                bare.rstrip("/") + "/health", timeout=timeout_s
            ) as response:
                if response.status != 200:
                    raise TrackingUnavailable(
                        f"MLflow server {shown} answered {response.status} on /health"
                    )
        except (urllib.error.URLError, OSError) as err:
            raise TrackingUnavailable(
                f"MLflow tracking server {shown} is unreachable ({redact_text(str(err))}). "
                "Start it, fix mlflow.tracking_uri, or set mlflow.required: false to train "
                "without tracking."
            ) from None
        return
    if uri.startswith("sqlite:///"):
        # A file that does not exist yet is created by the run itself: checking must
        # not create it (a refused run leaves no database behind).
        database = Path(uri.removeprefix("sqlite:///"))
        folder = next((p for p in (database.parent, *database.parent.parents) if p.exists()), None)
        if not database.exists():
            if folder is None or not folder.is_dir() or not os.access(folder, os.W_OK):
                raise TrackingUnavailable(
                    f"MLflow tracking store {redact_uri(uri)}: cannot create {database} here"
                )
            return
    import mlflow

    try:
        mlflow.MlflowClient(tracking_uri=uri).search_experiments(max_results=1)
    except Exception as err:  # any store error means: cannot track here
        raise TrackingUnavailable(
            f"MLflow tracking store {redact_uri(uri)} is unusable: {redact_text(str(err))}"
        ) from None


def open_store(uri: str, timeout_s: float = 5.0) -> Any:
    """A client for a store that must already hold runs (``compare``, ``report``): a
    missing sqlite file is an error, never a new empty database, and an unreachable
    server fails within seconds instead of MLflow's minutes of retries."""
    import mlflow

    from freezelab.errors import NotFound

    if uri.startswith("sqlite:///"):
        database = Path(uri.removeprefix("sqlite:///"))
        if not database.is_file():
            raise NotFound(
                f"no MLflow database at {database}: give --tracking-uri (or run from the "
                "folder where training wrote mlflow.db)"
            )
    elif uri.startswith(("http://", "https://")):
        ensure_reachable(uri, timeout_s=timeout_s)
    return mlflow.MlflowClient(tracking_uri=uri)


# Where `mlflow ui` serves a local store unless told otherwise.
LOCAL_UI = "http://127.0.0.1:5000"


def ui_page(
    tracking_uri: str, experiment_id: str, run_id: str | None = None, *, view: str | None = None
) -> str:
    """The MLflow UI's page of an experiment's runs (or of one run) for a store: the
    server itself, or ``mlflow ui``'s default address for a local file. The page opens
    in the UI's model-training view (MLflow 3's UI otherwise opens on GenAI pages), and
    on the experiment's shared view ``view`` when given (``views.py``).

    >>> ui_page("http://bob:pw@mlflow:5000/", "3", "abc")
    'http://mlflow:5000/#/experiments/3/runs/abc?workflowType=machine_learning'
    >>> ui_page("sqlite:///mlflow.db", "3", view="freezelab-s1")
    'http://127.0.0.1:5000/#/experiments/3/runs?viewStateShareKey=freezelab-s1&workflowType=machine_learning'
    """
    if tracking_uri.startswith(("http://", "https://")):
        base = strip_credentials(tracking_uri)[0].rstrip("/")
    else:
        base = LOCAL_UI
    page = f"{base}/#/experiments/{experiment_id}/runs" + (f"/{run_id}" if run_id else "")
    query = {"viewStateShareKey": view} if view and not run_id else {}
    return page + "?" + urllib.parse.urlencode({**query, "workflowType": "machine_learning"})


def flatten_params(data: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested config to MLflow params: ``{"policy": {"n": 3}}`` -> ``{"policy.n": "3"}``."""
    flat: dict[str, str] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten_params(value, prefix=f"{name}."))
        else:
            text = str(value)
            flat[name] = text if len(text) <= 6000 else text[:5997] + "..."
    return flat


# The experiment tag MLflow's UI reads to open an experiment on its runs ("Machine
# learning"), rather than on traces and the GenAI overview.
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")

# What a user filters or plots runs by; the whole config is the run's config.yaml.
PARAM_KEYS = (
    "model.name",
    "model.pretrained",
    "model.head_init",
    "data.kind",
    "data.classes",
    "data.shift",
    "data.train_per_class",
    "epochs",
    "batch_size",
    "seed",
    "optimizer.name",
    "optimizer.lr",
)


POLICY_TYPE_PARAM = "policy.type"


def run_params(config: Any, swept: tuple[str, ...] = ()) -> dict[str, str]:
    """A run's MLflow params: its policy once, as its label (type and non-default
    fields) and its type, which every policy has; the config keys of ``PARAM_KEYS``
    that are set; and the ``swept`` keys (a sweep's dimensions, ``policy.n`` among
    them when a sweep varies it). A field that only some policies have is no param of
    its own: the compare view would plot it as an axis that most runs lack.

    >>> from freezelab.trainers.config import validate_config
    >>> config = validate_config({"name": "x", "model": {"name": "resnet18"}, "epochs": 3,
    ...     "data": {"kind": "digits"}, "policy": {"type": "last_n", "n": 2}})
    >>> params = run_params(config)
    >>> params["policy"], params["policy.type"], "policy.n" in params
    ('last_n(n=2)', 'last_n', False)
    >>> run_params(config, swept=("policy.n",))["policy.n"]
    '2'
    """
    flat = flatten_params({k: v for k, v in config.safe_dict().items() if k != "mlflow"})
    policy = {POLICY_TYPE_PARAM: config.policy.type}
    chosen = {k: flat[k] for k in (*PARAM_KEYS, *swept) if k in flat and flat[k] != "None"}
    return {"policy": config.policy.label(), **policy, **chosen}


def dataset_inputs(config: Any) -> list[Any]:
    """The run's datasets as MLflow inputs (the run page's and the runs table's Datasets):
    its training and validation splits, and each extra evaluation folder.

    A dataset is named by what it holds (``digits[5,6,7,8,9]``, a folder's name, plus
    its shift) and its digest changes with anything that changes its images: the data
    config and, for a local folder, its files' names and sizes.
    """
    from mlflow.entities import Dataset, DatasetInput, InputTag

    data = config.data
    if data.kind == "image_folder":
        # An object store's scheme is its MLflow source type (s3, gs, ...).
        scheme = data.root.split("://")[0] if "://" in data.root else "local"
        name, source_type, source = data.root.rstrip("/").rsplit("/", 1)[-1], scheme, data.root
    elif data.kind == "digits":
        name, source_type, source = "digits", "code", "sklearn.datasets.load_digits"
    else:
        name, source_type, source = "synthetic", "code", "freezelab synthetic tensors"
    if data.classes is not None:
        name += "[" + ",".join(map(str, data.classes)) + "]"
    if data.shift:
        name += f"+{data.shift}"
    described = {k: v for k, v in data.model_dump(mode="json").items() if k != "num_workers"}
    found = []
    splits = [
        ("train", "training", source_type, source),
        ("val", "validation", source_type, source),
    ]
    # An extra evaluation set is always an image folder.
    splits += [(n, "evaluation", "local", path) for n, path in sorted(data.eval_sets.items())]
    for split, context, kind, where in splits:
        digest = _digest({"data": described, "split": split}, where if kind == "local" else None)
        dataset = Dataset(
            name=f"{name}/{split}",
            digest=digest,
            source_type=kind,
            source=json.dumps({"uri": redact_uri(str(where))}),
        )
        found.append(DatasetInput(dataset, tags=[InputTag("mlflow.data.context", context)]))
    return found


def _digest(described: dict[str, Any], folder: str | None) -> str:
    hasher = hashlib.sha256(json.dumps(described, sort_keys=True).encode())
    if folder and "://" not in folder and Path(folder).is_dir():
        for path in sorted(Path(folder).rglob("*")):
            if path.is_file():
                hasher.update(f"{path.relative_to(folder)}:{path.stat().st_size}".encode())
    return hasher.hexdigest()[:12]


STAGE_TAG = "freezelab.stage"
PRETRAIN = "pretrain"
# The runs a verdict compares (a study's, a sweep's trials, a single run).
FINETUNE = "finetune"
# A study's id, on each of its runs; its target variant, on each fine-tuning run.
STUDY_TAG = "freezelab.study"
VARIANT_TAG = "freezelab.variant"
# A study's selection runs (each policy's own learning rate): the verdict reads none.
SELECT = "select"
# `freezelab advise`: signals and a ranking, no training (compare and report skip it).
ADVISE = "advise"


def run_tags(config: Any) -> dict[str, str]:
    """Tags that make runs searchable: model, dataset, job id, commit, version (the
    policy is the params ``policy`` and ``policy.type``)."""
    from freezelab import __version__

    tags = {
        **source_tags(),
        "freezelab.model": config.model.name,
        "freezelab.dataset": config.data.kind,
        "freezelab.version": __version__,
        "freezelab.run_name": config.name,
        # pretrain, finetune or trial: `compare` and `report` leave pretraining out.
        STAGE_TAG: FINETUNE,
    }
    node_id = ray_node_id()
    if node_id:
        tags["ray.node_id"] = node_id  # where this run logs from (a sqlite file is per node)
    job_id = job_submission_id()
    if job_id:
        tags["ray.job_submission_id"] = job_id
    commit = git_commit()
    if commit:
        tags["mlflow.source.git.commit"] = commit
    tags.update(config.mlflow.tags)
    return tags


HEAD_INIT_TAG = "freezelab.head_init"


def head_init_tags(config: Any) -> dict[str, str]:
    """What the run does with the classifier of the weights it starts from, as the
    model builder decides it on every rank (``head_init_decision``): ``kept`` or
    ``reset``, and why (``freezelab.head_init.reason``). The configured mode is the
    param ``model.head_init``."""
    from freezelab.trainers.models import head_init_decision

    decision = head_init_decision(config)
    return {HEAD_INIT_TAG: decision.action, f"{HEAD_INIT_TAG}.reason": decision.reason}


def source_tags() -> dict[str, str]:
    """MLflow's own user and source tags (what its fluent API sets, and the client API
    does not): the user, ``freezelab <command>`` or the script that trained, and
    whether it ran as a Ray job. A Ray worker process (a sweep's trial) has no command
    of its own: its driver passes these tags down."""
    import getpass
    import sys

    tags = {"mlflow.source.type": "JOB" if job_submission_id() else "LOCAL"}
    try:
        tags["mlflow.user"] = getpass.getuser()
    except (KeyError, OSError):  # a container user without a passwd entry
        pass
    path = Path(sys.argv[0]) if sys.argv and sys.argv[0] else None
    program = "" if path is None else path.parent.name if path.name == "__main__.py" else path.name
    if program == "freezelab" and len(sys.argv) > 1:
        tags["mlflow.source.name"] = f"freezelab {sys.argv[1]}"
    elif program and program != "default_worker.py":
        tags["mlflow.source.name"] = program
    return tags


def ray_node_id() -> str | None:
    import ray

    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else None


def git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None
