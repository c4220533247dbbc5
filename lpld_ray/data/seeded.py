"""Seeded label pools: a shard's view ids and parameters regenerated from its seed by the versioned view sampler."""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from lpld_ray.config import RelabelConfig
from lpld_ray.method.views import sample_view, view_counts
from lpld_ray.store.label_table import SEEDED_KEY, param_table, seeded_views_of


def id_ranges(image_ids: list[int]) -> list[list[int]]:
    """Sorted ``image_ids`` as [start, stop) runs of consecutive ids: a class shard's images are one or a few runs."""
    runs: list[list[int]] = []
    for i in sorted(int(i) for i in image_ids):
        if runs and runs[-1][1] == i:
            runs[-1][1] = i + 1
        else:
            runs.append([i, i + 1])
    return runs


def seeded_json(seed: int, num_images: int, size: int, image_ids: list[int], cfg: RelabelConfig) -> str:
    """What a seeded label table stores instead of its views: the seed, the run's image count, the view size, the
    shard's images (as runs of ids: a list of 400 ids would be ~2 KB of a ~20 KB pool) and the relabel settings."""
    return json.dumps({"seed": int(seed), "num_images": int(num_images), "size": int(size),
                       "image_ranges": id_ranges(image_ids), "relabel": cfg.model_dump(mode="json")},
                      separators=(",", ":"))


@dataclass(frozen=True)
class SeededViews:
    """The views of one seeded label shard, in the order its rows are stored (the relabel stage's epoch_order)."""

    seed: int
    num_images: int
    size: int
    image_ids: tuple[int, ...]
    cfg: RelabelConfig

    @classmethod
    def from_json(cls, text: str) -> SeededViews:
        d = json.loads(text)
        image_ids = tuple(i for start, stop in d["image_ranges"] for i in range(start, stop))
        return cls(d["seed"], d["num_images"], d["size"], image_ids, RelabelConfig(**d["relabel"]))

    def ids(self) -> tuple[np.ndarray, np.ndarray]:
        """(image_id, view_id) of every row: each image's seeded view count, views 0..n-1, rows sorted by (views of
        the image, view_id, image_id) as relabel stores them."""
        counts = view_counts(self.num_images, self.cfg.epochs, self.cfg.compression, self.seed).numpy()
        ids = np.asarray(self.image_ids, np.int64)
        per_image = counts[ids]
        image = np.repeat(ids, per_image)
        view = np.concatenate([np.arange(n) for n in per_image]) if len(ids) else np.zeros(0, np.int64)
        order = np.lexsort((image, view, np.repeat(per_image, per_image)))
        return image[order], view[order]

    def params(self, image_ids: np.ndarray, view_ids: np.ndarray) -> pa.Table:
        """The ids and augmentation parameters of the given views, drawn again by the sampler."""
        views = [sample_view(self.seed, int(i), int(v), self.num_images, self.size, self.cfg)
                 for i, v in zip(image_ids, view_ids)]
        return param_table(views)


def expanded(table: pa.Table) -> pa.Table:
    """A label table with every column a stored one has: a seeded table's views drawn again and put before its
    logits (its metadata then no longer marks it seeded); a stored table as it is."""
    text = seeded_views_of(table.schema)
    if text is None:
        return table
    views = SeededViews.from_json(text)
    params = views.params(*views.ids())
    meta = {k: v for k, v in (table.schema.metadata or {}).items() if k != SEEDED_KEY}
    schema = pa.schema([*params.schema, *table.schema], metadata=meta)
    return pa.Table.from_arrays([*params.columns, *table.columns], schema=schema)
