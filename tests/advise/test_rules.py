"""The ranking rules on signals made to order: each rule of the README moves the
ranking the way it says."""

from __future__ import annotations

import functools

import timm
import torch

from freezelab.advise.candidates import default_candidates
from freezelab.advise.costs import policy_profile, step_flops
from freezelab.advise.rules import GroupSignal, Signals, head_pressure, need, rank
from freezelab.policies import from_dict

NAMES = ["stem", "layer1", "layer2", "layer3", "layer4"]


def _signals(logme, fit, rel=None, snr=1.0, head_ratio=1.0) -> Signals:
    rel = rel or [1.0] * len(NAMES)
    groups = [
        GroupSignal(name, 100, False, score, fit_i, 0.1, r, snr)
        for name, score, fit_i, r in zip(NAMES, logme, fit, rel, strict=True)
    ]
    groups.append(GroupSignal("head", 10, True, None, None, 1.0, 1.0, snr))
    return Signals(tuple(groups), head_ratio, 100, 4)


@functools.cache
def _profiles(epochs: int = 8):
    with torch.device("meta"):  # shapes only: FLOPs without compute
        model = timm.create_model("test_resnet", num_classes=3)
    shape = (8, 3, 32, 32)
    profiles = [
        (p, policy_profile(model, p, epochs, shape)) for p in default_candidates(model, epochs)
    ]
    return profiles, step_flops(model, from_dict({"type": "full"}).plan(model, 0), shape)


def _ranked(signals: Signals) -> list[str]:
    profiles, full = _profiles()
    return [r.policy.label() for r in rank(signals, profiles, full)]


def test_features_that_explain_the_labels_recommend_the_head_alone():
    ranked = _ranked(_signals([-0.5, -0.4, -0.3, -0.2, -0.1], [0.5, 0.6, 0.7, 0.8, 0.95]))
    assert ranked[0] == "head_only" and ranked[-1] == "full"


def test_features_that_explain_little_recommend_training_everything():
    ranked = _ranked(_signals([-0.9, -0.9, -0.8, -0.8, -0.7], [0.05, 0.06, 0.08, 0.1, 0.1]))
    assert ranked[0] == "full" and ranked.index("head_only") > 5


def test_a_logme_peak_before_the_top_recommends_training_what_follows_it():
    # layer3's output fits the labels best: layer4 has specialized away from the target.
    signals = _signals([-0.5, -0.4, -0.3, -0.1, -0.4], [0.3, 0.35, 0.4, 0.6, 0.4])
    assert need(signals)["layer4"] > 0.5
    assert _ranked(signals)[0] == "last_n(n=1)"


def test_gradients_that_point_at_the_first_group_recommend_training_it():
    signals = _signals([-0.9] * 5, [0.3] * 5, rel=[20.0, 0.1, 0.1, 0.1, 0.1])
    assert need(signals)["stem"] > 0.9
    ranked = _ranked(signals)
    assert ranked.index("surgical(first=0)") < ranked.index("last_n(n=1)")


def test_a_dominant_head_gradient_prefers_probing_first():
    flat = ([-0.9] * 5, [0.1] * 5)
    calm = _ranked(_signals(*flat, head_ratio=1.0))
    loud = _ranked(_signals(*flat, head_ratio=500.0))
    assert calm.index("full") < calm.index("lp_ft(probe_epochs=2)")
    assert loud.index("lp_ft(probe_epochs=2)") < loud.index("full")
    assert head_pressure(5.0) == 0.0 and head_pressure(1000.0) == 1.0
