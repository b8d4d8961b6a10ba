"""A run's results belong to its config: a name resumes only the same run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from freezelab.cli import main
from freezelab.errors import ConfigError
from freezelab.trainers.config import load_config
from freezelab.trainers.launch import run_training
from freezelab.trainers.location import RECORD_FILE, RunLocation, config_changes


def test_a_changed_config_is_refused_naming_the_keys_that_differ(tiny_config):
    first = tiny_config(name="same", epochs=2)
    run_training(first)
    changed = tiny_config(name="same", epochs=1, optimizer={"name": "sgd", "lr": 0.5})
    before = sorted(p.name for p in RunLocation.of(first).path.rglob("*"))
    with pytest.raises(ConfigError) as caught:
        run_training(changed)
    message = str(caught.value)
    assert "epochs: 2 -> 1" in message and "optimizer.lr: 0.05 -> 0.5" in message
    assert "--overwrite" in message and "{hash}" in message
    assert sorted(p.name for p in RunLocation.of(first).path.rglob("*")) == before


def test_bookkeeping_changes_still_resume(tiny_config):
    first = run_training(tiny_config(name="keep", epochs=1))
    again = run_training(tiny_config(name="keep", epochs=1, checkpoint={"keep": 5}, max_failures=2))
    assert again.already_complete and again.checkpoint_dir == first.checkpoint_dir


def test_the_cli_refuses_before_ray_or_mlflow_start(tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text(
        "name: same\nmodel: {name: test_resnet}\n"
        "data: {kind: digits, classes: [0, 1], input_size: 32, train_per_class: 8}\n"
        "policy: {type: head_only}\nepochs: 1\nscaling: {num_workers: 0}\n"
        f"storage_path: {tmp_path / 'runs'}\n"
    )
    assert main(["train", str(config)]) == 0
    runs = list((tmp_path / "mlruns").rglob("meta.yaml"))
    capsys.readouterr()
    assert main(["train", str(config), "--set", "epochs=2", "--set", "optimizer.lr=0.5"]) == 2
    err = capsys.readouterr().err
    assert "epochs: 1 -> 2" in err and "optimizer.lr: 0.01 -> 0.5" in err
    assert list((tmp_path / "mlruns").rglob("meta.yaml")) == runs, "no new MLflow run"
    # --overwrite moves the old run aside and trains the new config under the name.
    assert main(["train", str(config), "--set", "epochs=2", "--overwrite"]) == 0
    aside = list((tmp_path / "runs").glob("same.replaced-*"))
    assert len(aside) == 1 and (aside[0] / RECORD_FILE).is_file()
    record = json.loads((tmp_path / "runs" / "same" / RECORD_FILE).read_text())
    assert record["config"]["epochs"] == 2
    assert json.loads((aside[0] / RECORD_FILE).read_text())["uid"] != record["uid"]


def test_a_name_template_gives_each_config_its_own_run(tiny_config):
    a = tiny_config(name="t-{policy}-{hash}", epochs=1)
    b = tiny_config(name="t-{policy}-{hash}", epochs=1, optimizer={"name": "sgd", "lr": 0.5})
    same = tiny_config(name="t-{policy}-{hash}", epochs=1, mlflow={"experiment": "other"})
    assert a.name.startswith("t-full-") and a.name != b.name and a.name == same.name
    run_training(a)
    run_training(b)  # no conflict: another directory
    assert RunLocation.of(a).path != RunLocation.of(b).path


def test_identical_config_resumes_bit_exactly_after_the_identity_check(tiny_config):
    reference = load_file(run_training(tiny_config(name="ref", epochs=3)).weights_file)
    config = tiny_config(name="part", epochs=3)
    # Two epochs under a shorter schedule would be another config: resume needs the same.
    from faults import CrashAfterEpoch, Interrupted

    where = RunLocation.of(config)
    with pytest.raises(Interrupted):
        run_training(config, reporter=CrashAfterEpoch(0, where.local_checkpoint_dir, 2))
    resumed = load_file(run_training(config).weights_file)
    for name, tensor in reference.items():
        assert torch.equal(resumed[name], tensor), name


def test_config_changes_ignore_bookkeeping_only():
    example = Path(__file__).resolve().parents[2] / "examples" / "train_tiny.yaml"
    old = load_config(example).to_dict()
    new = load_config(
        example,
        overrides=["name=x", "mlflow.experiment=y", "checkpoint.keep=9", "storage_path=/tmp/z"],
    ).to_dict()
    assert config_changes(old, new) == []
    new["policy"]["type"] = "full"
    assert config_changes(old, new)[0].startswith("policy.")


def test_two_processes_claiming_one_name_at_once_never_share_it(tiny_config):
    first = tiny_config(name="race", epochs=1)
    other = tiny_config(name="race", epochs=2)
    where = RunLocation.of(first)
    # The other process wrote its record between our read and our write.
    where._record("theirs", other.safe_dict())
    with pytest.raises(ConfigError, match="just started by another process"):
        where._record("mine", first.safe_dict())
    assert where._record("mine", other.safe_dict()) == "theirs"  # same config: same run
    assert not list(where.path.glob(".freezelab_run.json.*")), "a partial record was left"


def test_a_run_recorded_before_a_field_existed_keeps_its_hash_and_resumes(tiny_config):
    from freezelab.trainers.location import ADDED_FIELDS, config_hash

    source = {"forgetting": {"source": {"kind": "digits", "classes": [0, 1]}}}
    config = tiny_config(name="older", **source)
    recorded = config.safe_dict()
    for key in ADDED_FIELDS:  # as a run of a release before these fields recorded it
        *sections, field = key.split(".")
        node = recorded
        for section in sections:
            node = node[section]
        del node[field]
    now = config.safe_dict()
    assert config_hash(recorded) == config_hash(now)
    assert config_changes(recorded, now) == []
    # The old run's record, without the fields, is the same run: it resumes.
    location = RunLocation.of(config)
    location.path.mkdir(parents=True)
    (location.path / RECORD_FILE).write_text(json.dumps({"uid": "old", "config": recorded}))
    assert location.claim(config) == "old"
    # Another value of an added field is a change, named as any other.
    other = tiny_config(name="older", data={"loader": "torch"}, **source).safe_dict()
    assert config_changes(recorded, other) == ["data.loader: (unset) -> 'torch'"]
    assert config_hash(other) != config_hash(recorded)
