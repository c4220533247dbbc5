"""The contact sheet: a row of a few images per class of the first classes, labelled, decoded only as shown."""

from __future__ import annotations

import io
import os
from functools import lru_cache

import torch
from PIL import Image, ImageDraw, ImageFont

from lpld_ray.pipeline.shards import ClassShard
from lpld_ray.store.codecs import decode_png_uint8
from lpld_ray.store.layout import IMAGES_STAGE, REPORT_STAGE
from lpld_ray.store.manifest import read_manifest, read_object
from lpld_ray.store.storage import Store

SHEET_OBJECT = f"{REPORT_STAGE}/contact_sheet.png"
SHEET_CLASSES = 100  # rows
SHEET_PER_CLASS = 10  # columns
THUMBNAIL_PX = 96  # larger images are shown downscaled, so the sheet is bounded at any image size
MIN_CELL_PX = 64  # smaller images are shown upscaled (pixel-exact, by a whole factor) to at least this side
PADDING_PX = 2
LABEL_FONT_PX = 18
LABEL_MARGIN_PX = 8
LABEL_MAX_CHARS = 28  # longer class names are cut with an ellipsis


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


def cell_px(side: int) -> int:
    """The side of a sheet cell for images of ``side`` px: downscaled to THUMBNAIL_PX, or upscaled by a whole
    factor to at least MIN_CELL_PX."""
    if side > THUMBNAIL_PX:
        return THUMBNAIL_PX
    return side * max(1, -(-MIN_CELL_PX // side))


def thumbnail(image: torch.Tensor, side: int) -> Image.Image:
    """A [C,H,W] uint8 image as an RGB cell of ``side`` px: antialiased when smaller, nearest when larger."""
    array = image.permute(1, 2, 0).numpy()
    pil = Image.fromarray(array[:, :, 0] if array.shape[2] == 1 else array)  # L or RGB, from the uint8 shape
    shrink = side < max(pil.size)
    resample = Image.Resampling.LANCZOS if shrink else Image.Resampling.NEAREST
    return pil.convert("RGB").resize((side, side), resample)


@lru_cache(maxsize=4)
def label_font(size: int = LABEL_FONT_PX) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """DejaVu Sans (shipped with matplotlib) at ``size`` px; Pillow's own font when that file is absent."""
    import matplotlib  # here: the shard actors import this module, and need no font

    font_file = os.path.join(matplotlib.get_data_path(), "fonts", "ttf", "DejaVuSans.ttf")
    if os.path.exists(font_file):
        return ImageFont.truetype(font_file, size)
    return ImageFont.load_default(size)


def row_label(class_id: int, class_names: list[str] | None) -> str:
    """The class name of a row (cut to LABEL_MAX_CHARS), or ``class <id>`` without names."""
    name = class_names[class_id] if class_names and class_id < len(class_names) else f"class {class_id}"
    return name if len(name) <= LABEL_MAX_CHARS else name[:LABEL_MAX_CHARS - 1] + "\u2026"


def contact_sheet(store: Store, shards: list[ClassShard], max_classes: int = SHEET_CLASSES,
                  per_class: int = SHEET_PER_CLASS, class_names: list[str] | None = None) -> bytes:
    """PNG bytes of the labelled grid; each shown object is read once and checked against its manifest."""
    rows: dict[int, list[torch.Tensor]] = {}
    manifests = {}
    for shard, name in sheet_objects(store, shards, max_classes, per_class):
        manifest = manifests.setdefault(shard, read_manifest(store, IMAGES_STAGE, shard))
        rows.setdefault(int(name[:5]), []).append(decode_png_uint8(read_object(store, IMAGES_STAGE, shard, name,
                                                                                  manifest)))
    if not rows:
        raise ValueError("no images to show on the contact sheet")
    side = cell_px(max(next(iter(rows.values()))[0].shape[1:]))
    labels = {c: row_label(c, class_names) for c in rows}
    font = label_font()
    label_w = int(max(font.getlength(text) for text in labels.values())) + 2 * LABEL_MARGIN_PX
    step = side + PADDING_PX
    sheet = Image.new("RGB", (label_w + PADDING_PX + per_class * step, PADDING_PX + len(rows) * step), "white")
    draw = ImageDraw.Draw(sheet)
    for r, class_id in enumerate(sorted(rows)):
        top = PADDING_PX + r * step
        draw.text((label_w - LABEL_MARGIN_PX, top + side // 2), labels[class_id], fill="black", font=font, anchor="rm")
        for col, image in enumerate(rows[class_id]):
            sheet.paste(thumbnail(image, side), (label_w + PADDING_PX + col * step, top))
    buf = io.BytesIO()
    sheet.save(buf, format="PNG")
    return buf.getvalue()


def write_contact_sheet(store: Store, shards: list[ClassShard], class_names: list[str] | None = None) -> str:
    """Write ``report/contact_sheet.png`` with rows labelled by ``class_names``; returns its URI."""
    store.write_bytes(SHEET_OBJECT, contact_sheet(store, shards, class_names=class_names))
    return store.uri(SHEET_OBJECT)
