"""Views of the label pool: ids, per-image view counts, view parameters from method.rng and the composed view (torch)."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from lpld_ray.config import RelabelConfig
from lpld_ray.method.augment import CropBox, randint, resized_crop, sample_crop, uniform
from lpld_ray.method.rng import Stream, generator

MIX_CODES = {"none": 0, "cutmix": 1, "cutout": 2}


def image_id_of(class_id: int, index: int, ipc: int) -> int:
    """The run-wide image id: ``class_id * ipc + index``."""
    return int(class_id) * int(ipc) + int(index)


def kept_views(num_images: int, epochs: int, compression: float) -> int:
    """round(N*E/k), halves rounded up: the views the pool keeps in all before the one-per-image floor."""
    return int(math.floor(num_images * epochs / compression + 0.5))


def view_counts(num_images: int, epochs: int, compression: float, seed: int) -> Tensor:
    """Views kept per image: round(N*E/k) in all, V // N each and one more for V % N images drawn from ``seed``.

    Every image keeps at least one view, so when k > E the pool holds N records, not round(N*E/k):
    label bytes are floored at one record per image.
    """
    if num_images < 1 or epochs < 1 or compression < 1:
        raise ValueError(f"view_counts needs num_images >= 1, epochs >= 1, compression >= 1; got {num_images}, {epochs}, {compression}")
    total = kept_views(num_images, epochs, compression)
    counts = torch.full((num_images,), total // num_images, dtype=torch.int64)
    extra = generator(Stream.VIEW_COUNTS, seed).permutation(num_images)[: total % num_images]
    counts[torch.from_numpy(extra)] += 1
    return counts.clamp_(min=1)


@dataclass(frozen=True)
class ViewParams:
    """Everything needed to rebuild one augmented view of one image, bit for bit."""

    image_id: int
    view_id: int
    crop: CropBox
    flip: bool
    mix: int  # 0 none, 1 cutmix, 2 cutout
    partner_id: int  # -1 unless cutmix
    partner_crop: CropBox | None
    partner_flip: bool
    mix_box: CropBox | None  # cutmix: pasted from the partner view; cutout: filled with ``fill``
    lam: float  # cutmix: 1 - box area / image area; 1.0 otherwise
    fill: tuple[int, int, int] = (0, 0, 0)  # cutout: the box's colour in 0..255 (one channel uses the first)


def _centered_box(gen: np.random.Generator, size: int, cut: int) -> CropBox:
    """A cut x cut box with a uniform centre, clipped to the image (CutMix's rand_bbox)."""
    cy, cx = randint(gen, 0, size - 1), randint(gen, 0, size - 1)
    y1, y2 = max(cy - cut // 2, 0), min(cy + cut // 2, size)
    x1, x2 = max(cx - cut // 2, 0), min(cx + cut // 2, size)
    return CropBox(y1, x1, y2 - y1, x2 - x1)


def sample_view(seed: int, image_id: int, view_id: int, num_images: int, size: int, cfg: RelabelConfig) -> ViewParams:
    """The parameters of view ``view_id`` of ``image_id``, from the stream keyed by (VIEW, seed, image_id, view_id).

    The CutMix partner is uniform over the other ``num_images - 1`` images; lambda ~ Beta(a, a) is numpy's.
    """
    gen = generator(Stream.VIEW, seed, image_id, view_id)
    crop = sample_crop(gen, size, size, cfg.crop_scale)
    flip = uniform(gen, 0.0, 1.0) < 0.5 and cfg.flip
    mix = MIX_CODES[cfg.mix]
    if mix == 1:
        partner = randint(gen, 0, num_images - 2) if num_images > 1 else image_id
        partner += int(num_images > 1 and partner >= image_id)
        partner_crop = sample_crop(gen, size, size, cfg.crop_scale)
        partner_flip = uniform(gen, 0.0, 1.0) < 0.5 and cfg.flip
        lam = float(gen.beta(cfg.cutmix_beta, cfg.cutmix_beta))
        box = _centered_box(gen, size, int(size * math.sqrt(1.0 - lam)))
        lam = 1.0 - box.height * box.width / (size * size)
        return ViewParams(image_id, view_id, crop, flip, mix, partner, partner_crop, partner_flip, box, lam)
    box = _centered_box(gen, size, max(1, round(cfg.cutout_fraction * size))) if mix == 2 else None
    fill = (0, 0, 0)
    if mix == 2 and cfg.cutout_fill == "random":  # drawn after the box: zero-fill views keep their draws
        fill = (randint(gen, 0, 255), randint(gen, 0, 255), randint(gen, 0, 255))
    return ViewParams(image_id, view_id, crop, flip, mix, -1, None, False, box, 1.0, fill)


def plan_views(seed: int, image_ids: Iterable[int], counts: Tensor, cfg: RelabelConfig, size: int) -> list[ViewParams]:
    """Every kept view of ``image_ids`` (``counts[i]`` views of image i, of ``len(counts)`` in the run), each sampled
    once, image by image in the given order and by view id within an image."""
    num_images = len(counts)
    return [sample_view(seed, int(i), v, num_images, size, cfg) for i in image_ids for v in range(int(counts[int(i)]))]


def images_needed(image_ids: Iterable[int], views: Iterable[ViewParams]) -> set[int]:
    """The shard's own images and the CutMix partners of its views: all a relabel shard reads, so an actor's
    memory is bounded by the shard (at most images x (1 + views per image)), not by the dataset."""
    needed = {int(i) for i in image_ids}
    needed.update(v.partner_id for v in views if v.mix == 1)
    return needed


def _crop_flip(image: Tensor, box: CropBox, flip: bool, size: int) -> Tensor:
    out = resized_crop(image.unsqueeze(0), box, size)[0]
    return out.flip(-1) if flip else out


def compose_view(image: Tensor, partner: Tensor | None, view: ViewParams, size: int) -> Tensor:
    """The augmented [C,size,size] view: crop, resize, flip; then CutMix paste or Cutout fill (``view.fill`` / 255).

    The one function used at relabel time and by :class:`lpld_ray.data.pool.LabelPool`; give it the decoded PNGs
    (CPU tensors in [0,1]) in both places and the views are bit-identical.
    """
    out = _crop_flip(image, view.crop, view.flip, size)
    box = view.mix_box
    if view.mix == 0 or box is None or box.height == 0 or box.width == 0:
        return out
    rows, cols = slice(box.top, box.top + box.height), slice(box.left, box.left + box.width)
    if view.mix == 1:
        if partner is None or view.partner_crop is None:
            raise ValueError(f"view {view.image_id}/{view.view_id} is a CutMix view: it needs its partner image {view.partner_id}")
        out[:, rows, cols] = _crop_flip(partner, view.partner_crop, view.partner_flip, size)[:, rows, cols]
    else:
        fill = torch.tensor(view.fill[: out.shape[0]], dtype=out.dtype) / 255.0
        out[:, rows, cols] = fill.view(-1, 1, 1)
    return out
