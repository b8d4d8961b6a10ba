"""Checks that a multi-node cluster can run a job, made before any worker starts.

On one node everything is shared. On several, two things must hold, and neither can be
read off a URI's scheme, so both are checked from every node:

- ``storage_path`` is storage that every node sees: the driver writes a marker file
  there, and a task pinned to each node must read it back.
- the MLflow tracking URI is reachable from every process that logs. A ``freezelab
  train`` logs from the driver and the Train controller, which Ray Train attaches to the
  driver's node; a sweep's trials log from wherever Tune places them. A sqlite file is a
  file on one node: a sweep that tracks in one pins its trials to that node.

>>> check_cluster(config, logging_nodes="driver")  # doctest: +SKIP
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any, Literal

from freezelab import objectstore
from freezelab.errors import ConfigError
from freezelab.redact import redact_uri

MARKER_DIR = ".freezelab-storage-check"
ANSWER_TIMEOUT_S = 120.0


def alive_nodes() -> list[dict[str, Any]]:
    import ray

    return [node for node in ray.nodes() if node.get("Alive")]


def driver_node_id() -> str:
    import ray

    return ray.get_runtime_context().get_node_id()


def check_cluster(config: Any, *, logging_nodes: Literal["driver", "all"]) -> None:
    """Refuse, with a ConfigError, a config that a cluster of several nodes cannot run.

    ``logging_nodes`` says where MLflow is written from: only the driver's node
    (``freezelab train``), or any node (a sweep's trials). Does nothing on one node.
    """
    nodes = alive_nodes()
    if len(nodes) < 2:
        return
    check_shared_storage(config.storage_path, nodes)
    if config.mlflow.enabled:
        from freezelab.mlflow.tracking import resolve_tracking_uri

        uri = resolve_tracking_uri(config.mlflow.tracking_uri)
        targets = nodes if logging_nodes == "all" else _only(nodes, driver_node_id())
        check_tracking_uri(uri, targets)


def check_shared_storage(storage_path: str, nodes: list[dict[str, Any]]) -> None:
    """Raise ConfigError unless a file the driver writes under ``storage_path`` can be
    read from a task on each of ``nodes``."""
    fs, root = objectstore.filesystem(storage_path, "storage_path")
    token = uuid.uuid4().hex
    marker = f"{root.rstrip('/')}/{MARKER_DIR}/{token}"
    try:
        fs.create_dir(f"{root.rstrip('/')}/{MARKER_DIR}", recursive=True)
        with fs.open_output_stream(marker) as stream:
            stream.write(token.encode())
    except OSError as err:
        raise ConfigError(
            f"storage_path {redact_uri(storage_path)!r}: the driver cannot write there: "
            f"{objectstore.reason(err)}"
        ) from None
    try:
        answers = _ask_every_node(_read_marker, nodes, storage_path, marker)
    finally:
        try:
            fs.delete_file(marker)
        except OSError:
            pass
    blind = [
        f"  node {_describe(node)}: {answer or 'no answer'}"
        for node, answer in answers
        if answer != token
    ]
    if blind:
        raise ConfigError(
            f"storage_path {redact_uri(storage_path)!r} is not shared by the {len(nodes)} "
            "nodes of this "
            "cluster: a marker file the driver wrote there is not readable from\n"
            + "\n".join(blind)
            + "\nOn more than one node, storage_path must be storage every node sees: "
            "s3://BUCKET/PATH, gs://BUCKET/PATH, or a path mounted on every node (e.g. NFS)."
        )


def check_tracking_uri(uri: str, nodes: list[dict[str, Any]]) -> None:
    """Raise ConfigError unless the tracking server ``uri`` answers on each of ``nodes``.

    A local store (``sqlite:///``, a plain path) is written by processes on the driver's
    node only: ``nodes`` must then be that node alone.
    """
    if not uri.startswith(("http://", "https://")):
        if is_local_store(uri) and len(nodes) > 1:
            raise ConfigError(
                f"mlflow.tracking_uri {uri!r} is a file on the driver's node, but runs on "
                f"{len(nodes)} nodes log to it. Run a tracking server "
                "(mlflow server --backend-store-uri ... --host 0.0.0.0) and set "
                "mlflow.tracking_uri: http://HOST:5000"
            )
        return
    answers = _ask_every_node(_probe_tracking, nodes, uri)
    failed = [f"  node {_describe(node)}: {answer}" for node, answer in answers if answer != "ok"]
    if failed:
        raise ConfigError(
            f"mlflow.tracking_uri {uri!r} is not reachable from every node that logs:\n"
            + "\n".join(failed)
            + "\nUse an address that every node can reach (not localhost), or "
            "mlflow.enabled: false to train without tracking."
        )


def is_local_store(uri: str) -> bool:
    """A tracking store that is a file on one machine: sqlite, or a local directory
    (MLflow reads a URI without a scheme as a path, except ``databricks``)."""
    if uri.startswith(("sqlite:", "file:")):
        return True
    return "://" not in uri and not uri.startswith("databricks")


def _only(nodes: list[dict[str, Any]], node_id: str) -> list[dict[str, Any]]:
    return [node for node in nodes if node["NodeID"] == node_id]


def _describe(node: dict[str, Any]) -> str:
    return f"{node['NodeID'][:12]} ({node.get('NodeManagerAddress', '?')})"


def _ask_every_node(
    function: Callable[..., str], nodes: list[dict[str, Any]], *args: Any
) -> list[tuple[dict[str, Any], str | None]]:
    """Run ``function(*args)`` in a task pinned to each node: (node, answer or None)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    remote = ray.remote(num_cpus=0, max_retries=0)(function)
    pending = {
        remote.options(
            scheduling_strategy=NodeAffinitySchedulingStrategy(node["NodeID"], soft=False)
        ).remote(*args): node
        for node in nodes
    }
    ready, _ = ray.wait(list(pending), num_returns=len(pending), timeout=ANSWER_TIMEOUT_S)
    answers = []
    for ref, node in pending.items():
        if ref not in ready:
            answers.append((node, f"no answer within {ANSWER_TIMEOUT_S:.0f} s"))
            continue
        try:
            answers.append((node, ray.get(ref)))
        except Exception as err:  # the task itself failed on that node
            answers.append((node, f"the check failed there: {err}"))
    return answers


def _read_marker(storage_path: str, marker: str) -> str:
    """On the node the task runs on: the marker's text, or why it cannot be read (an
    object store is opened with that node's own credentials and endpoint)."""
    try:
        fs, _ = objectstore.filesystem(storage_path, "storage_path")
        with fs.open_input_stream(marker) as stream:
            return stream.read().decode()
    except OSError as err:  # StorageError included
        return f"cannot read {marker}: {objectstore.reason(err)}"


def _probe_tracking(uri: str) -> str:
    from freezelab.mlflow.tracking import TrackingUnavailable, ensure_reachable

    try:
        ensure_reachable(uri, timeout_s=10.0)
    except TrackingUnavailable as err:
        return str(err).split(". ")[0]
    return "ok"
