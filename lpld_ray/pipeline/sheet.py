"""The contact sheet: one row per class of the first classes, a few images each, read and decoded only as shown."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torchvision.utils import make_grid

from lpld_ray.pipeline.shards import ClassShard
from lpld_ray.store.codecs import decode_png_uint8, encode_png
from lpld_ray.store.layout import IMAGES_STAGE, REPORT_STAGE
from lpld_ray.store.manifest import read_manifest, read_object
from lpld_ray.store.storage import Store

SHEET_OBJECT = f"{REPORT_STAGE}/contact_sheet.png"
SHEET_CLASSES = 100  # rows
SHEET_PER_CLASS = 10  # columns
THUMBNAIL_PX = 96  # larger images are shown downscaled, so the sheet is bounded at any image size


def sheet_objects(store: Store, shards: list[ClassShard], max_classes: int, per_class: int) -> list[tuple[str, str]]:
    """(shard, object name) of the images the sheet shows: the first ``per_class`` of each of the first classes."""
    shown: list[tuple[str, str]] = []
    for shard in shards:
        if shard.class_ids[0] >= max_classes:
            break
        manifest = read_manifest(store, IMAGES_STAGE, shard.name)
        names = sorted(e.name for e in manifest.objects) if manifest else []
        shown += [(shard.name, n) for n in names if int(n[:5]) < max_classes and int(n[6:10]) < per_class]
    return shown


def thumbnail(image: torch.Tensor, size: int = THUMBNAIL_PX) -> torch.Tensor:
    """A [C,H,W] uint8 image as float in [0,1], downscaled (antialiased) when its side exceeds ``size``."""
    x = image.float().unsqueeze(0) / 255.0
    if x.shape[-1] > size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return x[0]


def contact_sheet(store: Store, shards: list[ClassShard], max_classes: int = SHEET_CLASSES,
                  per_class: int = SHEET_PER_CLASS) -> bytes:
    """PNG bytes of the grid; each shown object is read once and checked against its manifest."""
    rows: dict[int, list[torch.Tensor]] = {}
    manifests = {}
    for shard, name in sheet_objects(store, shards, max_classes, per_class):
        manifest = manifests.setdefault(shard, read_manifest(store, IMAGES_STAGE, shard))
        image = decode_png_uint8(read_object(store, IMAGES_STAGE, shard, name, manifest))
        rows.setdefault(int(name[:5]), []).append(thumbnail(image))
    cells = []
    for images in rows.values():
        blank = torch.ones_like(images[0])
        cells += images + [blank] * (per_class - len(images))
    grid = make_grid(torch.stack(cells), nrow=per_class, padding=2, pad_value=1.0)
    return encode_png(grid)


def write_contact_sheet(store: Store, shards: list[ClassShard]) -> str:
    """Write ``report/contact_sheet.png``; returns its URI."""
    store.write_bytes(SHEET_OBJECT, contact_sheet(store, shards))
    return store.uri(SHEET_OBJECT)
