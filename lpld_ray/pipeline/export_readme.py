"""The exported folder's README: where things are, the run's settings, every label column, how to rebuild a view."""

from __future__ import annotations

import pyarrow as pa

from lpld_ray.config import Config
from lpld_ray.method.images import ImageSpec

FILE_COLUMN = "file"

COLUMN_DOCS = {
    "image_id": "the image's run-wide id, class_id * ipc + index (its file is CCCCC_IIII.png or .jpg: class id, index)",
    "view_id": "the view's number among the image's stored views, 0..n-1",
    "crop": "crop box [top, left, height, width] in pixels of the image",
    "flip": "mirror the view horizontally after the crop and resize",
    "mix": "0 plain view, 1 CutMix (paste mix_box from the partner's view), 2 Cutout (fill mix_box with fill)",
    "partner_id": "CutMix: image_id of the partner image; -1 otherwise",
    "partner_crop": "CutMix: crop box [top, left, height, width] in pixels of the partner image; [0,0,0,0] otherwise",
    "partner_flip": "CutMix: mirror the partner's view; false otherwise",
    "mix_box": "box [top, left, height, width] in pixels of the resized view that CutMix pastes / Cutout fills; "
               "[0,0,0,0] when mix is 0",
    "lam": "CutMix: 1 - mix_box area / (S*S), the share of the view from the image itself; 1.0 otherwise "
           "(for information: the target below is the teacher's output on the mixed view, not a lam-mix of labels)",
    "fill": "Cutout: the box's colour [r, g, b] in 0..255 (a one-channel image uses r); [0,0,0] otherwise",
    "logits": "the teacher's output (before softmax) on exactly this view, fp16: one value per class id, or with "
              "relabel.topk only the k largest, in the order of `classes` (absent at top-1: the target is one-hot)",
    "classes": "top-k pools only: the class ids of the k stored logits, largest first; every other class has "
               "probability 0 in the target",
    FILE_COLUMN: "the image's file (PNG or JPEG), relative to images/ (join partner_id to image_id for the partner's file)",
}

REBUILD_CODE = """import numpy as np
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F
from PIL import Image


def load_image(path):
    # a PNG or JPEG as a float [C, H, W] tensor in [0, 1]
    pixels = np.asarray(Image.open(path))
    pixels = pixels[:, :, None] if pixels.ndim == 2 else pixels
    return torch.from_numpy(pixels.copy()).permute(2, 0, 1).float() / 255.0


def crop_flip(image, box, flip, size):
    top, left, height, width = (int(v) for v in box)
    patch = image[None, :, top:top + height, left:left + width]
    out = F.interpolate(patch, size=(size, size), mode="bilinear", align_corners=False)[0]
    return out.flip(-1) if flip else out


def rebuild_view(row, images_dir, file_of, size=SIZE):
    # the view one record describes: row is a dict of labels.parquet columns, file_of maps image_id to file
    view = crop_flip(load_image(f"{images_dir}/{row['file']}"), row["crop"], row["flip"], size)
    top, left, height, width = (int(v) for v in row["mix_box"])
    if row["mix"] == 1:
        partner = load_image(f"{images_dir}/{file_of[row['partner_id']]}")
        partner = crop_flip(partner, row["partner_crop"], row["partner_flip"], size)
        view[:, top:top + height, left:left + width] = partner[:, top:top + height, left:left + width]
    elif row["mix"] == 2:
        fill = torch.tensor(row["fill"][:view.shape[0]], dtype=view.dtype) / 255.0
        view[:, top:top + height, left:left + width] = fill.view(-1, 1, 1)
    return view


def kd_target(row, num_classes=NUM_CLASSES, temperature=TEMPERATURE):
    # the soft label the student is trained towards (a top-k record's other classes get probability 0)
    logits = torch.tensor(row["logits"] if "logits" in row else [0.0], dtype=torch.float32)  # top-1: no logits
    if "classes" in row:
        logits = torch.full((num_classes,), float("-inf")).index_copy(0, torch.tensor(row["classes"]).long(), logits)
    return torch.softmax(logits / temperature, dim=0)
"""


def _type_name(kind: pa.DataType) -> str:
    if pa.types.is_fixed_size_list(kind):
        return f"{_type_name(kind.value_type)}[{kind.list_size}]"
    return {"halffloat": "float16", "float": "float32", "bool": "bool", "string": "string"}.get(str(kind), str(kind))


def _smoothing_text(eps: float, on: str) -> str:
    """How label smoothing enters the KD target, as the export README says it."""
    if not eps:
        return "."
    if on == "logits":
        return (f", with label smoothing eps = {eps:g} on the logits: softmax(((1 - eps) * logits + eps / classes) / T)"
                ", which equals softmax((1 - eps) * logits / T).")
    return f", with label smoothing eps = {eps:g}: (1 - eps) * softmax(logits / T) + eps / classes."


def column_lines(schema: pa.Schema) -> list[str]:
    """One table row per column of ``schema``; ValueError when a column has no description."""
    undocumented = [f.name for f in schema if f.name not in COLUMN_DOCS]
    if undocumented:
        raise ValueError(f"label column(s) {', '.join(undocumented)} have no description in COLUMN_DOCS")
    return [f"| `{f.name}` | {_type_name(f.type)} | {COLUMN_DOCS[f.name]} |" for f in schema]


def readme_text(cfg: Config, spec: ImageSpec, root: str, schema: pa.Schema, classes: list[tuple[str, str]],
                images: int, records: int) -> str:
    """The export's README: what is where, the run's settings, every column, and how to rebuild a view."""
    r, t, size = cfg.relabel, cfg.train, spec.size
    meta = schema.metadata or {}
    code = (REBUILD_CODE.replace("SIZE", str(size)).replace("TEMPERATURE", f"{t.temperature:g}")
            .replace("NUM_CLASSES", str(len(classes))))
    lines = [
        f"# Distilled {cfg.data.name}: {images} images, {records} soft-label records", "",
        f"Exported from the lpld_ray run `{root}`: {cfg.recover.ipc} images per class of {len(classes)} classes "
        f"({size}x{size} px, {spec.channels} channel(s)), recovered with `{cfg.recover.batching}` batching from "
        f"`{cfg.recover.source}` images, and the pruned label pool: each record is one augmented view of one image "
        "with the teacher's output on exactly that view.", "",
        f"- `images/<class folder>/CCCCC_IIII.{'jpg' if cfg.recover.image_format == 'jpeg' else 'png'}`: 8-bit {cfg.recover.image_format.upper()}, class id CCCCC, index IIII; an ImageFolder tree.",
        "- `labels.parquet`: one row per stored view (columns below), sorted by image_id, view_id.", "",
        "## Classes", "",
        "Logits are indexed by class id. torchvision's `ImageFolder` numbers folders in sorted order, which may "
        "differ: map its indices through this table.", "",
        "| class id | name | folder |", "|---|---|---|",
        *[f"| {c} | {name} | `{folder}` |" for c, (name, folder) in enumerate(classes)], "",
        "## Run settings", "",
        f"- relabel: epochs E = {r.epochs}, compression k = {r.compression:g} (each image keeps round(E/k) views "
        f"on average, at least one), crop_scale = {list(r.crop_scale)}, flip = {r.flip}, mix = {r.mix}, "
        f"cutmix_beta = {r.cutmix_beta:g}, cutout_fraction = {r.cutout_fraction:g}, "
        f"topk = {'all' if r.topk is None else r.topk}, seed = {cfg.seed}",
        f"- student: temperature T = {t.temperature:g} ({t.temperature_schedule}), label_smoothing = {t.label_smoothing:g}, "
        f"epochs = {t.epochs}, view_sampling = {t.view_sampling}, arch = {t.arch}",
        f"- normalization before a model: (x - mean) / std per channel, mean = {list(spec.mean)}, std = "
        f"{list(spec.std)}",
        f"- label schema version {meta.get(b'lpld_label_schema_version', b'?').decode()}, view sampler version "
        f"{meta.get(b'lpld_sampler_version', b'?').decode()}", "",
        "## Columns of labels.parquet", "",
        "| column | type | meaning |", "|---|---|---|", *column_lines(schema), "",
        "## Rebuilding a view", "",
        f"Decode the image (PNG or JPEG) to [C,H,W] floats in [0,1] (pixel / 255). Crop `crop` and resize the patch to {size}x{size} "
        "(bilinear, align_corners=False, no antialiasing: `torch.nn.functional.interpolate`); mirror it when `flip`. "
        "CutMix (`mix` 1): build the partner's view the same way from image `partner_id` with `partner_crop` and "
        "`partner_flip`, and paste its `mix_box` region into the view. Cutout (`mix` 2): set the `mix_box` region "
        "to `fill` / 255. Normalize as above before the model. This code rebuilds the views bit for bit:", "",
        "```python", code.rstrip(), "", "", 'table = pq.read_table("labels.parquet")',
        'file_of = dict(zip(table["image_id"].to_pylist(), table["file"].to_pylist()))',
        'row = table.slice(0, 1).to_pylist()[0]',
        'x, target = rebuild_view(row, "images", file_of), kd_target(row)', "```", "",
        "## The KD target", "",
        f"The student is trained towards softmax(logits / T), T = {t.temperature:g}: lpld_ray's loss is "
        "KL(softmax(logits / T) || softmax(student / T)), mean over the batch"
        + _smoothing_text(t.label_smoothing, t.smoothing_on) + (" The loss is multiplied by T^2." if t.t_squared
                                                               else ""), "",
        "In each epoch every image is used once, through one of its views: image i with n views uses the view with "
        "view_id = epoch mod n (`view_sampling: cycle`; `uniform` draws one at random).", "",
    ]
    return "\n".join(lines)
