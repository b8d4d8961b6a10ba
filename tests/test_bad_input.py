"""Bad input fails before anything is created, in one line that names what is wrong."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import yaml

from freezelab.cli import main
from freezelab.config_io import parse_yaml
from freezelab.errors import ConfigError
from freezelab.policies import PolicyError, load_policy
from tests.conftest import TINY, merge


def _config_file(tmp_path: Path, **update) -> Path:
    path = tmp_path / "train.yaml"
    config = merge(TINY, {"storage_path": str(tmp_path / "runs"), **update})
    path.write_text(yaml.safe_dump(config))
    return path


def _train_error(tmp_path, capsys, **update) -> str:
    assert main(["train", str(_config_file(tmp_path, **update))]) == 2
    # One error line (a shared Ray session may print its own lines in this process).
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(errors) == 1 and errors[0].startswith("freezelab train: error: "), errors
    err = errors[0]
    assert not (tmp_path / "runs").exists(), "a bad config left a run directory"
    assert not (tmp_path / "mlflow.db").exists(), "a bad config left an MLflow store"
    return err


@pytest.mark.parametrize(
    "update, needle",
    [
        ({"optimizer": {"lr": float("inf")}}, "optimizer.lr: Input should be a finite number"),
        ({"optimizer": {"weight_decay": float("nan")}}, "optimizer.weight_decay"),
        ({"schedule": {"warmup_epochs": float("inf")}}, "schedule.warmup_epochs"),
        ({"policy": {"type": "full", "head_lr_mult": float("inf")}}, "head_lr_mult"),
        (
            {"policy": {"type": "lp_ft", "probe_epochs": 1, "ft_lr_factor": float("nan")}},
            "ft_lr_factor",
        ),
        ({"policy": {"type": "last_n", "n": True}}, "n: expected a number, got True"),
        ({"epochs": True}, "epochs: expected a number, got True"),
        (
            {"policy": {"type": "lp_ft", "probe_epochs": 2}},
            "probe_epochs=2 leaves no fine-tuning epoch",
        ),
    ],
)
def test_values_that_cannot_be_meant_are_refused(tmp_path, capsys, update, needle):
    assert needle in _train_error(tmp_path, capsys, **update)


def test_a_storage_path_that_cannot_be_written_is_refused(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    err = _train_error(tmp_path, capsys, storage_path=str(blocker / "runs"))
    assert "is a file, not a directory" in err
    assert main(["train", str(_config_file(tmp_path, storage_path="/proc/freezelab/runs"))]) == 2
    assert "cannot write in '/proc'" in capsys.readouterr().err
    assert not list(tmp_path.glob(".freezelab-probe-*"))


def test_an_image_folder_with_one_class_or_no_images_is_refused(tmp_path, capsys):
    root = tmp_path / "images"
    (root / "cats").mkdir(parents=True)
    (root / "cats" / "1.png").write_bytes(b"x")
    data = {"data": {"kind": "image_folder", "root": str(root), "input_size": 32}}
    path = _config_file(tmp_path)
    config = yaml.safe_load(path.read_text())
    config.update(data)
    path.write_text(yaml.safe_dump(config))
    assert main(["train", str(path)]) == 2
    assert "has one class folder ('cats')" in capsys.readouterr().err
    (root / "dogs").mkdir()
    assert main(["train", str(path)]) == 2
    err = capsys.readouterr().err
    assert "no image files" in err and "'dogs'" in err


def test_a_head_too_large_to_allocate_is_refused_with_its_size(tmp_path, capsys):
    err = _train_error(
        tmp_path,
        capsys,
        model={"name": "test_resnet", "head": {"pool": "flatten", "hidden": [2**20, 2**20]}},
    )
    assert "parameters" in err and "GiB" in err


def test_a_yaml_alias_bomb_is_refused_without_expanding_it(tmp_path, capsys):
    levels = ["a: &a [x, x, x, x, x, x, x, x, x]"]
    for index, name in enumerate("bcdefghi"):
        previous = "abcdefghi"[index]
        levels.append(f"{name}: &{name} [" + ", ".join([f"*{previous}"] * 9) + "]")
    path = tmp_path / "bomb.yaml"
    path.write_text("\n".join(levels) + "\n")
    assert len(path.read_bytes()) < 400
    started = time.perf_counter()
    assert main(["train", str(path)]) == 2
    assert time.perf_counter() - started < 5
    assert "expands to more than" in capsys.readouterr().err


@pytest.mark.parametrize(
    "text, needle",
    [("42", "not a policy"), ("[1, 2]", "not a policy"), ("nope.yaml", "does not exist")],
)
def test_inline_policies_that_are_not_policies(text, needle):
    with pytest.raises(PolicyError, match=needle):
        load_policy(text)


def test_a_policy_path_that_is_a_directory_is_named(tmp_path):
    with pytest.raises(PolicyError, match="is a directory"):
        load_policy(str(tmp_path))


def test_parse_yaml_names_where_the_text_came_from():
    with pytest.raises(ConfigError, match=r"--set x: not valid YAML \(line 1"):
        parse_yaml("{a: [", "--set x")


def test_compare_and_report_against_a_missing_database_create_nothing(tmp_path, capsys):
    uri = f"sqlite:///{tmp_path}/absent.db"
    assert main(["compare", "freezelab", "--tracking-uri", uri]) == 2
    assert "no MLflow database" in capsys.readouterr().err
    assert main(["report", "freezelab", "--tracking-uri", uri]) == 2
    assert "no MLflow database" in capsys.readouterr().err
    assert not (tmp_path / "absent.db").exists()


def test_compare_and_report_against_an_unreachable_server_fail_within_seconds(capsys):
    for command in ("compare", "report"):
        started = time.perf_counter()
        assert main([command, "freezelab", "--tracking-uri", "http://127.0.0.1:9"]) == 2
        assert time.perf_counter() - started < 15
        assert "unreachable" in capsys.readouterr().err


def test_an_experiment_named_dotdot_stays_inside_mlruns(tmp_path):
    import mlflow

    from freezelab.mlflow.store import experiment_id_for

    client = mlflow.MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    experiment = client.get_experiment(experiment_id_for(client, ".."))
    location = Path(experiment.artifact_location.removeprefix("file://"))
    assert location.resolve().is_relative_to((tmp_path / "mlruns").resolve())


def test_uri_secrets_are_hidden_in_every_shape():
    from freezelab.redact import redact_text, redact_uri

    assert redact_uri("http://alice:p@ss@mlflow:5000/x") == "http://alice:***@mlflow:5000/x"
    assert redact_uri("https://ghp_TOKEN@mlflow.example/x") == "https://***@mlflow.example/x"
    assert redact_uri("s3://bucket/runs") == "s3://bucket/runs"
    assert "pw" not in redact_text("cannot reach http://u:pw@h/x (and https://u:pw@h2)")


def test_a_config_nested_too_deeply_is_refused(tmp_path, capsys):
    path = tmp_path / "deep.yaml"
    path.write_text("a: " + "[" * 5000 + "]" * 5000 + "\n")
    assert main(["train", str(path)]) == 2
    assert "nested too deeply" in capsys.readouterr().err
