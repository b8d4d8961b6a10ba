"""The cluster templates parse, validate against their own schemas, and run commands
that freezelab's command line accepts, with configs that validate."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest
import yaml

import freezelab
from freezelab.cli import _parser
from freezelab.submit import TEMPLATES, shipped_runtime_env
from freezelab.sweep.space import load_sweep, validate_space

ROOT = Path(__file__).resolve().parents[2]
IMAGE = f"REGISTRY/freezelab:{freezelab.__version__}-gpu"


def _usage_commands(path: Path) -> list[list[str]]:
    """The `freezelab ...` commands a template's header comment tells users to run."""
    commands = []
    for line in path.read_text().splitlines():
        match = re.match(r"#\s+(freezelab .*)$", line)
        if match:
            commands.append(shlex.split(match.group(1))[1:])
    return commands


def _assert_cli_accepts(argv: list[str]) -> None:
    args = _parser().parse_args(argv)  # argparse exits (SystemExit) on anything unknown
    config = getattr(args, "config", None)
    if config is not None and not config.startswith("/"):
        assert (ROOT / config).is_file(), f"{argv}: {config} is not in the repository"


@pytest.mark.parametrize("name", ["Dockerfile", "gpu-cluster.yaml", "rayjob-sweep.yaml"])
def test_every_freezelab_command_in_a_template_header_is_one_the_cli_accepts(name: str) -> None:
    commands = _usage_commands(TEMPLATES / name)
    assert commands, f"{name} documents no freezelab command"
    for argv in commands:
        _assert_cli_accepts(argv)


def test_cluster_launcher_yaml_validates_against_rays_schema() -> None:
    import jsonschema
    import ray.autoscaler

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    config = yaml.safe_load((TEMPLATES / "gpu-cluster.yaml").read_text())
    jsonschema.validate(config, schema)

    assert config["docker"]["image"] == IMAGE
    nodes = config["available_node_types"]
    assert nodes[config["head_node_type"]]["resources"] == {"CPU": 0}
    workers = [n for name, n in nodes.items() if name != config["head_node_type"]]
    assert workers and all(n["min_workers"] >= 1 for n in workers)
    # Token authentication stays on, on every node, with one token.
    assert config["file_mounts"] == {"~/.ray/auth_token": "~/.ray/auth_token"}
    starts = config["head_start_ray_commands"] + config["worker_start_ray_commands"]
    assert all("RAY_AUTH_MODE=token" in c for c in starts if "ray start" in c)


def test_rayjob_runs_a_sweep_that_validates_from_its_config_map(tmp_path: Path) -> None:
    documents = list(yaml.safe_load_all((TEMPLATES / "rayjob-sweep.yaml").read_text()))
    config_map = next(d for d in documents if d["kind"] == "ConfigMap")
    job = next(d for d in documents if d["kind"] == "RayJob")
    assert job["apiVersion"] == "ray.io/v1"

    spec = job["spec"]
    import ray

    assert spec["rayClusterSpec"]["rayVersion"] == ray.__version__
    assert spec["rayClusterSpec"]["authOptions"] == {"mode": "token"}
    # The entrypoint is the sweep command, on the file the ConfigMap volume mounts.
    argv = shlex.split(spec["entrypoint"])
    assert argv[:3] == ["python", "-m", "freezelab"]
    args = _parser().parse_args(argv[3:])
    assert args.command == "sweep"
    head = spec["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    mount = next(m for c in head["containers"] for m in c["volumeMounts"] if m["name"] == "configs")
    volume = next(v for v in head["volumes"] if v["name"] == "configs")
    assert volume["configMap"]["name"] == config_map["metadata"]["name"]
    directory, key = args.sweep.rsplit("/", 1)
    assert directory == mount["mountPath"] and key in config_map["data"]

    # The mounted sweep is a valid sweep, every policy of it fits vgg16, and its paths
    # are the shared volume's.
    sweep_file = tmp_path / key
    sweep_file.write_text(config_map["data"][key])
    sweep = load_sweep(sweep_file)
    validate_space(sweep, num_classes=2)  # the image folder is on the cluster's volume
    assert sweep.base["storage_path"].startswith("/mnt/shared/")
    assert sweep.base["mlflow"]["tracking_uri"].startswith("http")
    images = {
        c["image"]
        for group in [
            spec["rayClusterSpec"]["headGroupSpec"],
            *spec["rayClusterSpec"]["workerGroupSpecs"],
        ]
        for c in group["template"]["spec"]["containers"]
    }
    assert images == {IMAGE}


def test_dockerfile_builds_on_the_pinned_ray_and_python_and_installs_this_package() -> None:
    import ray

    text = (TEMPLATES / "Dockerfile").read_text()
    base = re.search(r"^ARG RAY_IMAGE=(\S+)$", text, re.M).group(1)
    assert base.startswith(f"rayproject/ray:{ray.__version__}-py311")
    assert re.search(r"^FROM \$\{RAY_IMAGE\}$", text, re.M)
    for source in re.findall(r"^COPY (?:--\S+ )*(.+) \S+$", text, re.M):
        for item in source.split():
            assert (ROOT / item).exists(), f"the Dockerfile copies {item}, which is not here"
    assert re.search(r"^RUN pip install --no-cache-dir \. ", text, re.M)
    assert f"-t {IMAGE} ." in text


def test_runtime_env_excludes_what_must_not_be_uploaded() -> None:
    excludes = shipped_runtime_env()["excludes"]
    for needed in (".git/", ".venv/", "mlflow.db", "mlruns/", "freezelab_runs/", "data/"):
        assert needed in excludes
    # Ray reads the file as a runtime env: only fields it knows.
    from ray.runtime_env import RuntimeEnv

    RuntimeEnv(**shipped_runtime_env())
