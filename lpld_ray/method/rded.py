"""RDED (Sun et al., CVPR 2024): crops of real images scored by the teacher, the most typical kept and stitched."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from lpld_ray.config import RdedConfig
from lpld_ray.method.augment import CropBox, sample_crop
from lpld_ray.method.images import ImageSpec, normalize
from lpld_ray.method.rng import Stream, generator

log = logging.getLogger(__name__)

SQUARE = (1.0, 1.0)  # the official MultiRandomCrop draws square crops (RandomResizedCrop ratio=(1, 1))


@dataclass(frozen=True)
class RdedResult:
    """One class's stitched images and what was kept: candidate positions, their crop, and the crop's CE."""

    images: torch.Tensor  # [ipc, C, S, S] in [0, 1]
    candidates: torch.Tensor  # [ipc * factor^2] positions among the class's candidates, lowest loss first
    crops: torch.Tensor  # [ipc * factor^2] which crop of each
    losses: torch.Tensor  # [ipc * factor^2] the teacher's CE on the class for each kept crop


def patch_size(size: int, factor: int) -> int:
    """Side of one crop: size // factor (the official RandomResizedCrop(size // factor))."""
    if not 1 <= factor <= size:
        raise ValueError(f"rded.factor is {factor}, but images are {size} px: use 1..{size}")
    return size // factor


def crop_boxes(seed: int, class_id: int, candidate: int, crops: int, height: int, width: int,
               scale: tuple[float, float]) -> list[CropBox]:
    """The ``crops`` square crop boxes of one candidate image (height x width), from the stream keyed by
    (RDED_CROPS, seed, class, candidate): the same whatever other candidates, classes or batches there are."""
    gen = generator(Stream.RDED_CROPS, seed, class_id, candidate)
    return [sample_crop(gen, height, width, scale, SQUARE) for _ in range(crops)]


def draw_crops(images: Sequence[torch.Tensor], boxes: list[list[CropBox]], patch: int) -> torch.Tensor:
    """[N, m, C, patch, patch]: crop m boxes of each of N images [C, H, W] (each of its own size), each resized
    (bilinear, antialiased, as torchvision's RandomResizedCrop on tensors) to ``patch`` x ``patch``."""
    n, m = len(boxes), len(boxes[0]) if boxes else 0
    out = torch.empty(n, m, images[0].shape[0] if n else 0, patch, patch)
    for i, row in enumerate(boxes):
        for j, b in enumerate(row):
            window = images[i][None, :, b.top : b.top + b.height, b.left : b.left + b.width].float()
            out[i, j] = F.interpolate(window, size=(patch, patch), mode="bilinear", align_corners=False,
                                      antialias=True)[0]
    return out


def pad_to(x: torch.Tensor, size: int) -> torch.Tensor:
    """Zero-pad [B, C, h, w] to size x size around the centre (the official ``pad``: extra row/column at the end)."""
    dh, dw = size - x.shape[-2], size - x.shape[-1]
    return F.pad(x, (dw // 2, dw - dw // 2, dh // 2, dh - dh // 2))


@torch.no_grad()
def crop_losses(teacher: nn.Module, crops: torch.Tensor, class_id: int, spec: ImageSpec, batch_size: int,
                device: torch.device | str = "cpu") -> torch.Tensor:
    """The teacher's cross-entropy on ``class_id`` of every crop [M, C, p, p] in [0, 1] (lower = more typical), as the
    official selector scores it: normalised, zero-padded to the full size, ``batch_size`` crops per forward."""
    teacher.eval()
    losses = []
    for start in range(0, crops.shape[0], batch_size):
        x = pad_to(normalize(crops[start : start + batch_size].to(device), spec), spec.size)
        logits = teacher(x).float()
        target = torch.full((x.shape[0],), class_id, dtype=torch.long, device=logits.device)
        losses.append(F.cross_entropy(logits, target, reduction="none").cpu())
    return torch.cat(losses) if losses else torch.empty(0)


def select_crops(losses: torch.Tensor, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """From losses [N candidates, m crops]: each candidate's lowest-loss crop, then the ``count`` candidates whose best
    crop scores lowest (the official selector: at most one crop per image). Returns (candidate, crop) indices, lowest
    loss first; ties go to the earlier candidate / crop."""
    if count > losses.shape[0]:
        raise ValueError(f"{count} crops are kept (ipc x factor^2) but there are only {losses.shape[0]} candidates")
    best, which = losses.min(dim=1)
    order = torch.sort(best, stable=True).indices[:count]
    return order, which[order]


def tile_sizes(size: int, factor: int) -> list[int]:
    """Heights (= widths) of the factor tiles along one side: the first size % factor are one pixel larger."""
    s, extra = divmod(size, factor)
    return [s + 1 if i < extra else s for i in range(factor)]


def stitch(patches: torch.Tensor, ipc: int, factor: int, size: int) -> torch.Tensor:
    """[ipc, C, size, size] from ipc * factor^2 patches: tile k (row-major) of image t is patch k * ipc + t, as the
    official ``mix_images`` lays them out (so the best patches are each image's top-left tile); resized (nearest) to
    the tile when size is not a multiple of factor."""
    if patches.shape[0] != ipc * factor * factor:
        raise ValueError(f"stitching needs ipc x factor^2 = {ipc * factor * factor} patches, got {patches.shape[0]}")
    out = patches.new_zeros(ipc, patches.shape[1], size, size)
    sides, k, top = tile_sizes(size, factor), 0, 0
    for h in sides:
        left = 0
        for w in sides:
            tile = patches[k * ipc : (k + 1) * ipc]
            if tile.shape[-2:] != (h, w):
                tile = F.interpolate(tile, size=(h, w), mode="nearest")
            out[:, :, top : top + h, left : left + w] = tile
            left, k = left + w, k + 1
        top += h
    return out


def rded_class(teacher: nn.Module, candidates: Sequence[torch.Tensor], class_id: int, ipc: int, cfg: RdedConfig,
               spec: ImageSpec, seed: int, device: torch.device | str = "cpu") -> RdedResult:
    """RDED for one class from its candidate real images, each [C, H, W] in [0, 1] (rded.candidates of them, in the
    order they were drawn; the official code crops the decoded file at its own size): crops drawn, scored by the
    teacher, the best ipc x factor^2 kept and stitched factor x factor into ipc images of spec.size."""
    patch = patch_size(spec.size, cfg.factor)
    boxes = [crop_boxes(seed, class_id, i, cfg.crops, *image.shape[-2:], cfg.crop_scale)
             for i, image in enumerate(candidates)]
    crops = draw_crops(candidates, boxes, patch)  # [N, m, C, p, p]
    n, m = crops.shape[:2]
    losses = crop_losses(teacher, crops.flatten(0, 1), class_id, spec, cfg.batch_size, device).view(n, m)
    chosen, which = select_crops(losses, ipc * cfg.factor ** 2)
    images = stitch(crops[chosen, which], ipc, cfg.factor, spec.size).clamp(0, 1)
    log.debug("rded class %d: kept %d of %d crops, CE %.3f..%.3f", class_id, chosen.numel(), n * m,
              float(losses[chosen, which].min()), float(losses[chosen, which].max()))
    return RdedResult(images, chosen, which, losses[chosen, which])
