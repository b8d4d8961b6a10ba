"""How a model sees an image: its input spec (channels, size, mean and std, interpolation,
crop) from timm's pretrained config, and the transforms made from it.

Every dataset source uses these, and so do Ray Data's decode tasks: both loaders give
the same tensors.

>>> import timm
>>> model = timm.create_model("test_resnet")
>>> spec = input_spec(DataConfig(kind="digits", input_size=48), model)
>>> spec.channels, spec.size
(3, (48, 48))
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from freezelab.trainers.config import DataConfig

# timm's default minimum crop (8% of the area) can cut an 8x8 digit out of its own image.
_TENSOR_CROP_SCALE = (0.35, 1.0)


@dataclass(frozen=True)
class InputSpec:
    """What ``model`` takes: its images' channels and size, the mean and std they are
    normalized with, and how timm resizes and crops them. Hashable: transforms are
    cached by it."""

    channels: int
    size: tuple[int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str
    crop_pct: float
    crop_mode: str


def input_spec(config: DataConfig, model: torch.nn.Module) -> InputSpec:
    """The input spec of ``model`` from timm's pretrained config; ``input_size`` wins
    over its own size."""
    import timm.data

    # A wrapper (freezelab's FineTuneModel) keeps timm's pretrained_cfg on its backbone.
    source = model if hasattr(model, "pretrained_cfg") else getattr(model, "backbone", model)
    cfg = timm.data.resolve_data_config({}, model=source)
    first_conv = next((m for m in model.modules() if isinstance(m, torch.nn.Conv2d)), None)
    # pretrained_cfg says 3 channels even for a model built with in_chans=1.
    channels = first_conv.in_channels if first_conv is not None else cfg["input_size"][0]
    side = config.input_size
    return InputSpec(
        channels=channels,
        size=(side, side) if side else tuple(cfg["input_size"][1:]),
        mean=_per_channel(cfg["mean"], channels),
        std=_per_channel(cfg["std"], channels),
        interpolation=cfg["interpolation"],
        crop_pct=cfg.get("crop_pct", 0.875),
        crop_mode=cfg.get("crop_mode", "center"),
    )


def _per_channel(values: Sequence[float], channels: int) -> tuple[float, ...]:
    values = tuple(float(v) for v in values)
    return values if len(values) == channels else (sum(values) / len(values),) * channels


def resize(images: torch.Tensor, size: tuple[int, int], interpolation: str) -> torch.Tensor:
    mode = interpolation if interpolation in ("bilinear", "bicubic", "nearest") else "bilinear"
    if mode == "nearest":
        return F.interpolate(images, size=size, mode=mode)
    return F.interpolate(images, size=size, mode=mode, align_corners=False, antialias=True)


def tensor_augment(size: tuple[int, int]) -> Callable[[torch.Tensor], torch.Tensor]:
    from torchvision.transforms import v2

    crop = v2.RandomResizedCrop(size, scale=_TENSOR_CROP_SCALE, antialias=True)
    return v2.Compose([crop, v2.RandomHorizontalFlip()])


@functools.lru_cache(maxsize=8)
def folder_transform(spec: InputSpec, is_training: bool) -> Callable:
    """timm's transform of an image file for ``spec``: the one both loaders apply (the
    DataLoader's ``ImageFolder`` and Ray Data's decode tasks), so they give the same
    tensors. ``augment`` means crop and flip, nothing else."""
    import timm.data

    return timm.data.create_transform(
        input_size=(spec.channels, *spec.size),
        is_training=is_training,
        interpolation=spec.interpolation,
        mean=spec.mean,
        std=spec.std,
        crop_pct=spec.crop_pct,
        crop_mode=spec.crop_mode,
        color_jitter=None,
    )
