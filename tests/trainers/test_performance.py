"""The performance switches (bf16 autocast, channels_last, torch.compile) run on the CPU
here, so the GPU path differs from what CI runs only by the device."""

import pytest
import torch
from safetensors.torch import load_file

from freezelab.trainers.launch import run_training

# Two phases: the backbone is frozen in epoch 0 and trained in epoch 1.
TWO_PHASES = {"type": "lp_ft", "probe_epochs": 1}


def _run(tiny_config, name, **performance):
    config = tiny_config(name=name, policy=TWO_PHASES, performance=performance)
    return run_training(config)


def test_bf16_autocast_and_channels_last_train_on_the_cpu(tiny_config):
    # No feature cache: the backbone runs, under autocast and in channels_last, every step.
    eager = _run(tiny_config, "eager", feature_cache=False)
    last = _run(tiny_config, "channels-last", feature_cache=False, channels_last=True)
    bf16 = _run(tiny_config, "bf16", feature_cache=False, amp="bf16", channels_last=True)
    # channels_last changes the memory layout, not the numbers (to rounding)
    assert last.metrics["train_loss"] == pytest.approx(eager.metrics["train_loss"], rel=1e-4)
    # bf16 autocast really computes in bf16: the loss moves, the task is still learnt
    assert bf16.metrics["train_loss"] != eager.metrics["train_loss"]
    assert bf16.metrics["train_loss"] == pytest.approx(eager.metrics["train_loss"], rel=0.1)
    assert abs(bf16.metrics["val_acc"] - eager.metrics["val_acc"]) <= 0.15
    # the weights handed over stay float32
    assert {t.dtype for t in load_file(bf16.weights_file).values() if t.is_floating_point()} == {
        torch.float32
    }


def test_compile_trains_each_phase_compiled_and_as_eager_does(tiny_config):
    from torch._dynamo.utils import counters

    eager = _run(tiny_config, "eager")
    counters.clear()
    # The probe phase trains the head on cached features (its graph compiles in seconds),
    # then the whole model trains: a recompile at the change of phase.
    compiled = _run(tiny_config, "compiled", compile=True)
    assert counters["stats"]["unique_graphs"] >= 2
    assert compiled.metrics["train_loss"] == pytest.approx(eager.metrics["train_loss"], rel=1e-3)
    assert compiled.metrics["val_acc"] == pytest.approx(eager.metrics["val_acc"], abs=0.05)
    assert [h["phase"] for h in compiled.history] == [h["phase"] for h in eager.history]
