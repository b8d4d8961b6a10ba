"""Input-level shifts: named, seeded, deterministic changes of a dataset's images.

A shift is written ``kind`` or ``kind:VALUE``, the same in a config and in the
metric it names (``shifted/val_acc/rotate:30``, ``shifted_metric``):

- ``rotate:DEG``: rotated by DEG degrees about the centre (bilinear, black corners);
- ``gaussian_noise:SIGMA``: plus Gaussian noise of standard deviation SIGMA, drawn
  from (seed, shift, item), so an item gets the same noise every time;
- ``blur:SIGMA``: a Gaussian blur of standard deviation SIGMA pixels;
- ``contrast:FACTOR``: the distance of each pixel from the image's mean times FACTOR;
- ``invert``: black for white.

They act on pixel values in [0, 1] (the image before the model's normalization, to
which it is returned), and the result is clipped to [0, 1] again; on synthetic data,
which has no pixel range, they act on the values as they are.

>>> shift = parse_shift("invert")
>>> pixels = torch.rand(1, 4, 4)
>>> bool(torch.allclose(shift(shift(pixels, seed=0), seed=0), pixels))
True
>>> parse_shift("rotate:30").name, parse_shift("blur:1.50").name
('rotate:30', 'blur:1.5')
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset

# The accuracies under a shift or on an extra evaluation set: a prefix of their own, so
# that MLflow's charts of val_acc and test_acc hold those metrics alone.
SHIFTED_PREFIX = "shifted/"


def shifted_metric(split: str, name: str) -> str:
    """The metric of a split's accuracy under a shift (or on an extra set) ``name``.

    >>> shifted_metric("val", "rotate:30"), shifted_metric("test", "invert")
    ('shifted/val_acc/rotate:30', 'shifted/test_acc/invert')
    """
    return f"{SHIFTED_PREFIX}{split}_acc/{name}"


# kind -> the meaning of its value (None: the kind takes no value)
SHIFT_KINDS: dict[str, str | None] = {
    "rotate": "degrees",
    "gaussian_noise": "standard deviation in pixel units",
    "blur": "standard deviation in pixels",
    "contrast": "factor (1 = unchanged)",
    "invert": None,
}


@dataclass(frozen=True)
class Shift:
    kind: str
    value: float | None = None

    @property
    def name(self) -> str:
        return self.kind if self.value is None else f"{self.kind}:{self.value:g}"

    def __call__(self, pixels: torch.Tensor, seed: int) -> torch.Tensor:
        """``pixels`` shifted: a ``[C, H, W]`` float tensor."""
        from torchvision.transforms.v2 import InterpolationMode
        from torchvision.transforms.v2 import functional as TF

        if self.kind == "invert":
            return 1.0 - pixels
        assert self.value is not None
        if self.kind == "rotate":
            return TF.rotate(pixels, self.value, interpolation=InterpolationMode.BILINEAR)
        if self.kind == "gaussian_noise":
            generator = torch.Generator().manual_seed(seed)
            return pixels + self.value * torch.randn(pixels.shape, generator=generator)
        if self.kind == "blur":
            if self.value == 0:
                return pixels
            side = min(pixels.shape[-2:])
            size = min(2 * math.ceil(3 * self.value) + 1, side if side % 2 else side - 1)
            return TF.gaussian_blur(pixels, [size, size], [self.value, self.value])
        if self.kind == "contrast":
            mean = pixels.mean()
            return (pixels - mean) * self.value + mean
        raise AssertionError(self.kind)


def parse_shift(text: str) -> Shift:
    """``kind`` or ``kind:VALUE`` as a :class:`Shift`; a ValueError names what is wrong."""
    kind, _, raw = str(text).partition(":")
    kind = kind.strip()
    if kind not in SHIFT_KINDS:
        raise ValueError(f"unknown shift {kind!r} in {text!r}; shifts: {', '.join(_forms())}")
    meaning = SHIFT_KINDS[kind]
    if meaning is None:
        if raw:
            raise ValueError(f"shift {text!r}: {kind} takes no value")
        return Shift(kind)
    if not raw:
        raise ValueError(f"shift {text!r}: {kind} needs a value, e.g. {kind}:{_example(kind)}")
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"shift {text!r}: {raw!r} is not a number ({meaning})") from None
    if not math.isfinite(value):
        raise ValueError(f"shift {text!r}: the value must be finite")
    if kind in ("gaussian_noise", "blur", "contrast") and value < 0:
        raise ValueError(f"shift {text!r}: the {meaning} must be >= 0")
    return Shift(kind, value)


def _example(kind: str) -> str:
    return {"rotate": "30", "gaussian_noise": "0.2", "blur": "1", "contrast": "0.5"}[kind]


def _forms() -> list[str]:
    return [k if v is None else f"{k}:{_example(k)}" for k, v in SHIFT_KINDS.items()]


class ShiftedImages(Dataset):
    """``dataset`` with ``shift`` applied to every image.

    ``mean`` and ``std`` are the normalization the dataset applied (the image is
    shifted in pixel units, then normalized again); None for data without a pixel range.
    """

    def __init__(
        self,
        dataset: Dataset,
        shift: Shift,
        seed: int,
        mean: tuple[float, ...] | None,
        std: tuple[float, ...] | None,
    ):
        self.dataset, self.shift = dataset, shift
        self.targets = dataset.targets
        self.classes = dataset.classes
        # The shift's own seed: two shifts of one dataset draw different noise.
        self.seed = [seed, zlib.crc32(shift.name.encode())]
        self.pixel_range = mean is not None and std is not None
        if self.pixel_range:
            self.mean = torch.tensor(mean).view(-1, 1, 1)
            self.std = torch.tensor(std).view(-1, 1, 1)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image, label = self.dataset[index]
        item_seed = int(np.random.SeedSequence([*self.seed, index]).generate_state(1)[0])
        if not self.pixel_range:
            return self.shift(image, item_seed), label
        pixels = (image * self.std + self.mean).clamp(0.0, 1.0)
        shifted = self.shift(pixels, item_seed).clamp(0.0, 1.0)
        return (shifted - self.mean) / self.std, label
