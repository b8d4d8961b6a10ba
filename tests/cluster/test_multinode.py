"""Multi-node runs on one machine: Ray's ``cluster_utils.Cluster`` with two nodes of one
CPU each. A 2-worker run spreads over both (told apart by their Ray node ids: Ray Train
derives node_rank from the IP address, which both nodes share here), trains in sync over
gloo, and checkpoints into the shared storage path. A node that does not see the storage
path (a node in a mount namespace of its own, with an empty tmpfs over that path) makes
freezelab refuse to start, before any MLflow run or checkpoint exists."""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import yaml
from ray_nodes import free_port, node_env, ray_node, wait_for

from freezelab.trainers import checkpoint as ckpt
from freezelab.trainers.location import RunLocation

pytestmark = pytest.mark.ray

CONFIG = {
    "model": {"name": "test_resnet"},
    "data": {"kind": "digits", "classes": [0, 1, 2], "input_size": 32, "train_per_class": 24},
    "policy": {"type": "gradual", "every": 1},
    "epochs": 2,
    "batch_size": 16,
    "scaling": {"num_workers": 2, "placement_strategy": "SPREAD"},
}


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory, s3_endpoint) -> Iterator[object]:
    """Two Ray nodes of one CPU each on this machine; the test process stays out of it
    (it may hold the session's own Ray), drivers run as subprocesses. The S3 endpoint
    is up first: the nodes inherit ``AWS_ENDPOINT_URL`` and its credentials."""
    from ray.cluster_utils import Cluster

    cluster = Cluster(
        initialize_head=True,
        connect=False,
        head_node_args={"num_cpus": 1, "dashboard_port": free_port()},
    )
    cluster.add_node(num_cpus=1)
    try:
        yield cluster
    finally:
        cluster.shutdown()


def _config(tmp_path: Path, name: str, **update) -> Path:
    shared = tmp_path / "shared"
    data = {
        **CONFIG,
        "name": name,
        "storage_path": str(shared / "runs"),
        "mlflow": {"tracking_uri": f"sqlite:///{shared / 'mlflow.db'}"},
        **update,
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_two_workers_spread_over_two_nodes_stay_in_sync_and_checkpoint_to_shared_storage(
    two_nodes, tmp_path: Path, freezelab_cli
) -> None:
    config = _config(tmp_path, "spread")
    result = freezelab_cli("train", str(config), "--address", two_nodes.address, timeout=400)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert "2 workers on 2 node(s)" in result.stdout

    final = RunLocation(str(tmp_path / "shared" / "runs"), "spread").latest_checkpoint()
    assert final is not None and final.is_relative_to(tmp_path / "shared" / "runs")
    state = ckpt.read_state(final)
    assert state["epoch"] == 1
    workers = state["workers"]
    assert [w["rank"] for w in workers] == [0, 1]
    node_ids = {w["node_id"] for w in workers}
    alive = {n.node_id for n in two_nodes.list_all_nodes()}
    assert len(node_ids) == 2 and node_ids <= alive
    # gloo carried the all-reduce across the two nodes: both replicas hold the same
    # weights after every epoch, also after the plan unfroze a group (DDP rebuilt).
    assert [m["replicas_in_sync"] for m in state["history"]] == [1, 1]
    assert [m["nodes"] for m in state["history"]] == [2, 2]
    assert state["history"][0]["trainable_params"] < state["history"][1]["trainable_params"]

    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'shared' / 'mlflow.db'}")
    run = client.search_runs(
        [client.get_experiment_by_name("freezelab").experiment_id],
        "tags.`freezelab.run_name` = 'spread'",
    )[0]
    assert run.info.status == "FINISHED" and run.data.tags["freezelab.nodes"] == "2"


@contextmanager
def node_blind_to(path: Path, address: str, log: Path) -> Iterator[None]:
    """A third Ray node, in a mount namespace of its own where ``path`` is an empty
    tmpfs: the same machine, but that directory is not the one the others see."""
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("needs root and unshare(1) to give one node a mount namespace of its own")
    path.mkdir(parents=True, exist_ok=True)
    mount_then_run = 'mount -t tmpfs tmpfs "$0" && exec "$@"'
    prefix = [
        "unshare",
        "--mount",
        "--propagation",
        "private",
        "sh",
        "-c",
        mount_then_run,
        str(path),
    ]
    with ray_node([f"--address={address}", "--num-cpus=1"], log, prefix=prefix, env=node_env()):
        wait_for(lambda: "Ray runtime started" in log.read_text(), 90, "the third node")
        yield


def test_storage_that_one_node_does_not_see_is_refused_before_anything_starts(
    two_nodes, tmp_path: Path, freezelab_cli
) -> None:
    storage = tmp_path / "shared" / "runs"
    config = _config(tmp_path, "blind")
    with node_blind_to(storage, two_nodes.address, tmp_path / "blind-node.log"):
        result = freezelab_cli("train", str(config), "--address", two_nodes.address)
    assert result.returncode == 2, result.stdout[-3000:] + result.stderr[-3000:]
    assert f"storage_path '{storage}' is not shared by the 3 nodes" in result.stderr
    # One error line (Ray's own INFO lines about joining may precede it), naming the
    # one node that cannot see the storage.
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and errors[0].startswith("freezelab train: error: "), result.stderr
    assert len(re.findall(r"node [^;]*: cannot read", errors[0])) == 1, result.stderr
    assert "s3://BUCKET/PATH" in result.stderr
    # Refused before MLflow or Ray Train did anything; the marker is cleaned up.
    assert not (tmp_path / "shared" / "mlflow.db").exists()
    assert not (storage / "blind").exists()
    assert list((storage / ".freezelab-storage-check").iterdir()) == []


def test_a_sweep_tracking_in_sqlite_pins_its_trials_to_the_node_of_the_file(
    two_nodes, tmp_path: Path, freezelab_cli
) -> None:
    base = yaml.safe_load(_config(tmp_path, "sweep-base", epochs=1).read_text())
    base["scaling"] = {"num_workers": 1}
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(
        yaml.safe_dump(
            {
                "name": "pinned",
                "base": base,
                "space": {"policies": [{"type": "head_only"}, {"type": "bitfit"}]},
            }
        )
    )
    result = freezelab_cli("sweep", str(sweep), "--address", two_nodes.address, timeout=500)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    head = two_nodes.head_node.node_id
    assert f"trials run on node {head[:12]}" in result.stdout

    import mlflow

    client = mlflow.MlflowClient(tracking_uri=base["mlflow"]["tracking_uri"])
    experiment = client.get_experiment_by_name("freezelab").experiment_id
    # The trials: the runs nested under the sweep's parent.
    trials = client.search_runs([experiment])
    trials = [r for r in trials if "mlflow.parentRunId" in r.data.tags]
    assert len(trials) == 2
    assert {r.data.tags["ray.node_id"] for r in trials} == {head}


def test_the_storage_check_accepts_s3_that_every_node_reaches(
    two_nodes, tmp_path: Path, s3_endpoint, s3_bucket
) -> None:
    import subprocess
    import sys

    from object_store import list_keys

    storage = f"s3://{s3_bucket}/runs"
    # A driver of the cluster, as `freezelab train` is: the marker it writes on S3 must
    # be read back by a task on each node, with that node's own credentials.
    driver = (
        "import ray\n"
        "from freezelab.cluster.checks import alive_nodes, check_shared_storage\n"
        f"ray.init(address={two_nodes.address!r})\n"
        "nodes = alive_nodes()\n"
        f"check_shared_storage({storage!r}, nodes)\n"
        "print('accepted on', len(nodes), 'nodes')\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", driver], capture_output=True, text=True, timeout=180
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "accepted on 2 nodes" in result.stdout
    left = [k for k in list_keys(s3_endpoint, s3_bucket) if not k.endswith("/")]
    assert left == [], "the marker was not cleaned up"


def test_a_study_spreads_its_fine_tuning_runs_over_both_nodes(
    two_nodes, tmp_path: Path, freezelab_cli
) -> None:
    from freezelab.study import DEFAULT_STUDY
    from freezelab.trainers.config import apply_override
    from tests.mlflow.servers import Server

    # A tracking server, so that trials may log from either node (a sqlite file would
    # pin them to the driver's); one CPU per node: one in-process run on each at once.
    server = Server(tmp_path / "server")
    (tmp_path / "server").mkdir()
    server.start()
    try:
        study = json.loads(json.dumps(DEFAULT_STUDY))
        for override in [
            "base.model.name=test_resnet",
            "base.scaling.num_workers=0",
            "base.batch_size=32",
            f"base.storage_path={tmp_path / 'shared' / 'runs'}",
            f"base.mlflow.tracking_uri={server.uri}",
            "pretrain.epochs=1",
            "finetune.epochs=2",
            "variants={}",
            "seeds=[0, 1]",
            "policies=[{type: full}, {type: head_only}]",
            "register_best_as=null",
            "select=null",  # each policy at one rate: the spread is what this test is about
        ]:
            apply_override(study, override)
        path = tmp_path / "study.yaml"
        path.write_text(yaml.safe_dump(study))
        result = freezelab_cli(
            "demo", "--config", str(path), "--address", two_nodes.address, timeout=500
        )
        assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
        assert "fine-tuning: 4 runs" in result.stdout
        assert "up to 2 at once" in result.stdout
        import mlflow

        client = mlflow.MlflowClient(tracking_uri=server.uri)
        experiment = client.get_experiment_by_name("freezelab").experiment_id
        runs = client.search_runs([experiment], "tags.`freezelab.stage` = 'finetune'")
        assert len(runs) == 4 and all(r.info.status == "FINISHED" for r in runs)
        nodes = {node.node_id for node in [two_nodes.head_node, *two_nodes.worker_nodes]}
        where = [r.data.tags["ray.node_id"] for r in runs]
        # Runs per node, for BENCHMARKS.md: printed with -s.
        print({node[:12]: where.count(node) for node in nodes})
        assert set(where) == nodes
        assert len(list((tmp_path / "shared" / "runs").glob("*/study_row.json"))) == 4
    finally:
        server.stop()
