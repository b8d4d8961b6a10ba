"""Two Ray nodes with addresses of their own: the head in this network namespace, a second
node in another one, joined by a veth pair that the test makes (loopback and those two
addresses only). Unlike nodes that share one machine's address, Ray Train gives them
node_rank 0 and 1, gloo is told its interface (GLOO_SOCKET_IFNAME, passed on from the
driver), and a tracking server on this machine's loopback is unreachable from the other
node, so a sweep that would log from there is refused."""

from __future__ import annotations

import http.server
import re
import threading
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import pytest
import yaml
from ray_nodes import Network, network_namespace, node_env, ray_head, ray_node, wait_for

from freezelab.trainers import checkpoint as ckpt
from freezelab.trainers.location import RunLocation

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def two_addresses(tmp_path_factory) -> Iterator[tuple[object, Network]]:
    logs = tmp_path_factory.mktemp("netns")
    with ExitStack() as stack:
        try:
            network = stack.enter_context(network_namespace())
        except OSError as err:
            pytest.skip(f"needs network namespaces and veth pairs (root, iproute2): {err}")
        head = stack.enter_context(ray_head(logs, ip=network.host_ip, cpus=1))
        node_log = logs / "node.log"
        args = [
            f"--address={head.gcs}",
            f"--node-ip-address={network.namespace_ip}",
            "--num-cpus=1",
        ]
        env = node_env(RAY_AUTH_MODE="token")
        stack.enter_context(ray_node(args, node_log, prefix=network.prefix(), env=env))
        wait_for(lambda: "Ray runtime started" in node_log.read_text(), 90, "the second node")
        yield head, network


def _config(tmp_path: Path, name: str, **update) -> dict:
    return {
        "name": name,
        "model": {"name": "test_resnet"},
        "data": {"kind": "digits", "classes": [0, 1, 2], "input_size": 32, "train_per_class": 24},
        "policy": {"type": "last_n", "n": 1},
        "epochs": 1,
        "batch_size": 16,
        "scaling": {"num_workers": 2, "placement_strategy": "STRICT_SPREAD"},
        "storage_path": str(tmp_path / "runs"),
        "mlflow": {"tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}"},
        **update,
    }


def test_nodes_with_their_own_addresses_are_node_ranks_0_and_1_over_gloo(
    two_addresses, tmp_path: Path, freezelab_cli
) -> None:
    head, network = two_addresses
    config = tmp_path / "train.yaml"
    config.write_text(yaml.safe_dump(_config(tmp_path, "netns")))
    # Exported on the driver only: freezelab passes it on to every worker.
    env = {**node_env(RAY_AUTH_MODE="token"), "GLOO_SOCKET_IFNAME": network.interface}
    result = freezelab_cli("train", str(config), "--address", head.gcs, env=env, timeout=400)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]

    state = ckpt.read_state(RunLocation(str(tmp_path / "runs"), "netns").latest_checkpoint())
    workers = state["workers"]
    assert sorted(w["node_rank"] for w in workers) == [0, 1]
    assert {w["node_ip"] for w in workers} == {network.host_ip, network.namespace_ip}
    assert state["metrics"]["replicas_in_sync"] == 1


@contextmanager
def health_server() -> Iterator[str]:
    """An HTTP server on this machine's loopback that answers /health like MLflow's."""

    class Health(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (the stdlib's name)
            self.send_response(200 if self.path == "/health" else 404)
            self.end_headers()
            self.wfile.write(b"OK")

        def log_message(self, *args) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Health)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()


def test_a_tracking_server_that_one_node_cannot_reach_refuses_a_sweep_before_it_starts(
    two_addresses, tmp_path: Path, freezelab_cli
) -> None:
    head, network = two_addresses
    env = {**node_env(RAY_AUTH_MODE="token"), "GLOO_SOCKET_IFNAME": network.interface}
    with health_server() as uri:
        base = _config(tmp_path, "sweep-base", mlflow={"tracking_uri": uri})
        base["scaling"] = {"num_workers": 1}
        sweep = tmp_path / "sweep.yaml"
        sweep.write_text(
            yaml.safe_dump({"name": "far", "base": base, "space": {"policies": [base["policy"]]}})
        )
        result = freezelab_cli("sweep", str(sweep), "--address", head.gcs, env=env)
    assert result.returncode == 2, result.stdout[-3000:] + result.stderr[-3000:]
    assert f"mlflow.tracking_uri '{uri}' is not reachable from every node that logs" in (
        result.stderr
    )
    # One error line, naming the one node that cannot reach the server.
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and errors[0].startswith("freezelab sweep: error: "), result.stderr
    unreachable = re.findall(r"node [^;]*\([0-9.]+\)", errors[0])
    assert len(unreachable) == 1 and f"({network.namespace_ip})" in unreachable[0]
    assert not (tmp_path / "runs" / "far").exists()
