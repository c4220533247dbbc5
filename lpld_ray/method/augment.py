"""Seeded, differentiable image augmentations: random resized crop, flip, jitter."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class CropBox:
    """A crop window in pixels of the source image."""

    top: int
    left: int
    height: int
    width: int


def uniform(gen: np.random.Generator, low: float, high: float) -> float:
    """One draw from U[low, high) of ``gen``."""
    return float(gen.uniform(low, high))


def randint(gen: np.random.Generator, low: int, high_inclusive: int) -> int:
    """One integer in [low, high_inclusive] from ``gen``."""
    return int(gen.integers(low, high_inclusive, endpoint=True))


def sample_crop(
    gen: np.random.Generator,
    height: int,
    width: int,
    scale: tuple[float, float],
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> CropBox:
    """RandomResizedCrop's parameter draw (torchvision's algorithm) from an explicit numpy generator."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * uniform(gen, scale[0], scale[1])
        aspect = math.exp(uniform(gen, *log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return CropBox(randint(gen, 0, height - h), randint(gen, 0, width - w), h, w)
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        h, w = height, int(round(height * ratio[1]))
    else:
        w, h = width, height
    return CropBox((height - h) // 2, (width - w) // 2, h, w)


def resized_crop(x: torch.Tensor, box: CropBox, size: int) -> torch.Tensor:
    """Crop ``box`` out of a [B,C,H,W] batch and resize it bilinearly to ``size`` x ``size``."""
    patch = x[:, :, box.top : box.top + box.height, box.left : box.left + box.width]
    return F.interpolate(patch, size=(size, size), mode="bilinear", align_corners=False)


def squeeze_view(image: torch.Tensor, gen: np.random.Generator, size: int,
                 scale: tuple[float, float] = (0.08, 1.0)) -> torch.Tensor:
    """The official squeeze transform of one [C,H,W] source image: RandomResizedCrop(size, ``scale``) drawn over
    the image's own H x W and resized bilinearly (antialiased when shrinking, as Pillow does), then a flip with
    probability 1/2; all draws from ``gen``."""
    box = sample_crop(gen, image.shape[-2], image.shape[-1], scale)
    patch = image[None, :, box.top : box.top + box.height, box.left : box.left + box.width]
    out = F.interpolate(patch, size=(size, size), mode="bilinear", align_corners=False,
                        antialias=min(box.height, box.width) > size)[0]
    return out.flip(-1) if uniform(gen, 0.0, 1.0) < 0.5 else out


@dataclass(frozen=True)
class SynthAug:
    """One draw of the recover-time augmentation: crop, flip, then a roll by (dy, dx)."""

    box: CropBox
    flip: bool
    dy: int
    dx: int

    @staticmethod
    def sample(gen: np.random.Generator, size: int, scale: tuple[float, float], flip: bool, jitter: int,
               symmetric: bool = False) -> "SynthAug":
        """One draw from ``gen``: crop, flip (when ``flip``), and a roll of 0..jitter pixels each way, or of
        -jitter..jitter when ``symmetric``."""
        box = sample_crop(gen, size, size, scale)
        do_flip = flip and uniform(gen, 0.0, 1.0) < 0.5
        low = -jitter if symmetric else 0
        return SynthAug(box, do_flip, randint(gen, low, jitter), randint(gen, low, jitter))

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        out = resized_crop(x, self.box, x.shape[-1])
        if self.flip:
            out = out.flip(-1)
        if self.dy or self.dx:
            out = torch.roll(out, shifts=(self.dy, self.dx), dims=(2, 3))
        return out
