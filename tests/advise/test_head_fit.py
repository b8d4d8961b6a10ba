"""The fitted head: once it fits labels that are linear in the features, the head's
share of full fine-tuning's gradient is a small fraction of a random head's; features
of any scale fit alike; only the head changes."""

from __future__ import annotations

import timm
import torch

from freezelab.advise.gradient_stats import gradient_statistics, head_to_backbone
from freezelab.advise.head_fit import fit_head, head_inputs
from freezelab.policies import from_dict
from freezelab.trainers.models import build_model


def _linear_task(model, plan, classes: int = 4):
    """Six batches of images and labels that a linear function of the classifier's
    input (as full fine-tuning sees it) decides."""
    generator = torch.Generator().manual_seed(1)
    images = [torch.rand(32, 3, 32, 32, generator=generator) for _ in range(6)]
    features = head_inputs(model, plan, images)
    standard = (features - features.mean(0)) / features.std(0)
    labels = (standard @ torch.randn(standard.shape[1], classes, generator=generator)).argmax(1)
    return images, features, labels


def test_after_fitting_the_head_no_longer_dominates_the_gradient():
    torch.manual_seed(0)
    model = timm.create_model("test_resnet", num_classes=4, zero_init_last=False)
    full = from_dict({"type": "full"}).plan(model, 0)
    images, features, labels = _linear_task(model, full)
    batches = list(zip(images, labels.split(32), strict=True))
    random = gradient_statistics(model, full, batches)
    fitted = fit_head(model, features, labels)
    after = gradient_statistics(model, full, batches)
    assert fitted.train_accuracy > 0.95 and fitted.loss < 0.2
    assert head_to_backbone(full.groups, after) < head_to_backbone(full.groups, random) / 10
    assert after["head"].rel_grad_norm < random["head"].rel_grad_norm / 10


def test_features_of_any_scale_fit_alike_and_only_the_head_changes():
    torch.manual_seed(0)
    model = timm.create_model("test_resnet", num_classes=4, zero_init_last=False)
    full = from_dict({"type": "full"}).plan(model, 0)
    _, features, labels = _linear_task(model, full)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    small = fit_head(model, features, labels)
    large = fit_head(model, features * 1000 + 500, labels)
    assert large.train_accuracy == small.train_accuracy > 0.95
    changed = {k for k, v in model.state_dict().items() if not torch.equal(before[k], v)}
    assert changed == {"fc.weight", "fc.bias"}
    # The folded standardization: the head applied to the raw large features.
    logits = model.get_classifier()(features * 1000 + 500)
    assert (logits.argmax(1) == labels).float().mean() == large.train_accuracy


def test_a_head_norm_gets_the_features_statistics_and_the_linear_behind_it_fits():
    torch.manual_seed(0)
    model = build_model("test_resnet", 4, head_norm="batchnorm")
    full = from_dict({"type": "full"}).plan(model, 0)
    _, features, labels = _linear_task(model, full)
    fitted = fit_head(model, features * 50 - 7, labels)
    norm = model.get_classifier()[0]
    assert torch.allclose(norm.running_mean, (features * 50 - 7).mean(0), rtol=1e-4, atol=1e-3)
    assert fitted.train_accuracy > 0.95 and norm.momentum == 0.1 and model.training
