from pathlib import Path

import pytest
import yaml

from freezelab.study import DEFAULT_STUDY, load_study, stage_config
from freezelab.trainers.config import ConfigError, load_config, validate_config
from freezelab.trainers.location import config_hash
from tests.conftest import TINY

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_validates(path):
    data = yaml.safe_load(path.read_text())
    if "space" in data:  # a sweep file: its space is validated against the model
        from freezelab.sweep.space import load_sweep, validate_space

        validate_space(load_sweep(path))
    elif "policies" in data:  # a study file
        study = load_study(path)
        for policy in study.policies:
            stage_config(study, study.finetune, "check", policy=policy)
    elif "type" in data:  # a policy file
        from freezelab.policies import load_policy

        load_policy(path)
    else:
        config = load_config(path)
        if "{" in data["name"]:  # a name template: filled in from the config
            assert config.name == data["name"].format(
                policy=config.policy.slug(),
                hash=config_hash(config.to_dict()),
                model=config.model.name,
                seed=config.seed,
            )
        else:
            assert config.name == data["name"]


def test_example_study_file_is_the_builtin_study():
    from freezelab.study import finetune_configs, load_study

    data = yaml.safe_load((EXAMPLES / "transfer_study.yaml").read_text())
    assert data == DEFAULT_STUDY  # its 3 seeds and its selection too
    study = load_study(EXAMPLES / "transfer_study.yaml")
    selecting = finetune_configs(study, "t", selecting=True)
    rates = study.select.grid["optimizer.lr"]
    assert len(selecting) == len(study.variants) * len(study.policies) * len(rates)
    configs = finetune_configs(study, "t")
    assert len(configs) == len(study.variants) * len(study.policies) * 3
    assert len({c.name for c in configs + selecting}) == len(configs) + len(selecting)


def test_overrides_keep_yaml_types(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({**TINY, "storage_path": str(tmp_path)}))
    config = load_config(
        path,
        overrides=[
            "optimizer.lr=0.001",
            "epochs=7",
            "policy={type: last_n, n: 2}",
            "scaling.use_gpu=true",
        ],
    )
    assert config.optimizer.lr == 0.001
    assert config.epochs == 7
    assert config.policy.type == "last_n" and config.policy.n == 2
    assert config.scaling.use_gpu is True


def test_relative_storage_path_becomes_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = validate_config({k: v for k, v in TINY.items()})
    assert config.storage_path == str(tmp_path / "freezelab_runs")
    assert (
        validate_config({**TINY, "storage_path": "s3://bucket/x"}).storage_path == "s3://bucket/x"
    )


@pytest.mark.parametrize(
    ("update", "expected"),
    [
        ({"epochs": 0}, "epochs: Input should be greater than or equal to 1 (got 0)"),
        ({"optimizer": {"name": "lion"}}, "optimizer.name"),
        ({"batch_sizes": 3}, "batch_sizes: unknown field"),
        ({"policy": {"type": "freeze_all"}}, "unknown policy type 'freeze_all'"),
        ({"policy": {"type": "last_n"}}, "n: missing"),
        ({"name": "has space"}, "name: String should match pattern"),
        (
            {"model": {"name": "x", "pretrained": True, "weights": "w.pt"}},
            "either pretrained or weights",
        ),
    ],
)
def test_bad_config_names_field_and_value(update, expected):
    with pytest.raises(ConfigError) as err:
        validate_config({**TINY, **update})
    assert expected in str(err.value)


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ({"epoch_fraction": 0}, "data.epoch_fraction: Input should be greater than 0 (got 0)"),
        ({"epoch_fraction": -0.5}, "data.epoch_fraction: Input should be greater than 0"),
        ({"epoch_fraction": 1.01}, "data.epoch_fraction: Input should be less than or equal to 1"),
        (
            {"kind": "image_folder", "root": "pets", "loader": "ray_data", "epoch_fraction": 0.5},
            "data: epoch_fraction is not supported with loader 'ray_data'",
        ),
        (
            {"kind": "image_folder", "root": "s3://bucket/pets", "epoch_fraction": 0.5},
            "data: epoch_fraction is not supported with loader 'ray_data' (which loader 'auto'",
        ),
    ],
)
def test_bad_epoch_fraction_is_one_line(data, expected):
    kind = {"kind": "digits"} if "kind" not in data else {}
    with pytest.raises(ConfigError) as err:
        validate_config({**TINY, "data": {**kind, **data}})
    assert expected in str(err.value)
    assert "\n" not in str(err.value)


def test_epoch_fraction_keeps_auto_on_the_dataloader_and_off_the_probe_source():
    from freezelab.trainers.data import resolve_loader

    folder = validate_config({**TINY, "data": {"kind": "image_folder", "root": "pets"}}).data
    subset = folder.model_copy(update={"epoch_fraction": 0.5})
    assert resolve_loader(folder, nodes=2) == "ray_data"
    assert resolve_loader(subset, nodes=2) == "torch"
    with pytest.raises(ConfigError, match="forgetting.source: epoch_fraction does not apply"):
        validate_config(
            {**TINY, "forgetting": {"source": {"kind": "digits", "epoch_fraction": 0.5}}}
        )


def test_missing_file_and_bad_override(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(TINY))
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        load_config(path, overrides=["epochs"])
    path.write_text("- just\n- a list\n")
    with pytest.raises(ConfigError, match="is a mapping"):
        load_config(path)


def test_config_round_trips_through_its_dict():
    config = validate_config({**TINY, "policy": {"type": "lp_ft", "probe_epochs": 2}})
    again = validate_config(config.to_dict())
    assert again == config
    assert again.to_dict()["policy"] == {**config.policy.to_dict()}
    assert again.to_dict()["policy"]["probe_epochs"] == 2
