"""Every command the docs show runs, end to end, on this machine.

The docs are the README's fenced shell blocks, the header comments of the files in
``examples/`` and of the cluster templates, and the templates' entrypoints. Each command
found there is either in ``RUN`` (the test that runs it, with the size overrides that
test adds: tiny models, one epoch, a generated image folder, no pretrained download) or
in ``EXCUSED`` (why it cannot run here). ``test_every_documented_command_is_run_or_excused``
fails on a command that is in neither, so a new one cannot be skipped silently.

Commands that name a cluster run against a real Ray head (token authentication on) and
the README's own ``mlflow server``, started by the fixtures below.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from freezelab.cli import main
from freezelab.policies import from_dict

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
EXAMPLES = ROOT / "examples"
TEMPLATES = ROOT / "freezelab" / "cluster" / "templates"
sys.path.insert(0, str(ROOT / "tests" / "cluster"))
sys.path.insert(0, str(ROOT / "tests" / "mlflow"))
from ray_nodes import _address_file_kept, free_port, ray_head, wait_for  # noqa: E402
from servers import server_env  # noqa: E402

PROGRAMS = ("freezelab ", "python ", "python3.11 ", "ray ", "mlflow ", "docker ", "kubectl ")

# -- what the docs say ----------------------------------------------------------------


def _joined(lines: list[str]) -> list[str]:
    """Lines with a trailing backslash continue on the next one."""
    commands, current = [], ""
    for line in lines:
        current += line.strip()
        if current.endswith("\\"):
            current = current[:-1].rstrip() + " "
            continue
        if current:
            commands.append(re.sub(r"\s+#\s.*$", "", current).strip())  # a trailing comment
        current = ""
    return commands


def readme_commands() -> list[str]:
    """The README's fenced shell commands, and the commands its comments name."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", README.read_text(), re.S):
        lines = []
        for line in block.splitlines():
            if line.lstrip().startswith("#"):
                named = re.search(r"(freezelab \S.*)$", line)
                if named:  # "# afterwards, on the head:  freezelab compare ..."
                    lines.append(named.group(1))
                continue
            lines.append(line)
        commands += _joined(lines)
    return commands


def header_commands(path: Path) -> list[str]:
    """The commands a file's comments show, and a RayJob's entrypoint."""
    lines = []
    for line in path.read_text().splitlines():
        text = re.sub(r"^\s*#\s?", "", line) if line.lstrip().startswith("#") else None
        if text is None:
            entry = re.match(r"\s*entrypoint:\s*(.+)$", line)
            if entry:
                lines.append(entry.group(1))
            continue
        text = text.strip()
        if text.startswith(PROGRAMS) or (lines and lines[-1].endswith("\\")):
            lines.append(text)
    return _joined(lines)


def documented() -> dict[str, list[str]]:
    """Every documented command, with the files that show it."""
    found: dict[str, list[str]] = {}
    sources = [README, *sorted(p for p in EXAMPLES.rglob("*") if p.is_file())]
    sources += sorted(p for p in TEMPLATES.iterdir() if p.is_file())
    for path in sources:
        commands = readme_commands() if path == README else header_commands(path)
        for command in commands:
            found.setdefault(command, []).append(str(path.relative_to(ROOT)))
    return found


SUBMIT_VGG = "freezelab submit examples/vgg16_cats_dogs_last5.yaml"
RAY_JOB = (
    "ray job submit --address http://HEAD:8265 --working-dir . --runtime-env "
    "freezelab/cluster/templates/runtime_env.yaml -- python -m freezelab train"
)
RUN = {
    "python3.11 -m pip install -e . && freezelab demo": "test_the_demo",
    "freezelab demo --config examples/transfer_study.yaml": "test_the_study_with_repeats",
    'freezelab inspect --model vgg16 --head \'{"pool": "flatten", "hidden": [256]}\' '
    "--policy examples/policies/vgg16_keras_last5.yaml": "test_the_keras_recipe_inspection",
    "freezelab train examples/train_tiny.yaml": "test_the_tiny_train_config",
    "freezelab advise examples/sweep_tiny.yaml": "test_the_advise_command",
    "ray get-auth-token --generate": "test_the_token_command",
    "freezelab sweep examples/sweep_tiny.yaml": "test_the_tiny_sweep",
    "freezelab sweep examples/sweep_optuna.yaml": "test_the_optuna_sweep_resumes_after_a_kill",
    "mlflow server --host 10.0.0.5 --port 5000 --backend-store-uri sqlite:///mlflow-server.db "
    "--artifacts-destination /shared/mlflow-artifacts": "server",
    f"{RAY_JOB} examples/train_tiny.yaml --set epochs=2": "test_ray_job_submit_and_compare",
    "freezelab compare freezelab --tracking-uri sqlite:///$HOME/freezelab/mlflow.db": (
        "test_ray_job_submit_and_compare"
    ),
    f"{RAY_JOB} CONFIG": "test_ray_job_submit_and_compare",
    f"{RAY_JOB} examples/vgg16_cats_dogs_last5.yaml": "test_the_vgg16_twins_as_ray_jobs",
    f"{RAY_JOB} examples/vgg16_cats_dogs_full.yaml": "test_the_vgg16_twins_as_ray_jobs",
    f"{SUBMIT_VGG} --address http://HEAD:8265 --follow --set "
    "storage_path=/mnt/shared/freezelab_runs --env GLOO_SOCKET_IFNAME=eth0": (
        "test_freezelab_submit_as_documented"
    ),
    f"{SUBMIT_VGG} --address http://HEAD:8265 --follow": "test_freezelab_submit_as_documented",
    f"{SUBMIT_VGG} --address http://localhost:8265 --set storage_path=/mnt/shared/freezelab_runs "
    "--follow": "test_freezelab_submit_as_documented",
    "python -m freezelab sweep /home/ray/configs/sweep.yaml": "test_the_rayjob_sweep",
    "freezelab compare vgg16-policies --tracking-uri http://MLFLOW_HOST:5000": (
        "test_the_rayjob_sweep"
    ),
    "freezelab report vgg16-policies --tracking-uri http://MLFLOW_HOST:5000": (
        "test_the_rayjob_sweep"
    ),
}
NO_DOCKER = "builds or pushes a container image: no Docker daemon or registry here"
NO_CLOUD = "creates or stops cloud machines (ray up/down): no cloud account here"
NO_KUBERNETES = "needs a Kubernetes cluster with KubeRay: none here"
EXCUSED = {
    "python3.11 -m pip install -e '.[dev]' && python3.11 -m pytest -q": (
        "the test command itself, which runs this test (CI runs it)"
    ),
    "docker build -f freezelab/cluster/templates/Dockerfile -t REGISTRY/freezelab:0.1.0-gpu .": (
        NO_DOCKER
    ),
    "docker push REGISTRY/freezelab:0.1.0-gpu": NO_DOCKER,
    "ray up freezelab/cluster/templates/gpu-cluster.yaml": NO_CLOUD,
    "ray dashboard freezelab/cluster/templates/gpu-cluster.yaml": NO_CLOUD,
    "ray down freezelab/cluster/templates/gpu-cluster.yaml": NO_CLOUD,
    "kubectl apply -f freezelab/cluster/templates/rayjob-sweep.yaml": NO_KUBERNETES,
    "kubectl logs -f job/freezelab-vgg16-sweep": NO_KUBERNETES,
    "kubectl get secret freezelab-vgg16-sweep -o jsonpath='{.data.auth_token}' | base64 -d > "
    "~/.ray/auth_token": NO_KUBERNETES,
}


def test_every_documented_command_is_run_or_excused():
    found = documented()
    unknown = {c: where for c, where in found.items() if c not in RUN and c not in EXCUSED}
    assert not unknown, f"documented commands that no test runs or excuses: {unknown}"
    stale = sorted((set(RUN) | set(EXCUSED)) - set(found))
    assert not stale, f"commands listed here that the docs no longer show: {stale}"
    tests = {name for name in globals() if name.startswith("test_")} | {"server"}
    assert set(RUN.values()) <= tests
    # Every example file is run by some command.
    for path in sorted(p for p in EXAMPLES.rglob("*") if p.is_file()):
        name = str(path.relative_to(ROOT))
        assert any(name in command for command in RUN), f"{name}: no command runs it"
    # The README marks the one command of its own that the docs test does not run.
    assert "runs every other command of this README" in README.read_text()


def test_the_readme_sweep_example_is_the_example_file():
    shown = re.search(r"```yaml\n# examples/sweep_optuna.yaml\n(.*?)```", README.read_text(), re.S)
    assert shown, "the README shows examples/sweep_optuna.yaml"
    assert yaml.safe_load(shown.group(1)) == yaml.safe_load(
        (EXAMPLES / "sweep_optuna.yaml").read_text()
    )


def argv(command: str, **substitutions: str) -> list[str]:
    """The command as this machine runs it: placeholders substituted, and each program
    the one of this Python (the ``freezelab`` and ``ray`` of its environment)."""
    for old, new in substitutions.items():
        command = command.replace(old, new)
    words = shlex.split(command)
    programs = {
        "freezelab": [sys.executable, "-m", "freezelab"],
        "ray": [sys.executable, "-m", "ray.scripts.scripts"],
        "mlflow": [sys.executable, "-m", "mlflow"],
        "python": [sys.executable],
        "python3.11": [sys.executable],
    }
    out = list(programs.get(words[0], [words[0]]))
    for word in words[1:]:
        out += [sys.executable] if word in ("python", "python3.11") else [word]
    return out


def in_process(command: str, *extra: str, **substitutions: str) -> int:
    """Run a ``freezelab`` command through the CLI's ``main`` in this process."""
    words = argv(command, **substitutions)
    assert words[:3] == [sys.executable, "-m", "freezelab"], command
    return main([*words[3:], *extra])


# -- on this machine's CPUs, no cluster -----------------------------------------------

# The commands name files relative to the checkout; the tests run in a folder of their own.
LOCAL_PATHS = {"examples/": f"{EXAMPLES}/"}
TINY_STUDY = [
    "--set",
    "base.model.name=test_resnet",
    "--set",
    "base.scaling.num_workers=0",
    "--set",
    "base.batch_size=32",
    "--set",
    "pretrain.epochs=1",
    "--set",
    "finetune.epochs=1",
]


@pytest.mark.ray  # the command starts a Ray of its own (in a subprocess)
def test_the_demo(demo_run):
    """The README's demo command in a subprocess, as a user runs it; the run is shared
    with ``tests/test_demo.py`` (``tests/demo_command.py`` has its sizes)."""
    from demo_command import SIZES

    command = next(c for c in RUN if RUN[c] == "test_the_demo")
    install, demo = command.split(" && ")
    assert install == "python3.11 -m pip install -e ."  # what CI's first step runs
    assert demo_run.command == [*argv(demo), *(w for size in SIZES for w in ("--set", size))]
    out, err = demo_run.out, demo_run.err
    assert demo_run.returncode == 0, (out + err)[-3000:]
    assert "Downloading artifacts" not in err  # the report reads each run quietly
    # the verdict on the held-out test split
    assert "transfer study" in out and "test_acc (mean ± ci95)" in out
    # each of the six policies the README names chooses its rate on each of the two
    # target variants, then trains at it
    assert "trials finished: 24/24" in out and "trials finished: 12/12" in out
    text = " ".join(out.split())
    for opening in ("(1) Compute.", "(2) Data that differs", "(3) Forgetting", "(4) The new head"):
        assert opening in text
    assert len(list((demo_run.folder / "freezelab_reports").glob("*/index.html"))) == 1


@pytest.mark.ray
def test_the_study_with_repeats(ray_session, capsys):
    import mlflow

    command = next(c for c in RUN if RUN[c] == "test_the_study_with_repeats")
    one_policy = "policies=[{type: last_n, n: 1}]"
    code = in_process(
        command,
        *TINY_STUDY,
        "--set",
        "finetune.epochs=3",
        "--set",
        "select.grace_epochs=1",
        "--set",
        "seeds=[0, 1]",
        "--set",
        one_policy,
        "--set",
        "variants={}",
        **LOCAL_PATHS,
    )
    assert code == 0
    out = " ".join(capsys.readouterr().out.split())
    # the file's three learning rates, one chosen, then two seeds at it: an interval
    assert "trials finished: 3/3" in out and "trials finished: 2/2" in out
    assert "Each policy trained at its own values, chosen on val_acc" in out
    assert "Ranked on test_acc" in out and "(95% interval, n=2)" in out
    # An absolute URI: MLflow caches its sqlite stores by URI, so a relative one would
    # reach the database of the first working directory that used it.
    uri = f"sqlite:///{Path.cwd()}/mlflow.db"
    client = mlflow.MlflowClient(uri, registry_uri=uri)
    assert client.get_model_version_by_alias("transfer-study-best", "champion").run_id


def test_the_keras_recipe_inspection(capsys):
    command = next(c for c in RUN if RUN[c] == "test_the_keras_recipe_inspection")
    assert in_process(command, **LOCAL_PATHS) == 0
    out = capsys.readouterr().out
    assert "trainable parameters: 13,502,722 of 21,137,986" in out
    assert "block5.conv1" in out and "13.5M of 21.1M parameters" in README.read_text()


def test_the_tiny_train_config(capsys):
    # Local mode (in this process): the two-worker path runs as a Ray job below.
    command = "freezelab train examples/train_tiny.yaml"
    overrides = ["--set", "scaling.num_workers=0", "--set", "epochs=1"]
    assert in_process(command, *overrides, **LOCAL_PATHS) == 0
    out = capsys.readouterr().out
    assert "checkpoint: " in out and "MLflow run: " in out
    # a local store: the page `mlflow ui` serves, opening on model training
    assert re.search(
        r"MLflow UI: http://127.0.0.1:5000/#/experiments/\d+/runs/\w+\?workflowType", out
    )
    assert list(
        Path("freezelab_runs").glob("tiny-gradual-every1-*/*/checkpoint_*/model.safetensors")
    )


def test_the_token_command(tmp_path):
    # In a home of its own: the real ~/.ray/auth_token belongs to the test head.
    env = {**os.environ, "HOME": str(tmp_path)}
    env.pop("RAY_AUTH_TOKEN", None)
    result = subprocess.run(
        argv("ray get-auth-token --generate"), capture_output=True, text=True, env=env, timeout=120
    )
    assert result.returncode == 0, result.stderr[-2000:]
    token = (tmp_path / ".ray" / "auth_token").read_text().strip()
    assert len(token) >= 32


# -- on the shared Ray session, and on a Ray of its own ---------------------------------


@pytest.mark.ray
def test_the_advise_command(ray_session, capsys):
    import mlflow

    command = next(c for c in RUN if RUN[c] == "test_the_advise_command")
    # The sweep's four candidates at two rates, on fewer images and epochs.
    smaller = "overrides=[scaling.num_workers=1, epochs=2, data.train_per_class=8]"
    extra = ["--samples", "40", "--rates", "0.02,0.1", "--set", smaller]
    assert in_process(command, *extra, **LOCAL_PATHS) == 0
    out = capsys.readouterr().out
    assert "candidates, best first" in out and "paste into a train config" in out
    assert "training FLOPs" in out and "signals (they explain the ranking" in out
    pasted = out.split("paste into a train config:\n", 1)[1].split("\nMLflow run:")[0]
    found = yaml.safe_load(pasted)
    from_dict(found["policy"])  # a policy and its rate, ready for the config
    assert found["optimizer"]["lr"] in (0.02, 0.1)
    run_id = re.search(r"MLflow run: (\w+)", out).group(1)
    client = mlflow.MlflowClient(f"sqlite:///{Path.cwd()}/mlflow.db")
    assert client.get_run(run_id).data.tags["freezelab.stage"] == "advise"


@pytest.mark.ray
def test_the_tiny_sweep(ray_session, capsys):
    command = next(c for c in RUN if RUN[c] == "test_the_tiny_sweep")
    smaller = "overrides=[scaling.num_workers=1, epochs=2, data.train_per_class=8]"
    # Two of its four policies (one with a phase change): each trial costs a Train start.
    two = "space.policies=[{type: head_only}, {type: lp_ft, probe_epochs: 1}]"
    code = in_process(command, "--set", smaller, "--set", two, **LOCAL_PATHS)
    out = capsys.readouterr().out
    assert code == 0, out[-3000:]
    best = yaml.safe_load(Path("freezelab_runs/sweep-tiny/best_policy.yaml").read_text())
    assert best["type"] in {"head_only", "lp_ft"}
    assert "best policy" in out


def _children(db: Path) -> list[tuple[str, str]]:
    import sqlite3

    if not db.exists():
        return []
    with sqlite3.connect(db) as connection:
        try:
            return connection.execute(
                "select r.name, r.status from runs r join tags t on t.run_uuid = r.run_uuid "
                "where t.key = 'mlflow.parentRunId'"
            ).fetchall()
        except sqlite3.OperationalError:  # the tables are not there yet
            return []


def _kill_session(process: subprocess.Popen) -> None:
    """SIGKILL the command and every process of its session: its Ray too."""
    session = os.getsid(process.pid)
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if os.getsid(int(entry.name)) == session:
                    os.kill(int(entry.name), signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
    process.wait(timeout=60)


@pytest.mark.ray
@pytest.mark.timeout(1200)  # up to 300 s to the kill, 600 s to resume
def test_the_optuna_sweep_resumes_after_a_kill(tmp_path):
    """The README's Optuna sweep, killed (SIGKILL, its Ray with it) while its second
    trial trains, then resumed: Tune restores the searcher's state from the sweep
    folder, so the sweep ends with exactly num_samples (2) trials and a best policy."""
    command = next(c for c in RUN if RUN[c] == "test_the_optuna_sweep_resumes_after_a_kill")
    smaller = [
        "--set",
        "num_samples=2",
        "--set",
        "max_concurrent_trials=1",
        "--set",
        "overrides=[scaling.num_workers=1, data.train_per_class=8]",
        # Without ASHA: a trial that Tune stops is killed with its Train controller, whose
        # placement group Ray's cleaner frees only when it finds a single Ray on the
        # machine, and the suite's own Ray session is up beside this one.
        "--set",
        "asha=null",
    ]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "MLFLOW_"))}
    words = [*argv(command, **LOCAL_PATHS), *smaller]
    db = tmp_path / "mlflow.db"
    with _address_file_kept():  # a Ray of its own rewrites Ray's address file
        with open(tmp_path / "first.log", "w") as log:
            first = subprocess.Popen(
                words,
                cwd=tmp_path,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        try:
            # One trial at a time: a second trial's run means the first one is done.
            wait_for(
                lambda: first.poll() is None and len(_children(db)) >= 2,
                300,
                "the second Optuna trial",
            )
        finally:
            _kill_session(first)
        assert len(_children(db)) == 2  # the second trial was cut short
        resumed = subprocess.run(
            [*words, "--resume"],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
            start_new_session=True,
        )
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    children = _children(db)
    # Two trials in all, each with one MLflow run, every one finished.
    assert len(children) == 2 and {s for _, s in children} == {"FINISHED"}, children
    assert "resuming sweep 'sweep-optuna'" in resumed.stdout
    assert (tmp_path / "freezelab_runs" / "sweep-optuna" / "best_policy.yaml").is_file()


# -- against a real Ray head and the README's MLflow server -----------------------------


def _submit_env() -> dict[str, str]:
    """A submitting machine's environment: the head's token, nothing else of Ray's."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "MLFLOW_"))}
    env["RAY_AUTH_MODE"] = "token"
    return env


@pytest.fixture(scope="module")
def cluster(tmp_path_factory) -> Iterator[dict[str, str]]:
    """A Ray head whose jobs keep their relative results in ``home`` (FREEZELAB_HOME), the
    README's ``mlflow server`` on 127.0.0.1, and a cats-and-dogs image folder."""
    root = tmp_path_factory.mktemp("docs-cluster")
    home = root / "home"
    server_command = next(c for c in RUN if RUN[c] == "server")
    port = free_port()
    words = argv(
        server_command,
        **{
            "10.0.0.5": "127.0.0.1",
            "--port 5000": f"--port {port}",
            "sqlite:///mlflow-server.db": f"sqlite:///{root}/mlflow-server.db",
            "/shared/mlflow-artifacts": str(root / "mlflow-artifacts"),
        },
    )
    server = subprocess.Popen(
        [*words, "--workers", "1"],
        stdout=open(root / "server.log", "w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
        env=server_env(),
    )
    uri = f"http://127.0.0.1:{port}"

    def healthy() -> bool:
        assert server.poll() is None, (root / "server.log").read_text()[-2000:]
        try:
            with urllib.request.urlopen(uri + "/health", timeout=2):
                return True
        except OSError:
            return False

    try:
        wait_for(healthy, 90, "the mlflow server")
        with ray_head(root, cpus=2, env={"FREEZELAB_HOME": str(home)}) as head:
            yield {
                "dashboard": head.dashboard,
                "mlflow": uri,
                "home": str(home),
                "images": str(_image_folder(root / "cats_dogs")),
                "runs": str(root / "shared_runs"),
                "root": str(root),
            }
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)


def _image_folder(root: Path) -> Path:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for label, shade in (("cats", 60), ("dogs", 190)):
        (root / label).mkdir(parents=True)
        for i in range(8):
            pixels = np.clip(rng.normal(shade, 40, (40, 40, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / label / f"{i}.jpg")
    return root


VGG_LAST5 = yaml.safe_load((EXAMPLES / "vgg16_cats_dogs_last5.yaml").read_text())["policy"]
SWEPT = [{"type": "head_only"}, {"type": "last_n", "n": 1, "unit": "layer"}]


def _vgg_small(cluster: dict[str, str], *more: str) -> list[str]:
    """The VGG16 examples at CPU size: random weights, a tiny image folder, one epoch."""
    sets = [
        "model.pretrained=false",
        f"data.root={cluster['images']}",
        "data.input_size=32",
        "data.num_workers=0",
        "epochs=1",
        "batch_size=4",
        "scaling.num_workers=1",
        "scaling.use_gpu=false",
        f"storage_path={cluster['runs']}",
        f"mlflow.tracking_uri={cluster['mlflow']}",
        *more,
    ]
    return [word for value in sets for word in ("--set", value)]


def _run(words: list[str], cwd: Path = ROOT) -> subprocess.CompletedProcess:
    result = subprocess.run(
        words, cwd=cwd, env=_submit_env(), capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    return result


def _run_all(commands: list[list[str]]) -> list[subprocess.CompletedProcess]:
    """Run commands at once (from the checkout), each to success."""
    processes = [
        subprocess.Popen(
            words,
            cwd=ROOT,
            env=_submit_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for words in commands
    ]
    results = []
    deadline = time.monotonic() + 600  # they run at once: one budget for all
    for words, process in zip(commands, processes, strict=True):
        out, err = process.communicate(timeout=max(1.0, deadline - time.monotonic()))
        result = subprocess.CompletedProcess(words, process.returncode, out, err)
        assert result.returncode == 0, out[-4000:] + err[-4000:]
        results.append(result)
    return results


def _head(cluster) -> dict[str, str]:
    return {"http://HEAD:8265": cluster["dashboard"], "http://localhost:8265": cluster["dashboard"]}


@pytest.mark.ray
def test_ray_job_submit_and_compare(cluster, capsys):
    """The README's `ray job submit` of the tiny config (two workers, as the file says),
    then its `freezelab compare` of the head's store: the job kept its results in
    FREEZELAB_HOME, not in its temporary working directory."""
    command = f"{RAY_JOB} examples/train_tiny.yaml --set epochs=2"
    # runtime_env.yaml's header shows the same command with a placeholder config
    assert f"{RAY_JOB} CONFIG".replace("CONFIG", "examples/train_tiny.yaml --set epochs=2") == (
        command
    )
    result = _run(argv(command, **_head(cluster)))
    output = result.stdout + result.stderr
    assert "succeeded" in output.lower()
    # Quiet by default: each epoch's line once (rank 0's), none of Ray Train's own lines
    for epoch in (1, 2):
        assert len(re.findall(rf"\] tiny-\S+ epoch {epoch}/2 phase", output)) == 1, output
    assert "TrainingReport(" not in output and "Reporting training result" not in output
    home = Path(cluster["home"])
    compare = "freezelab compare freezelab --tracking-uri sqlite:///$HOME/freezelab/mlflow.db"
    assert in_process(compare, "--format", "json", **{"$HOME/freezelab": str(home)}) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["policy"], r["epochs"], r["status"]) for r in rows] == [
        ("gradual(every=1)", 2, "FINISHED")
    ]
    states = list((home / "freezelab_runs").glob("tiny-gradual-every1-*/**/state.json"))
    assert len(states) == 2  # checkpoint.keep: 2
    assert list((home / "mlruns" / "freezelab").glob("*/artifacts/config.yaml"))


@pytest.mark.ray
def test_the_vgg16_twins_as_ray_jobs(cluster, capsys):
    """Both VGG16 examples as their headers submit them, then compared in MLflow."""
    # Both at once, as a user would submit them: the head has a CPU for each.
    results = _run_all(
        [
            [*argv(f"{RAY_JOB} examples/{example}", **_head(cluster)), *_vgg_small(cluster)]
            for example in ("vgg16_cats_dogs_last5.yaml", "vgg16_cats_dogs_full.yaml")
        ]
    )
    for result in results:
        assert "succeeded" in (result.stdout + result.stderr).lower()
    capsys.readouterr()
    code = main(
        ["compare", "vgg16-cats-dogs", "--tracking-uri", cluster["mlflow"], "--format", "json"]
    )
    assert code == 0
    rows = json.loads(capsys.readouterr().out)
    expected = [from_dict(p).label() for p in ({"type": "full"}, VGG_LAST5)]
    assert sorted(r["policy"] for r in rows) == sorted(expected)
    assert all(r["status"] == "FINISHED" and r["epochs"] == 1 for r in rows)


@pytest.mark.ray
@pytest.mark.timeout(1500)  # two rounds of jobs, 600 s each
def test_freezelab_submit_as_documented(cluster):
    """The README's `freezelab submit` trains; the Dockerfile's and the cluster
    launcher's variants submit the same config again, and resume it as finished."""
    interface = "eth0" if Path("/sys/class/net/eth0").exists() else "lo"
    shared = str(Path(cluster["root"]) / "mnt_shared_runs")
    places = {
        **_head(cluster),
        "/mnt/shared/freezelab_runs": shared,
        "GLOO_SOCKET_IFNAME=eth0": f"GLOO_SOCKET_IFNAME={interface}",
    }
    readme, dockerfile, launcher = (c for c in RUN if c.startswith(SUBMIT_VGG))
    result = _run([*argv(readme, **places), *_vgg_small(cluster, f"storage_path={shared}")])
    job_id = re.search(r"as job (\S+)", result.stdout).group(1)
    assert job_id.startswith("freezelab-train-vgg16-cats-dogs-last5-")
    assert "vgg16-cats-dogs-last5 epoch 1/1" in result.stdout  # the job's log, streamed
    assert result.stdout.rstrip().endswith(f"job {job_id}: SUCCEEDED")
    variants = [
        [*argv(command, **places), *_vgg_small(cluster, f"storage_path={shared}")]
        for command in (dockerfile, launcher)
    ]
    for again in _run_all(variants):
        assert again.stdout.rstrip().endswith(": SUCCEEDED")
        assert "already complete" in again.stdout


@pytest.mark.ray
def test_the_rayjob_sweep(cluster, capsys, tmp_path):
    """The KubeRay template's sweep (its ConfigMap) run by its entrypoint as a job on the
    head, then the template's `freezelab compare` and `freezelab report` against the
    tracking server. Smaller: two policies of the space, one epoch, no ASHA."""
    from ray.job_submission import JobSubmissionClient

    documents = list(yaml.safe_load_all((TEMPLATES / "rayjob-sweep.yaml").read_text()))
    sweep = yaml.safe_load(documents[0]["data"]["sweep.yaml"])
    assert documents[1]["spec"]["entrypoint"] in RUN
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump(sweep))
    small = [value for flag, value in zip(*[iter(_vgg_small(cluster))] * 2, strict=True)]
    overrides = [
        "--set",
        "overrides=[" + ", ".join(f"'{value}'" for value in small) + "]",
        "--set",
        "space.policies=" + json.dumps(SWEPT),
        "--set",
        "asha=null",
    ]
    entrypoint = argv(
        documents[1]["spec"]["entrypoint"],
        **{"/home/ray/configs/sweep.yaml": str(tmp_path / "sweep.yaml")},
    )
    token = (Path.home() / ".ray" / "auth_token").read_text().strip()
    client = JobSubmissionClient(cluster["dashboard"], headers={"Authorization": f"Bearer {token}"})
    job = client.submit_job(entrypoint=shlex.join([*entrypoint, *overrides]))
    deadline = time.monotonic() + 600
    while str(client.get_job_status(job)).split(".")[-1] not in ("SUCCEEDED", "FAILED", "STOPPED"):
        assert time.monotonic() < deadline, "the sweep job did not finish"
        time.sleep(1)
    logs = client.get_job_logs(job)
    assert str(client.get_job_status(job)).endswith("SUCCEEDED"), logs[-4000:]
    assert (Path(cluster["runs"]) / "vgg16-policies" / "best_policy.yaml").is_file()

    server = cluster["mlflow"].removeprefix("http://")
    for name in ("freezelab compare", "freezelab report"):
        command = f"{name} vgg16-policies --tracking-uri http://MLFLOW_HOST:5000"
        extra = ["--format", "json"] if "compare" in name else ["--out", str(tmp_path / "report")]
        capsys.readouterr()
        assert in_process(command, *extra, **{"MLFLOW_HOST:5000": server}) == 0
        out = capsys.readouterr().out
        if "compare" in name:
            rows = json.loads(out)
            expected = [from_dict(p).label() for p in SWEPT]
            assert sorted(r["policy"] for r in rows) == sorted(expected)
    assert (tmp_path / "report" / "index.html").is_file()
