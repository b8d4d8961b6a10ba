"""The command line: ``freezelab policies`` and ``freezelab inspect``, in-process and as a
real ``python -m freezelab`` subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from freezelab.cli import main
from freezelab.policies import list_policies

ROOT = Path(__file__).resolve().parents[1]
KERAS_POLICY = ROOT / "examples" / "policies" / "vgg16_keras_last5.yaml"
KERAS_HEAD = '{"pool": "flatten", "hidden": [256]}'
VGG16_LAYERS = [
    "block1.conv1",
    "block1.conv2",
    "block2.conv1",
    "block2.conv2",
    "block3.conv1",
    "block3.conv2",
    "block3.conv3",
    "block4.conv1",
    "block4.conv2",
    "block4.conv3",
    "block5.conv1",
    "block5.conv2",
    "block5.conv3",
    "head",
]
CONV3x3_512 = 512 * 512 * 3 * 3 + 512


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


# -- freezelab policies -----------------------------------------------------------------


def test_policies_table(capsys):
    code, out, _ = run(capsys, "policies")
    assert code == 0
    lines = out.splitlines()
    for name, cls in list_policies().items():
        assert f"{name}: {cls.description}" in lines
    assert "    n: int (required)" in lines  # last_n's own field
    assert "    probe_epochs: int (required)" in lines
    assert "    include_norm: bool = False" in lines


def test_policies_json(capsys):
    code, out, _ = run(capsys, "policies", "--format", "json")
    assert code == 0
    catalog = json.loads(out)
    assert [entry["type"] for entry in catalog] == list(list_policies())
    by_type = {entry["type"]: entry for entry in catalog}
    for name, cls in list_policies().items():
        fields = by_type[name]["fields"]
        assert set(fields) == set(cls.model_fields) - {"type"}
        assert {"unit", "lr_decay", "head_lr_mult", "bn"} <= set(fields)
        assert by_type[name]["description"] == cls.description
    assert by_type["last_n"]["fields"]["n"] == "int (required)"
    assert by_type["lp_ft"]["fields"]["ft_lr_factor"] == "float = 0.1"
    assert by_type["patterns"]["fields"]["syntax"] == "Literal['glob', 'regex'] = 'glob'"


# -- freezelab inspect ----------------------------------------------------------------


def test_inspect_keras_recipe_json(capsys):
    code, out, err = run(
        capsys,
        "inspect",
        "--model",
        "vgg16",
        "--policy",
        str(KERAS_POLICY),
        "--head",
        KERAS_HEAD,
        "--format",
        "json",
    )
    assert code == 0, err
    report = json.loads(out)
    assert {"model", "epoch", "groups", "trainable_params", "total_params"} <= set(report)
    assert report["model"] == "vgg16"
    assert report["epoch"] == 0
    assert report["policy"] == {
        "type": "last_n",
        "n": 3,
        "unit": "layer",
        "lr_decay": 1.0,
        "head_lr_mult": 1.0,
        "bn": "frozen",
    }
    groups = report["groups"]
    for group in groups:
        assert {"name", "params", "trainable", "lr_mult", "bn"} <= set(group)
    assert [g["name"] for g in groups] == VGG16_LAYERS
    trainable = [g["name"] for g in groups if g["trainable"]]
    assert trainable == ["block5.conv1", "block5.conv2", "block5.conv3", "head"]
    assert [g["bn"] for g in groups] == ["eval"] * 10 + ["train"] * 4
    assert all(g["lr_mult"] == 1.0 for g in groups)

    by_name = {g["name"]: g for g in groups}
    assert [by_name[f"block5.conv{i}"]["params"] for i in (1, 2, 3)] == [CONV3x3_512] * 3
    head = (512 * 7 * 7 * 256 + 256) + (256 * 2 + 2)
    assert by_name["head"]["params"] == head
    assert report["trainable_params"] == sum(by_name[name]["params"] for name in trainable)
    assert report["trainable_params"] == 3 * CONV3x3_512 + head
    # VGG16's 13 convolutions hold 14,714,688 parameters (Keras's include_top=False count).
    assert report["total_params"] == 14_714_688 + head


def test_inspect_keras_recipe_table(capsys):
    code, out, err = run(
        capsys, "inspect", "--model", "vgg16", "--policy", str(KERAS_POLICY), "--head", KERAS_HEAD
    )
    assert code == 0, err
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.strip()}
    assert rows["block5.conv1"][2] == "yes"
    assert rows["block5.conv3"][1] == f"{CONV3x3_512:,}"
    assert rows["head"][2:] == ["yes", "1", "train"]
    for name in VGG16_LAYERS[:10]:
        assert rows[name][2:] == ["frozen", "1", "eval"], name
    assert out.splitlines()[0].startswith("model vgg16  policy last_n  epoch 0")
    trainable = 3 * CONV3x3_512 + (512 * 7 * 7 * 256 + 256) + (256 * 2 + 2)
    assert f"trainable parameters: {trainable:,} of " in out


def test_inspect_epoch_and_inline_policy(capsys):
    code, out, err = run(
        capsys,
        "inspect",
        "--model",
        "test_resnet",
        "--policy",
        '{"type": "gradual", "every": 2}',
        "--epoch",
        "4",
        "--num-classes",
        "3",
        "--format",
        "json",
    )
    assert code == 0, err
    report = json.loads(out)
    assert report["epoch"] == 4
    assert report["phase"] == "unfrozen_2"
    assert [g["name"] for g in report["groups"] if g["trainable"]] == ["layer3", "layer4", "head"]
    assert report["groups"][-1]["params"] == 96 * 3 + 3


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--policy", '{"type": "freeze_all"}'], "unknown policy type 'freeze_all'"),
        (["--policy", '{"type": "last_n", "n": 9}'], "n=9 is larger than the model's 5"),
        (["--policy", '{"type": "last_n"}'], "n: missing"),
        (["--policy", "no/such/policy.yaml"], "does not exist"),
        (
            ["--policy", '{"type": "patterns", "include": ["layer9.*"]}'],
            "include pattern 'layer9.*' (glob) matches no parameter",
        ),
        (["--policy", '{"type": "full"}', "--head", "{pool"], "--head: not valid YAML"),
        (["--policy", '{"type": "full"}', "--head", '{"pool": "mean"}'], "pool"),
    ],
    ids=["unknown-type", "n-too-large", "missing-field", "no-file", "no-match", "bad-json", "pool"],
)
def test_inspect_bad_input_exits_2(capsys, argv, message):
    code, out, err = run(capsys, "inspect", "--model", "test_resnet", *argv)
    assert code == 2
    assert out == ""
    assert err.startswith("freezelab inspect: error: ")
    assert message in err
    assert "Traceback" not in err


def test_inspect_unknown_model_exits_2(capsys):
    code, _, err = run(capsys, "inspect", "--model", "vgg17", "--policy", '{"type": "full"}')
    assert code == 2
    assert "unknown model 'vgg17'" in err


def test_missing_arguments_are_argparse_errors(capsys):
    with pytest.raises(SystemExit) as info:
        main(["inspect", "--model", "test_resnet"])
    assert info.value.code == 2
    assert "--policy" in capsys.readouterr().err


def test_python_dash_m_freezelab(tmp_path):
    policy = tmp_path / "policy.yaml"
    policy.write_text("type: head_only\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    ok = subprocess.run(
        [sys.executable, "-m", "freezelab", "inspect", "--model", "test_resnet",
         "--policy", str(policy), "--format", "json"],
        capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120,
    )  # fmt: skip
    assert ok.returncode == 0, ok.stderr
    report = json.loads(ok.stdout)  # stdout is clean JSON: logs go to stderr
    assert [g["name"] for g in report["groups"] if g["trainable"]] == ["head"]
    assert report["trainable_params"] == 96 * 2 + 2


def test_verbose_shows_the_libraries_info_logs_to_the_runs_it_starts(monkeypatch, capsys):
    from freezelab.env import LOG_LEVEL_ENV, log_level

    # setenv, not delenv: it records the variable's absence, which teardown restores
    # after main() has set it.
    monkeypatch.setenv(LOG_LEVEL_ENV, "")
    assert log_level() == "WARNING"  # Ray Train's line per report stays in its log files
    assert main(["-v", "policies"]) == 0
    assert log_level() == "INFO"  # what launch gives Ray Train and the workers
    monkeypatch.setenv(LOG_LEVEL_ENV, "not-a-level")
    assert log_level() == "WARNING"
