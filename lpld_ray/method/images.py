"""Image shape and normalisation constants, and normalize/denormalize: plain torch."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ImageSpec:
    """Shape and normalisation constants of a dataset's images."""

    channels: int
    size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]


FASHION_SPEC = ImageSpec(1, 28, (0.2860,), (0.3530,))
DIGITS_SPEC = ImageSpec(1, 8, (0.3053,), (0.3760,))  # measured over all 1797 digits / 16


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
TINY_IMAGENET_MEAN = (0.4802, 0.4481, 0.3975)  # the official Tiny-ImageNet recipe's (recover/utils_tiny.py)
TINY_IMAGENET_STD = (0.2302, 0.2265, 0.2262)
# normalization setting -> (mean, std) of three channels; "none" keeps raw [0, 1] pixels (mean 0, std 1)
RGB_STATS = {"imagenet": (IMAGENET_MEAN, IMAGENET_STD), "tiny_imagenet": (TINY_IMAGENET_MEAN, TINY_IMAGENET_STD)}


def with_stats(spec: ImageSpec, normalization: str) -> ImageSpec:
    """``spec`` with the mean/std of a normalization setting: dataset keeps its own, none is the identity
    (mean 0, std 1: recover then clamps to [0, 1] and normalize changes nothing)."""
    if normalization == "dataset":
        return spec
    if normalization == "none":
        return ImageSpec(spec.channels, spec.size, (0.0,) * spec.channels, (1.0,) * spec.channels)
    mean, std = RGB_STATS[normalization]
    if spec.channels != len(mean):
        raise ValueError(f"normalization {normalization} is for {len(mean)} channels, not {spec.channels}")
    return ImageSpec(spec.channels, spec.size, mean, std)


def normalize(x: torch.Tensor, spec: ImageSpec) -> torch.Tensor:
    """(x - mean) / std per channel, for [B,C,H,W] or [C,H,W]."""
    mean, std = _channel_stats(x, spec)
    return (x - mean) / std


def denormalize(x: torch.Tensor, spec: ImageSpec) -> torch.Tensor:
    """Inverse of :func:`normalize`."""
    mean, std = _channel_stats(x, spec)
    return x * std + mean


def _channel_stats(x: torch.Tensor, spec: ImageSpec) -> tuple[torch.Tensor, torch.Tensor]:
    if x.dim() < 3 or x.shape[-3] != spec.channels:
        raise ValueError(f"expected images shaped [..., {spec.channels}, H, W], got {list(x.shape)}")
    mean = torch.tensor(spec.mean, dtype=x.dtype, device=x.device).view(-1, 1, 1)
    std = torch.tensor(spec.std, dtype=x.dtype, device=x.device).view(-1, 1, 1)
    return mean, std
