"""``measure_signals`` on a tiny digits config: every group's signals, JSON-ready, and
a text that lists every group and says what each signal means; bad input in one line.
The examples in the new modules' docstrings run here too."""

from __future__ import annotations

import doctest
import importlib
import json
import math

import pytest

from freezelab.advise.measure import AdviseError, measure_signals
from freezelab.advise.signals import MEANINGS, GroupSignal, Signals


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    from freezelab.trainers.config import validate_config
    from tests.conftest import TINY, merge

    folder = tmp_path_factory.mktemp("signals")
    config = validate_config(merge(TINY, {"storage_path": str(folder / "runs")}))
    return measure_signals(config, samples=60, batches=3)


def test_every_group_has_its_signals_and_the_object_is_json(measured):
    found = json.loads(json.dumps(measured.to_dict(), allow_nan=False))
    groups = {g["name"]: g for g in found["groups"]}
    assert list(groups) == ["stem", "layer1", "layer2", "layer3", "layer4", "head"]
    for name in ("stem", "layer1", "layer4"):
        g = groups[name]
        assert isinstance(g["logme"], float) and 0 <= g["logme_fit"] <= 1
        assert g["rel_grad_norm"] > 0 and g["grad_snr"] >= 0
        # test_resnet has BatchNorm in every stage; random weights' statistics are not
        # the digits'.
        assert g["bn_shift"] > 0 and g["bn_log_var_ratio"] > 0
    head = groups["head"]
    assert head["is_head"] and head["logme"] is None and head["bn_shift"] is None
    assert head["rel_grad_norm"] > 0
    assert found["samples"] == 60 and found["gradient_batches"] == 3
    # A linear head fits 60 images of 3 digit classes on 96 features.
    assert found["head_train_accuracy"] > 0.9
    assert 0 < found["head_to_backbone"] and math.isfinite(found["head_to_backbone"])


def test_the_text_lists_every_group_and_what_each_signal_means(measured):
    text = measured.format_text()
    rows = {line.split()[0] for line in text.splitlines() if line.strip()}
    assert {g.name for g in measured.groups} <= rows
    assert all(line in text for line in MEANINGS)
    assert f"{measured.head_train_accuracy:.1%}" in text


def test_a_group_without_batchnorm_shows_a_dash():
    signals = Signals((GroupSignal("blocks", 5, False, -0.4, 0.2, 1.0, 0.1, 2.0),), 1.5, 8, 2)
    row = next(line for line in signals.format_text().splitlines() if line.startswith("blocks"))
    assert row.split()[-2:] == ["-", "-"]


def test_fewer_than_two_gradient_batches_is_one_line(tiny_config):
    with pytest.raises(AdviseError, match="batches 1: gradient statistics need at least 2"):
        measure_signals(tiny_config(), samples=60, batches=1)


def test_too_few_samples_is_one_line(tiny_config):
    with pytest.raises(AdviseError, match="--samples 3: needs one image per class"):
        measure_signals(tiny_config(), samples=3)


@pytest.mark.parametrize(
    "name",
    ["freezelab.advise.signals", "freezelab.advise.bn_shift", "freezelab.advise.head_fit"],
)
def test_docstring_examples(name):
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
