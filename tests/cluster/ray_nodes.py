"""Real Ray nodes for the cluster tests, started with ``ray start --block``.

Each node is a ``ray start`` process in a session of its own: stopping it (SIGTERM to
its process group) stops that node's processes only, never another Ray on the machine
(``ray stop`` would stop them all).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

RAY = [sys.executable, "-m", "ray.scripts.scripts"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.5)
    raise TimeoutError(f"gave up after {timeout:.0f} s waiting for {what}")


def node_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "MLFLOW_"))}
    env.update(RAY_DEDUP_LOGS="0", RAY_USAGE_STATS_ENABLED="0", **extra)
    return env


@contextmanager
def ray_node(
    args: Sequence[str], log: Path, *, prefix: Sequence[str] = (), env: dict | None = None
) -> Iterator[subprocess.Popen]:
    """A Ray node for the duration of the block: ``ray start --block ARGS``.

    ``ray start`` records its cluster in Ray's address file, which any later
    ``ray.init()`` on this machine and Ray Train's placement-group cleaner read: the
    file is put back as it was, so no test points them at a stopped cluster."""
    with _address_file_kept():
        with open(log, "w") as out:
            process = subprocess.Popen(
                [*prefix, *RAY, "start", "--block", "--disable-usage-stats", *args],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env or node_env(),
                start_new_session=True,
            )
        try:
            yield process
        finally:
            _stop(process)


@contextmanager
def _address_file_kept() -> Iterator[None]:
    from ray._common.utils import get_ray_address_file

    path = Path(get_ray_address_file(None))
    before = path.read_text() if path.exists() else None
    try:
        yield
    finally:
        if before is None:
            path.unlink(missing_ok=True)
        else:
            path.write_text(before)


def _stop(process: subprocess.Popen) -> None:
    for sig, grace in ((signal.SIGTERM, 5), (signal.SIGKILL, 10)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=grace)
            return
        except subprocess.TimeoutExpired:
            continue


class Head:
    """A head node: its GCS address and its job server's (dashboard's) address."""

    def __init__(self, gcs: str, dashboard: str, log: Path) -> None:
        self.gcs, self.dashboard, self.log = gcs, dashboard, log


@contextmanager
def ray_head(
    tmp: Path, *, ip: str | None = None, cpus: int = 1, prefix=(), env: dict | None = None
) -> Iterator[Head]:
    """A head node for the block; ``env`` adds to its processes' environment (and so to
    that of the jobs it runs).

    Its ports are picked free, then released for Ray to bind: another process (a worker
    of the tests' own Ray session) can take one in between, and the head then dies
    right after it came up. A head that does not stay up is started again on new ports.
    """
    log = tmp / "head.log"
    for attempt in range(3):
        gcs_port, dashboard_port = free_port(), free_port()
        args = [
            "--head",
            f"--port={gcs_port}",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dashboard_port}",
            f"--ray-client-server-port={free_port()}",
            f"--dashboard-agent-listen-port={free_port()}",
            f"--num-cpus={cpus}",
        ]
        if ip:
            args.append(f"--node-ip-address={ip}")
        dashboard = f"http://127.0.0.1:{dashboard_port}"
        with ray_node(
            args, log, prefix=prefix, env=node_env(RAY_AUTH_MODE="token", **(env or {}))
        ) as process:

            def up(process=process, dashboard=dashboard) -> bool:
                assert process.poll() is None, f"the head exited: {log.read_text()[-3000:]}"
                token = (Path.home() / ".ray" / "auth_token").read_text().strip()
                request = urllib.request.Request(
                    f"{dashboard}/api/jobs/", headers={"Authorization": f"Bearer {token}"}
                )
                try:
                    urllib.request.urlopen(request, timeout=2)
                except OSError:
                    return False
                return True

            try:
                wait_for(up, 90, "the Ray head's job server")
                time.sleep(5)  # a port lost to another process ends the head within seconds
                stayed_up = up()
            except AssertionError:
                if attempt == 2:
                    raise
                continue
            if not stayed_up:
                continue
            from ray.util import get_node_ip_address

            yield Head(f"{ip or get_node_ip_address()}:{gcs_port}", dashboard, log)
            return
    raise RuntimeError(f"the Ray head did not stay up: {log.read_text()[-3000:]}")


class Network:
    """A network namespace joined to this one by a veth pair. Both ends carry the same
    interface name, so one GLOO_SOCKET_IFNAME fits the nodes on either side."""

    def __init__(self, namespace: str, interface: str, host_ip: str, namespace_ip: str) -> None:
        self.namespace, self.interface = namespace, interface
        self.host_ip, self.namespace_ip = host_ip, namespace_ip

    def prefix(self) -> list[str]:
        """The command prefix that runs a process inside the namespace."""
        return ["ip", "netns", "exec", self.namespace]


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


@contextmanager
def network_namespace() -> Iterator[Network]:
    """Raises OSError where namespaces or veth pairs cannot be made (no root, no iproute2)."""
    tag = f"{os.getpid() % 100000}"
    namespace, interface, peer = f"fl{tag}", f"flv{tag}", f"flp{tag}"
    subnet = f"10.{200 + os.getpid() % 50}.{os.getpid() % 250}"
    network = Network(namespace, interface, f"{subnet}.1", f"{subnet}.2")
    try:
        _ip("netns", "add", namespace)
    except (OSError, subprocess.CalledProcessError) as err:
        raise OSError(f"cannot make a network namespace: {err}") from None
    try:
        _ip("link", "add", interface, "type", "veth", "peer", "name", peer)
        _ip("link", "set", peer, "netns", namespace)
        _ip("-n", namespace, "link", "set", peer, "name", interface)
        _ip("addr", "add", f"{network.host_ip}/24", "dev", interface)
        _ip("link", "set", interface, "up")
        _ip("-n", namespace, "addr", "add", f"{network.namespace_ip}/24", "dev", interface)
        _ip("-n", namespace, "link", "set", interface, "up")
        _ip("-n", namespace, "link", "set", "lo", "up")
        yield network
    finally:
        subprocess.run(["ip", "link", "del", interface], capture_output=True)
        subprocess.run(["ip", "netns", "del", namespace], capture_output=True)
