"""Views of the label pool: ids, per-image view counts, seeded view parameters and the composed view (plain torch)."""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import torch
from torch import Tensor

from lpld_ray.config import RelabelConfig
from lpld_ray.method.augment import CropBox, randint, resized_crop, sample_crop, uniform

MIX_CODES = {"none": 0, "cutmix": 1, "cutout": 2}


_VIEW_STREAM = 1


DRAW_STREAM = 2


def image_id_of(class_id: int, index: int, ipc: int) -> int:
    """The run-wide image id: ``class_id * ipc + index``."""
    return int(class_id) * int(ipc) + int(index)


def stream_generator(*parts: int) -> torch.Generator:
    """A CPU generator seeded by a hash of ``parts``: independent of batching, sharding and call order."""
    digest = hashlib.blake2b(b"".join(int(p).to_bytes(8, "little", signed=True) for p in parts), digest_size=8)
    gen = torch.Generator()
    gen.manual_seed(int.from_bytes(digest.digest(), "little") & ((1 << 63) - 1))
    return gen


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
    gen = torch.Generator()
    gen.manual_seed(int(seed))
    counts[torch.randperm(num_images, generator=gen)[: total % num_images]] += 1
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
    mix_box: CropBox | None  # cutmix: pasted from the partner view; cutout: zeroed
    lam: float  # cutmix: 1 - box area / image area; 1.0 otherwise


def _gamma(gen: torch.Generator, a: float) -> float:
    """Gamma(a, 1) from ``gen``: exponential for a = 1, Marsaglia-Tsang otherwise (boosted for a < 1)."""
    if a == 1.0:
        return float(torch.empty(1).exponential_(generator=gen).item())
    if a < 1.0:
        return _gamma(gen, a + 1.0) * uniform(gen, 0.0, 1.0) ** (1.0 / a)
    d = a - 1.0 / 3.0
    c = 1.0 / math.sqrt(9.0 * d)
    while True:
        x = float(torch.randn(1, generator=gen).item())
        v = (1.0 + c * x) ** 3
        if v <= 0:
            continue
        u = uniform(gen, 0.0, 1.0)
        if u > 0 and math.log(u) < 0.5 * x * x + d - d * v + d * math.log(v):
            return d * v


def sample_beta(gen: torch.Generator, a: float) -> float:
    """Beta(a, a) as X / (X + Y) with X, Y ~ Gamma(a) drawn from ``gen``."""
    x, y = _gamma(gen, a), _gamma(gen, a)
    return x / (x + y) if x + y > 0 else 0.5


def _centered_box(gen: torch.Generator, size: int, cut: int) -> CropBox:
    """A cut x cut box with a uniform centre, clipped to the image (CutMix's rand_bbox)."""
    cy, cx = randint(gen, 0, size - 1), randint(gen, 0, size - 1)
    y1, y2 = max(cy - cut // 2, 0), min(cy + cut // 2, size)
    x1, x2 = max(cx - cut // 2, 0), min(cx + cut // 2, size)
    return CropBox(y1, x1, y2 - y1, x2 - x1)


def sample_view(seed: int, image_id: int, view_id: int, num_images: int, size: int, cfg: RelabelConfig) -> ViewParams:
    """The parameters of view ``view_id`` of ``image_id``, from a stream seeded by (seed, image_id, view_id)."""
    gen = stream_generator(_VIEW_STREAM, seed, image_id, view_id)
    crop = sample_crop(gen, size, size, cfg.crop_scale)
    flip = uniform(gen, 0.0, 1.0) < 0.5 and cfg.flip
    mix = MIX_CODES[cfg.mix]
    if mix == 1:
        partner = randint(gen, 0, num_images - 2) if num_images > 1 else image_id
        partner += int(num_images > 1 and partner >= image_id)
        partner_crop = sample_crop(gen, size, size, cfg.crop_scale)
        partner_flip = uniform(gen, 0.0, 1.0) < 0.5 and cfg.flip
        lam = sample_beta(gen, cfg.cutmix_beta)
        box = _centered_box(gen, size, int(size * math.sqrt(1.0 - lam)))
        lam = 1.0 - box.height * box.width / (size * size)
        return ViewParams(image_id, view_id, crop, flip, mix, partner, partner_crop, partner_flip, box, lam)
    box = _centered_box(gen, size, max(1, round(cfg.cutout_fraction * size))) if mix == 2 else None
    return ViewParams(image_id, view_id, crop, flip, mix, -1, None, False, box, 1.0)


def images_needed(seed: int, image_ids: list[int], counts: Tensor, cfg: RelabelConfig, size: int) -> set[int]:
    """The shard's own images and the CutMix partners of their kept views: all a relabel shard reads, so an actor's
    memory is bounded by the shard (at most images x (1 + views per image)), not by the dataset."""
    needed = set(image_ids)
    if MIX_CODES[cfg.mix] == 1:
        for image_id in image_ids:
            for view_id in range(int(counts[image_id])):
                needed.add(sample_view(seed, image_id, view_id, len(counts), size, cfg).partner_id)
    return needed


def _crop_flip(image: Tensor, box: CropBox, flip: bool, size: int) -> Tensor:
    out = resized_crop(image.unsqueeze(0), box, size)[0]
    return out.flip(-1) if flip else out


def compose_view(image: Tensor, partner: Tensor | None, view: ViewParams, size: int) -> Tensor:
    """The augmented [C,size,size] view: crop, resize, flip; then CutMix paste or Cutout zeroing.

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
        out[:, rows, cols] = 0.0
    return out
