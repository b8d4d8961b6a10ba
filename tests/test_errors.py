"""One error contract for every command: a user error ends in exit 2 and one line on
stderr naming what is wrong, with no traceback and nothing created; ``--debug`` shows
the traceback; a bug keeps its traceback."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from safetensors.torch import save_file

from freezelab.cli import main
from freezelab.policies import list_policies
from freezelab.sweep.space import SweepConfig
from freezelab.trainers.config import TrainConfig
from tests.conftest import TINY, merge


def _write(tmp_path: Path, data: dict | None = None, **update) -> Path:
    config = merge(TINY, {"storage_path": str(tmp_path / "runs"), **update})
    if data is not None:
        config["data"] = data
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _cli(*argv: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "freezelab", *argv],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
    )


def _one_error_line(err: str) -> bool:
    """In-process, a shared Ray session may print its own lines to stderr: exactly one
    line is freezelab's error."""
    return len([line for line in err.splitlines() if line.startswith("freezelab ")]) == 1


def _assert_one_line_error(result: subprocess.CompletedProcess, *needles: str) -> str:
    assert result.returncode == 2, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert lines[0].startswith("freezelab train: error: ")
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def test_missing_data_root_is_one_line_and_creates_nothing(tmp_path):
    path = _write(
        tmp_path, data={"kind": "image_folder", "root": str(tmp_path / "nope"), "input_size": 32}
    )
    result = _cli("train", str(path), cwd=tmp_path)
    _assert_one_line_error(result, "data.root", "nope")
    assert not (tmp_path / "runs").exists() and not (tmp_path / "mlflow.db").exists()


def test_unreachable_tracking_server_is_one_line(tmp_path):
    path = _write(tmp_path, mlflow={"enabled": True, "tracking_uri": "http://127.0.0.1:9"})
    result = _cli("train", str(path), cwd=tmp_path)
    _assert_one_line_error(result, "http://127.0.0.1:9", "unreachable")


@pytest.mark.parametrize(
    "content, needle",
    [
        (b"\x80\x04not a pickle at all", "model.weights"),
        (None, "does not exist"),
    ],
    ids=["garbage", "missing"],
)
def test_unreadable_weights_file_is_one_line_before_anything_starts(tmp_path, content, needle):
    weights = tmp_path / "weights.pt"
    if content is not None:
        weights.write_bytes(content)
    path = _write(tmp_path, model={"name": "test_resnet", "weights": str(weights)})
    result = _cli("train", str(path), cwd=tmp_path)
    _assert_one_line_error(result, needle)
    assert not (tmp_path / "runs").exists()


def test_weights_of_another_architecture_are_refused_up_front(tmp_path, capsys):
    import timm

    other = timm.create_model("test_vit", num_classes=3)
    save_file(
        {k: v.contiguous() for k, v in other.state_dict().items()}, tmp_path / "vit.safetensors"
    )
    path = _write(
        tmp_path, model={"name": "test_resnet", "weights": str(tmp_path / "vit.safetensors")}
    )
    assert main(["train", str(path)]) == 2
    err = capsys.readouterr().err
    assert _one_error_line(err) and "model.weights" in err
    assert not (tmp_path / "runs").exists()


def test_debug_shows_the_traceback(tmp_path):
    path = _write(
        tmp_path, data={"kind": "image_folder", "root": str(tmp_path / "nope"), "input_size": 32}
    )
    result = _cli("--debug", "train", str(path), cwd=tmp_path)
    assert result.returncode != 0
    assert "Traceback" in result.stderr and "DataError" in result.stderr


def test_a_bug_keeps_its_traceback(monkeypatch, tmp_path):
    path = _write(tmp_path)

    def broken(*args, **kwargs):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr("freezelab.api.check_run", broken)
    with pytest.raises(ZeroDivisionError):
        main(["train", str(path)])


@pytest.mark.parametrize(
    "update, needles",
    [
        ({"epochs": 0}, ["epochs", "greater than or equal to 1"]),
        ({"optimizer": {"lr": -1}}, ["optimizer.lr"]),
        ({"policy": {"type": "last_n"}}, ["last_n", "n: missing"]),
        ({"policy": {"type": "nope"}}, ["unknown policy type 'nope'"]),
        ({"bogus": 1}, ["bogus: unknown field"]),
        ({"epochs": 0, "batch_size": 0}, ["epochs", "batch_size"]),
    ],
)
def test_every_config_error_is_one_line(tmp_path, capsys, update, needles):
    path = _write(tmp_path, **update)
    assert main(["train", str(path)]) == 2
    err = capsys.readouterr().err
    assert _one_error_line(err), err
    for needle in needles:
        assert needle in err


def test_a_huge_value_is_quoted_only_in_part(tmp_path, capsys):
    path = _write(tmp_path, optimizer={"name": "x" * 200_000})
    assert main(["train", str(path)]) == 2
    err = capsys.readouterr().err
    assert "optimizer.name" in err and len(err) < 1000


@pytest.mark.parametrize("bad", ["directory", "binary"])
def test_a_config_that_is_not_a_yaml_file_is_named(tmp_path, capsys, bad):
    target = tmp_path / "cfg"
    if bad == "directory":
        target.mkdir()
    else:
        target.write_bytes(bytes(range(256)) * 4)
    assert main(["train", str(target)]) == 2
    err = capsys.readouterr().err
    assert str(target) in err and _one_error_line(err)


# -- the schema ---------------------------------------------------------------------


def test_the_train_schema_lists_every_policy_and_its_fields():
    schema = TrainConfig.model_json_schema()
    variants = {v["title"]: v for v in schema["properties"]["policy"]["oneOf"]}
    assert set(variants) == set(list_policies())
    for name, cls in list_policies().items():
        assert set(variants[name]["properties"]) == set(cls.model_fields), name
        assert variants[name]["properties"]["type"]["const"] == name
        assert "type" in variants[name]["required"]
    assert variants["last_n"]["required"] == ["type", "n"]


def test_freezelab_schema_prints_train_and_sweep_schemas(capsys):
    assert main(["schema"]) == 0
    train = json.loads(capsys.readouterr().out)
    assert train == json.loads(json.dumps(TrainConfig.model_json_schema()))
    assert main(["schema", "sweep"]) == 0
    sweep = json.loads(capsys.readouterr().out)
    assert sweep["title"] == SweepConfig.__name__ and "space" in sweep["properties"]


def test_a_registered_policy_appears_in_the_schema(monkeypatch):
    from typing import Literal

    from freezelab.policies import FreezePolicy, base

    class OnlyStem(FreezePolicy):
        type: Literal["only_stem"] = "only_stem"
        depth: int = 1

    monkeypatch.setitem(base._REGISTRY, "only_stem", OnlyStem)
    variants = {
        v["title"]: v for v in TrainConfig.model_json_schema()["properties"]["policy"]["oneOf"]
    }
    assert "depth" in variants["only_stem"]["properties"]


def test_the_driver_checks_a_weights_file_without_building_the_weights(tmp_path):
    """The driver's check builds the model's shapes only (the meta device): a weights
    file that fits passes without a warning per tensor, one that does not still fails."""
    import warnings

    import timm

    from freezelab.errors import ConfigError
    from freezelab.trainers.config import load_config
    from freezelab.trainers.models import build_unallocated
    from freezelab.trainers.preflight import check_run

    good = timm.create_model("test_resnet", num_classes=3)
    save_file({k: v.contiguous() for k, v in good.state_dict().items()}, tmp_path / "w.safetensors")
    config = load_config(
        _write(tmp_path, model={"name": "test_resnet", "weights": str(tmp_path / "w.safetensors")})
    )
    assert {p.device.type for p in build_unallocated(config, None).parameters()} == {"meta"}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any warning fails the test
        check_run(config)
    state = good.state_dict()
    state["conv1.0.weight"] = state["conv1.0.weight"][:, :1].contiguous()  # one input channel
    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "w.safetensors")
    with pytest.raises(ConfigError, match=r"model.weights: .*conv1.0.weight has shape"):
        check_run(config)
