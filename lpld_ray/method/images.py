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
