"""LogME on known cases: labels that a linear function of the features decides score
higher than random labels, the fixed point is the evidence's maximum, and a task whose
labels are a linear function of one stage's features scores highest at that stage."""

from __future__ import annotations

import math

import numpy as np
import pytest
import timm
import torch

from freezelab.advise.features import group_outputs
from freezelab.advise.logme import _max_evidence, logme
from freezelab.policies import layer_groups


def test_linear_labels_score_higher_than_random_labels():
    rng = np.random.default_rng(0)
    features = rng.normal(size=(300, 16))
    labels = np.argmax(features[:, :3], axis=1)
    found = logme(features, labels)
    shuffled = logme(features, rng.permutation(labels))
    assert found.score > shuffled.score + 0.1
    assert found.fit > 0.3 > 0.05 > shuffled.fit


def test_the_fixed_point_is_the_evidence_maximum():
    rng = np.random.default_rng(1)
    features = rng.normal(size=(40, 60))  # more dimensions than samples
    y = (rng.random(40) > 0.5).astype(float)
    n, dims = features.shape

    def evidence(alpha: float, beta: float) -> float:  # the paper's formula, directly
        a = alpha * np.eye(dims) + beta * features.T @ features
        m = beta * np.linalg.solve(a, features.T @ y)
        return (
            n / 2 * math.log(beta) + dims / 2 * math.log(alpha) - n / 2 * math.log(2 * math.pi)
            - beta / 2 * np.sum((features @ m - y) ** 2) - alpha / 2 * m @ m
            - np.linalg.slogdet(a)[1] / 2
        )  # fmt: skip

    u, s, _ = np.linalg.svd(features, full_matrices=False)
    found, _, _ = _max_evidence(u.T @ y, s, float(y @ y), n, dims)
    grid = np.logspace(-3, 3, 25)
    assert found >= max(evidence(a, b) for a in grid for b in grid)


def test_the_score_does_not_depend_on_the_features_scale():
    rng = np.random.default_rng(2)
    features = rng.normal(size=(100, 8))
    labels = (features[:, 0] > 0).astype(int)
    assert logme(features * 1000, labels).score == pytest.approx(logme(features, labels).score)


def test_a_class_missing_from_the_sample_is_left_out():
    features = np.random.default_rng(3).normal(size=(30, 4))
    labels = np.array([0, 2] * 15)  # no class 1
    assert math.isfinite(logme(features, labels).score)


@pytest.fixture(scope="module")
def stage_outputs() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    # Residual blocks that do not start as identities: every stage computes something new.
    model = timm.create_model("test_resnet", num_classes=3, zero_init_last=False).eval()
    return group_outputs(model, layer_groups(model), torch.randn(400, 3, 32, 32))


@pytest.mark.parametrize("stage", ["stem", "layer1", "layer2", "layer3", "layer4"])
def test_labels_linear_in_one_stage_score_highest_there(stage_outputs, stage):
    chosen = stage_outputs[stage].double().numpy()
    chosen = (chosen - chosen.mean(0)) / (chosen.std(0) + 1e-9)
    labels = np.argmax(chosen @ np.random.default_rng(1).normal(size=(chosen.shape[1], 4)), 1)
    scores = {name: logme(f.double().numpy(), labels).score for name, f in stage_outputs.items()}
    assert max(scores, key=scores.get) == stage, scores


def test_constant_features_score_without_failing():
    # A dead stage (every image the same vector, or zeros) explains nothing, and its
    # evidence is a number: the precisions it drives to 0 or infinity are clamped.
    labels = np.arange(30) % 3
    for features in (np.ones((30, 8)), np.zeros((30, 8))):
        found = logme(features, labels)
        assert found.fit == 0.0 and np.isfinite(found.score)
