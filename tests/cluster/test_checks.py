"""The decisions of the cluster checks that need no cluster: which tracking stores are
files on one node, and which environment the workers get."""

from __future__ import annotations

import pytest

from freezelab.cluster.checks import check_tracking_uri, is_local_store
from freezelab.trainers.config import ConfigError
from freezelab.trainers.launch import worker_env_vars

NODES = [
    {"NodeID": "a" * 56, "NodeManagerAddress": "10.0.0.1"},
    {"NodeID": "b" * 56, "NodeManagerAddress": "10.0.0.2"},
]


@pytest.mark.parametrize(
    ("uri", "local"),
    [
        ("sqlite:////shared/mlflow.db", True),
        ("sqlite:///mlflow.db", True),
        ("file:///tmp/mlruns", True),
        ("/tmp/mlruns", True),
        ("http://mlflow:5000", False),
        ("https://mlflow.example.com", False),
        ("postgresql://user@db/mlflow", False),
        ("databricks", False),
        ("mlruns", True),  # no scheme: MLflow reads it as a local path
    ],
)
def test_local_stores_are_files_and_servers_are_not(uri: str, local: bool) -> None:
    assert is_local_store(uri) is local


def test_a_sqlite_store_logged_to_from_several_nodes_is_refused_with_the_fix() -> None:
    with pytest.raises(ConfigError, match="is a file on the driver's node, but runs on 2 nodes"):
        check_tracking_uri("sqlite:////shared/mlflow.db", NODES)
    check_tracking_uri("sqlite:////shared/mlflow.db", NODES[:1])  # the driver's node alone
    check_tracking_uri("postgresql://user@db/mlflow", NODES)  # a database server: no file


def test_workers_get_the_drivers_network_settings_then_the_configs_then_the_callers(
    tiny_config, monkeypatch
) -> None:
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "eth0")
    monkeypatch.setenv("NCCL_SOCKET_IFNAME", "ib0")
    monkeypatch.setenv("HOME_SWEET_HOME", "not passed on")
    config = tiny_config(scaling={"num_workers": 1, "env_vars": {"NCCL_SOCKET_IFNAME": "eth1"}})
    env = worker_env_vars(config, {"FREEZELAB_X": "1"})
    assert env == {"GLOO_SOCKET_IFNAME": "eth0", "NCCL_SOCKET_IFNAME": "eth1", "FREEZELAB_X": "1"}


def test_a_sqlite_sweep_on_a_head_without_cpus_is_refused_rather_than_left_waiting(
    tiny_config, monkeypatch
) -> None:
    from freezelab.cluster import checks
    from freezelab.sweep import trials

    nodes = [
        {**NODES[0], "Resources": {"CPU": 0.0}},
        {**NODES[1], "Resources": {"CPU": 8.0}},
    ]
    monkeypatch.setattr(checks, "alive_nodes", lambda: nodes)
    monkeypatch.setattr(checks, "driver_node_id", lambda: NODES[0]["NodeID"])
    monkeypatch.setattr(checks, "check_shared_storage", lambda *args: None)
    config = tiny_config(mlflow={"enabled": True, "tracking_uri": "sqlite:////shared/mlflow.db"})
    with pytest.raises(ConfigError, match="that node has no CPU for them"):
        trials.check_cluster_for_trials(config)
    nodes[0]["Resources"]["CPU"] = 1.0
    assert trials.check_cluster_for_trials(config) == NODES[0]["NodeID"]
