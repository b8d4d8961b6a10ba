"""model.head_init: a new task gets a new head, the same task keeps its head.

Weights files are written as a run writes them (``save_checkpoint`` with the labels in
the safetensors metadata); the model is built as every rank builds it
(``build_for_config``), and the decision the driver records (``head_init_decision``)
is checked against what the builder did."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from freezelab.errors import ConfigError
from freezelab.trainers import checkpoint as ckpt
from freezelab.trainers.head_init import (
    LABELS_KEY,
    HeadInit,
    decide,
    labels_from,
    labels_metadata,
    pretrained_decision,
)
from freezelab.trainers.launch import run_training
from freezelab.trainers.models import build_for_config, head_init_decision
from freezelab.trainers.preflight import check_run

HEAD = ("fc.weight", "fc.bias")


def _digits(classes):
    return {
        "kind": "digits",
        "classes": list(classes),
        "input_size": 32,
        "train_per_class": 24,
        "val_fraction": 0.25,
    }


@pytest.fixture
def source_weights(tiny_config, tmp_path):
    """The weights of a model of digits 0-2, with a head unlike any fresh one, saved as
    a run saves them: ``write(labels)`` (None: no record) gives the file and its tensors."""

    def write(labels=("0", "1", "2"), name="source"):
        model = build_for_config(tiny_config(seed=1), with_weights=False)
        with torch.no_grad():
            for tensor in model.state_dict().values():
                if tensor.is_floating_point():
                    tensor.add_(0.5)
        directory = tmp_path / name
        if labels is None:  # a file from elsewhere: tensors only
            directory.mkdir()
            tensors = {k: v.contiguous() for k, v in model.state_dict().items()}
            save_file(tensors, str(directory / ckpt.MODEL_FILE))
        else:
            ckpt.save_checkpoint(directory, model, {}, {}, labels_metadata(labels))
        path = directory / ckpt.MODEL_FILE
        return str(path), load_file(str(path))

    return write


def _target(tiny_config, weights, classes, head_init="auto"):
    return tiny_config(
        data=_digits(classes),
        model={"name": "test_resnet", "weights": weights, "head_init": head_init},
    )


def _assert_started_from(config, source):
    """The backbone is the file's; returns whether the head is the file's too (else it
    must be exactly the fresh, seeded one that a model without weights gets)."""
    model = build_for_config(config).state_dict()
    fresh = build_for_config(config, with_weights=False).state_dict()
    for key, value in model.items():
        if key not in HEAD:
            assert torch.equal(value, source[key]), key
    kept = all(torch.equal(model[key], source[key]) for key in HEAD)
    if not kept:
        for key in HEAD:
            assert torch.equal(model[key], fresh[key]), key
            assert not torch.equal(model[key], source[key]), key
    return kept


def test_a_new_task_with_as_many_classes_gets_a_fresh_head(tiny_config, source_weights):
    path, source = source_weights()
    config = _target(tiny_config, path, [5, 6, 7])
    assert not _assert_started_from(config, source)
    assert head_init_decision(config) == HeadInit("reset", "labels differ: [5, 6, 7] vs [0, 1, 2]")


def test_the_same_labels_keep_the_head(tiny_config, source_weights):
    path, source = source_weights()
    config = _target(tiny_config, path, [0, 1, 2])
    assert _assert_started_from(config, source)
    assert head_init_decision(config) == HeadInit("kept", "same labels [0, 1, 2]")


def test_the_same_digits_in_another_order_are_other_labels(tiny_config, source_weights):
    path, source = source_weights()
    assert not _assert_started_from(_target(tiny_config, path, [2, 1, 0]), source)


def test_keep_keeps_the_head_of_other_labels(tiny_config, source_weights):
    path, source = source_weights()
    config = _target(tiny_config, path, [5, 6, 7], head_init="keep")
    assert _assert_started_from(config, source)
    assert head_init_decision(config).action == "kept"


def test_reset_resets_the_head_of_the_same_labels(tiny_config, source_weights):
    path, source = source_weights()
    config = _target(tiny_config, path, [0, 1, 2], head_init="reset")
    assert not _assert_started_from(config, source)
    assert head_init_decision(config) == HeadInit("reset", "head_init reset")


def test_weights_without_a_record_of_their_labels_get_a_fresh_head(tiny_config, source_weights):
    path, source = source_weights(labels=None)
    config = _target(tiny_config, path, [0, 1, 2])
    assert not _assert_started_from(config, source)
    decision = head_init_decision(config)
    assert decision.action == "reset" and "labels unknown" in decision.reason
    # keep still keeps it: the user vouches for the labels.
    assert _assert_started_from(_target(tiny_config, path, [0, 1, 2], "keep"), source)


def test_another_class_count_drops_the_head_under_auto(tiny_config, source_weights):
    path, source = source_weights()
    config = _target(tiny_config, path, [0, 1, 2, 3])
    model = build_for_config(config).state_dict()
    assert model["fc.weight"].shape[0] == 4
    for key, value in model.items():
        if key not in HEAD:
            assert torch.equal(value, source[key]), key
    # Other labels are the first reason (another task), before the classifier's shape.
    decision = head_init_decision(config)
    assert decision.action == "reset" and decision.reason.startswith("labels differ: [0, 1, 2, 3]")


def test_keep_with_another_class_count_is_refused_before_anything_runs(tiny_config, source_weights):
    path, _ = source_weights()
    config = _target(tiny_config, path, [0, 1, 2, 3], head_init="keep")
    expected = r"^model\.head_init keep: the classifier of weights file .* cannot be kept: fc\."
    with pytest.raises(ConfigError, match=expected) as info:
        check_run(config)
    assert "\n" not in str(info.value)
    with pytest.raises(ConfigError, match=expected):
        build_for_config(config)


def test_keep_without_weights_is_refused(tiny_config):
    config = tiny_config(model={"name": "test_resnet", "head_init": "keep"})
    with pytest.raises(ConfigError, match="no classifier to keep"):
        check_run(config)
    # Built without weights (the driver's shapes), it is no error.
    build_for_config(config, with_weights=False)


def test_a_run_records_its_labels_and_a_new_task_starts_from_a_fresh_head(tiny_config):
    source = run_training(tiny_config(name="source", epochs=1))
    metadata = ckpt.safetensors_metadata(source.weights_file)
    assert labels_from(metadata) == ["0", "1", "2"]

    target = _target(tiny_config, source.weights_file, [7, 8, 9])
    assert target.model.head_init == "auto"  # the default
    assert not _assert_started_from(target, load_file(source.weights_file))
    outcome = run_training(target.model_copy(update={"name": "target", "epochs": 1}))
    assert labels_from(ckpt.safetensors_metadata(outcome.weights_file)) == ["7", "8", "9"]


def test_decide_is_the_whole_rule():
    same, other = ["a", "b"], ["c", "d"]
    assert decide("auto", recorded=same, target=same, fits=True).kept
    assert not decide("auto", recorded=same, target=other, fits=True).kept
    assert not decide("auto", recorded=None, target=same, fits=True).kept
    assert not decide("auto", recorded=same, target=None, fits=True).kept
    assert not decide("auto", recorded=same, target=same, fits=False).kept
    assert decide("keep", recorded=None, target=other, fits=True).kept
    assert not decide("reset", recorded=same, target=same, fits=True).kept
    assert not decide("reset", recorded=same, target=same, fits=False).kept
    with pytest.raises(ConfigError, match="cannot be kept: no"):
        decide("keep", recorded=same, target=same, fits=False, why_not="no")


@pytest.mark.parametrize(
    "record",
    [None, {}, {LABELS_KEY: "not json"}, {LABELS_KEY: "[1, 2]"}, {LABELS_KEY: '{"a": 1}'}],
)
def test_a_missing_or_foreign_record_is_no_record(record):
    assert labels_from(record) is None


def test_timm_pretrained_weights_record_no_labels(tiny_config):
    # No download: the pretrained classifier's class count is in timm's registry.
    assert pretrained_decision("test_resnet", 1000, None, "keep").kept
    decision = pretrained_decision("test_resnet", 1000, None, "auto")
    assert decision.action == "reset" and "labels unknown" in decision.reason
    with pytest.raises(ConfigError, match="has 1000 classes, the model 3"):
        pretrained_decision("test_resnet", 3, None, "keep")
    with pytest.raises(ConfigError, match="custom head"):
        pretrained_decision("test_resnet", 1000, {"pool": "avg"}, "keep")
    config = tiny_config(model={"name": "test_resnet", "pretrained": True, "head_init": "keep"})
    with pytest.raises(ConfigError, match="timm's pretrained test_resnet cannot be kept"):
        check_run(config)
