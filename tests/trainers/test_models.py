"""build_model: timm backbones with a fresh classifier or a custom head; local weights."""

from __future__ import annotations

import logging

import pytest
import timm
import torch
import torch.nn as nn
from safetensors.torch import save_file

from freezelab.trainers.models import FineTuneModel, build_model, load_weights, read_state_dict

# Known shapes of timm's tiny test models at their 160x160 input:
# test_resnet ends in 96 channels at stride 32 (5x5); test_vit has 64-dim tokens,
# 10x10 patches plus the class token.
RESNET_FEATURES = {"default": 96, "avg": 96, "max": 96, "flatten": 96 * 5 * 5}
VIT_FEATURES = {"default": 64, "avg": 64, "max": 64, "flatten": 64 * 101}


def fixed_input(channels: int = 3, size: int = 160, batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, channels, size, size, generator=torch.Generator().manual_seed(1))


def outputs(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(x)


def linear_widths(head: nn.Sequential) -> list[tuple[int, int]]:
    return [(m.in_features, m.out_features) for m in head if isinstance(m, nn.Linear)]


# -- plain timm models --------------------------------------------------------------


@pytest.mark.parametrize("name", ["test_resnet", "test_vit", "test_convnext", "test_efficientnet"])
def test_timm_model_gets_a_classifier_of_num_classes(name):
    model = build_model(name, num_classes=5)
    assert not isinstance(model, FineTuneModel)
    classifier = model.get_classifier()
    assert isinstance(classifier, nn.Linear)
    assert classifier.out_features == 5
    assert outputs(model, fixed_input(size=160 if name == "test_vit" else 64)).shape == (2, 5)


def test_two_builds_are_independent():
    a = build_model("test_resnet", 2)
    b = build_model("test_resnet", 2)
    with torch.no_grad():
        a.fc.weight.zero_()
    assert not torch.equal(a.fc.weight, b.fc.weight)


def test_in_chans():
    model = build_model("test_resnet", 2, in_chans=1)
    assert outputs(model, fixed_input(channels=1, size=64)).shape == (2, 2)
    custom = build_model("test_resnet", 2, in_chans=1, head={"pool": "flatten"})
    assert outputs(custom, fixed_input(channels=1)).shape == (2, 2)


def test_unknown_model_name():
    with pytest.raises(ValueError, match="unknown model 'resnet_9000': not a timm model name"):
        build_model("resnet_9000", 2)
    with pytest.raises(ValueError, match="similar names: .*test_resnet"):
        build_model("test_resne", 2)


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="num_classes must be >= 1, got 0"):
        build_model("test_resnet", 0)
    with pytest.raises(ValueError, match="either pretrained or weights"):
        build_model("test_resnet", 2, pretrained=True, weights=tmp_path / "w.safetensors")
    with pytest.raises(ValueError, match="pool"):
        build_model("test_resnet", 2, head={"pool": "mean"})
    with pytest.raises(ValueError, match="dropout"):
        build_model("test_resnet", 2, head={"dropout": 1.0})


# -- custom heads ---------------------------------------------------------------------


@pytest.mark.parametrize("pool", ["flatten", "avg", "max", "default"])
@pytest.mark.parametrize(
    ("hidden", "dropout"), [((), 0.0), ((16,), 0.0), ((16, 8), 0.3)], ids=["linear", "mlp", "drop"]
)
@pytest.mark.parametrize(
    ("name", "features"), [("test_resnet", RESNET_FEATURES), ("test_vit", VIT_FEATURES)]
)
def test_custom_head(name, features, pool, hidden, dropout):
    model = build_model(name, 3, head={"pool": pool, "hidden": list(hidden), "dropout": dropout})
    assert isinstance(model, FineTuneModel)
    assert model.get_classifier() is model.head
    widths = [features[pool], *hidden, 3]
    assert linear_widths(model.head) == list(zip(widths[:-1], widths[1:], strict=True))
    assert sum(isinstance(m, nn.ReLU) for m in model.head) == len(hidden)
    dropouts = [m.p for m in model.head if isinstance(m, nn.Dropout)]
    assert dropouts == ([dropout] * len(hidden) if dropout else [])
    # The backbone keeps no classifier of its own.
    assert not any(
        n.startswith("backbone.fc.") or n.startswith("backbone.head.")
        for n in dict(model.named_parameters())
    )

    small = 64 if (name == "test_resnet" and pool != "flatten") else 160
    x = fixed_input(size=small)
    assert outputs(model, x).shape == (2, 3)
    assert model.features(x).shape == (2, features[pool])

    # Every parameter gets a gradient (DDP refuses parameters that never do).
    model.train()
    model.zero_grad()
    model(x).sum().backward()
    assert [n for n, p in model.named_parameters() if p.grad is None] == []


def test_keras_head_on_vgg16():
    model = build_model("vgg16", 2, head={"pool": "flatten", "hidden": [256]})
    assert linear_widths(model.head) == [(512 * 7 * 7, 256), (256, 2)]
    # VGG's own fc6/fc7 (pre_logits) and classifier are gone: Flatten reads block5's pool.
    names = [n for n, _ in model.named_parameters()]
    assert not any("pre_logits" in n or n.startswith("backbone.head") for n in names)
    assert names[-4:] == ["head.0.weight", "head.0.bias", "head.2.weight", "head.2.bias"]


def test_a_flatten_head_is_as_wide_as_the_images_the_config_gives(tiny_config):
    # The Keras head on VGG16 at the data's 32 px: 512 x 1 x 1 features, not 224 px's 7 x 7.
    from freezelab.trainers.models import build_for_config

    config = tiny_config(model={"name": "vgg16", "head": {"pool": "flatten", "hidden": [8]}})
    model = build_for_config(config)
    assert model.head[0].in_features == 512
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 3)
    assert build_model("vgg16", 2, head={"pool": "flatten"}).head[0].in_features == 512 * 7 * 7


def test_head_config_object_or_dict():
    from freezelab.trainers.config import HeadConfig

    torch.manual_seed(0)
    a = build_model("test_resnet", 2, head=HeadConfig(pool="max", hidden=(4,)))
    torch.manual_seed(0)
    b = build_model("test_resnet", 2, head={"pool": "max", "hidden": [4]})
    x = fixed_input(size=64)
    assert torch.equal(outputs(a, x), outputs(b, x))


# -- local weights --------------------------------------------------------------------


def save_safetensors(model: nn.Module, path) -> None:
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))


@pytest.mark.parametrize("fmt", ["safetensors", "pt", "pt_wrapped", "pt_ddp"])
@pytest.mark.parametrize(
    ("name", "head"),
    [("test_resnet", None), ("test_vit", None), ("test_resnet", {"pool": "avg", "hidden": [8]})],
)
def test_weights_round_trip(tmp_path, fmt, name, head):
    source = build_model(name, 4, head=head)
    with torch.no_grad():  # make BatchNorm statistics non-default, so buffers count too
        for buffer_name, buffer in source.named_buffers():
            if buffer_name.endswith("running_mean"):
                buffer.uniform_(-1, 1)
    state = source.state_dict()
    if fmt == "safetensors":
        path = tmp_path / "w.safetensors"
        save_safetensors(source, path)
    else:
        path = tmp_path / "w.pt"
        wrapped = {
            "pt": state,
            "pt_wrapped": {"state_dict": state, "epoch": 3},
            "pt_ddp": {"module." + k: v for k, v in state.items()},
        }[fmt]
        torch.save(wrapped, path)

    loaded = build_model(name, 4, head=head, weights=path, head_init="keep")
    fresh = build_model(name, 4, head=head)
    x = fixed_input(size=160 if name == "test_vit" else 64)
    assert torch.equal(outputs(loaded, x), outputs(source, x))
    assert not torch.equal(outputs(fresh, x), outputs(source, x))
    for key, value in loaded.state_dict().items():
        assert torch.equal(value, state[key]), key


def test_other_class_count_drops_the_classifier(tmp_path, caplog):
    source = build_model("test_resnet", 5)
    path = tmp_path / "w.safetensors"
    save_safetensors(source, path)

    torch.manual_seed(7)
    fresh = build_model("test_resnet", 3)
    torch.manual_seed(7)
    # freezelab's lines go to its own console handler, not on to the root logger's
    # (logs.py): the capture listens on the freezelab logger itself.
    logging.getLogger("freezelab").addHandler(caplog.handler)
    try:
        with caplog.at_level(logging.INFO, logger="freezelab.trainers.models"):
            loaded = build_model("test_resnet", 3, weights=path)
    finally:
        logging.getLogger("freezelab").removeHandler(caplog.handler)
    dropped = [r.getMessage() for r in caplog.records if "dropped classifier" in r.getMessage()]
    assert len(dropped) == 1
    assert sorted(dropped[0].split(": ")[1].split(", ")) == ["fc.bias", "fc.weight"]

    source_state, loaded_state = source.state_dict(), loaded.state_dict()
    backbone = [k for k in loaded_state if not k.startswith("fc.")]
    assert len(backbone) == len(loaded_state) - 2
    for key in backbone:
        assert torch.equal(loaded_state[key], source_state[key]), key
    # The classifier is the fresh one, untouched by the file.
    assert loaded.fc.out_features == 3
    assert torch.equal(loaded.fc.weight, fresh.fc.weight)
    assert torch.equal(loaded.fc.bias, fresh.fc.bias)


def test_plain_timm_weights_load_into_a_custom_head_backbone(tmp_path):
    plain = timm.create_model("test_resnet", num_classes=1000)
    path = tmp_path / "plain.pt"
    torch.save(plain.state_dict(), path)

    model = build_model("test_resnet", 2, head={"pool": "flatten", "hidden": [16]}, weights=path)
    plain_state = plain.state_dict()
    backbone_state = model.backbone.state_dict()
    assert set(backbone_state) == set(plain_state) - {"fc.weight", "fc.bias"}
    for key, value in backbone_state.items():
        assert torch.equal(value, plain_state[key]), key
    x = fixed_input()
    plain.eval()
    model.eval()
    with torch.no_grad():
        assert torch.equal(model.backbone.forward_features(x), plain.forward_features(x))


def test_weights_of_another_architecture_name_the_missing_tensors(tmp_path):
    path = tmp_path / "vit.safetensors"
    save_safetensors(build_model("test_vit", 2), path)
    with pytest.raises(ValueError, match="another architecture") as info:
        build_model("test_resnet", 2, weights=path)
    message = str(info.value)
    assert "vit.safetensors" in message
    assert "conv1.0.weight" in message
    resnet_state = build_model("test_resnet", 2).state_dict()
    resnet_backbone = [k for k in resnet_state if not k.startswith("fc.")]
    assert f"lacks {len(resnet_backbone)} backbone tensors" in message


def test_backbone_tensor_of_another_shape_is_named(tmp_path):
    path = tmp_path / "gray.pt"
    torch.save(build_model("test_resnet", 2, in_chans=1).state_dict(), path)
    expected = r"conv1\.0\.weight has shape \(16, 1, 3, 3\), the model expects \(16, 3, 3, 3\)"
    with pytest.raises(ValueError, match=expected):
        build_model("test_resnet", 2, weights=path)


MARKER: list[str] = []


def _record_unpickling() -> dict:
    MARKER.append("code ran")
    return {}


class Payload:
    """Unpickling this runs ``_record_unpickling``: what a malicious file would do."""

    def __reduce__(self):
        return (_record_unpickling, ())


def test_pickled_objects_are_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"conv1.0.weight": torch.zeros(1), "extra": Payload()}, path)
    with pytest.raises(ValueError, match="loads safely"):
        build_model("test_resnet", 2, weights=path)
    assert MARKER == []


def test_non_tensor_values_are_refused(tmp_path):
    path = tmp_path / "numbers.pt"
    torch.save({"conv1.0.weight": 1.0}, path)
    with pytest.raises(ValueError, match="does not hold a state dict of tensors"):
        read_state_dict(path)


def test_missing_weights_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        build_model("test_resnet", 2, weights=tmp_path / "nope.safetensors")
    with pytest.raises(FileNotFoundError):
        load_weights(build_model("test_resnet", 2), tmp_path / "nope.pt")


def test_pretrained_without_internet_points_at_model_weights(monkeypatch):
    huggingface_hub = pytest.importorskip("huggingface_hub")
    # The Hub reads HF_HUB_OFFLINE at import time: set both, so it fails at once.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    try:
        build_model("test_resnet", 2, pretrained=True)
    except RuntimeError as err:
        message = str(err)
    else:
        pytest.skip("the pretrained weights are in the local Hugging Face cache")
    assert "could not download the pretrained weights of 'test_resnet'" in message
    assert "model.weights" in message
