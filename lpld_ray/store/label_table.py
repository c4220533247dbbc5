"""The label record as an Arrow table in Parquet: the versioned schema, row order, reading and byte counts."""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch import Tensor

from lpld_ray.errors import StorageError

LABEL_SCHEMA_VERSION = 5  # 2: the schema metadata records the sampler version; 3: the Cutout fill colour; 4: top-k;
# 5: a seeded table lists its images as [start, stop) runs of ids


VERSION_KEY = b"lpld_label_schema_version"


NUM_CLASSES_KEY = b"num_classes"


SAMPLER_KEY = b"lpld_sampler_version"  # the version of the seeded sampler that drew the views (lpld_ray.method.rng)


SEEDED_KEY = b"lpld_seeded_views"  # relabel.params seeded: the JSON that regenerates the views (no param columns)


TOPK_KEY = b"lpld_topk"  # logits stored per record: the class count, or k of relabel.topk (with a classes column)


def stored_logits(num_classes: int, topk: int | None) -> int:
    """How many logits a record stores: all of them, or the ``topk`` largest (when fewer than the classes)."""
    return num_classes if topk is None else min(int(topk), num_classes)


def stored_values(num_classes: int, topk: int | None) -> int:
    """How many logit values a record stores: none for top-1, whose target (the softmax of one value) is one-hot
    whatever the value, so the class index alone is the record."""
    stored = stored_logits(num_classes, topk)
    return 0 if stored == 1 < num_classes else stored


def class_index_type(num_classes: int) -> pa.DataType:
    """The smallest unsigned integer type that holds every class index: uint8 up to 256 classes, else uint16/32."""
    for kind in (pa.uint8(), pa.uint16()):
        if num_classes <= 1 << kind.bit_width:
            return kind
    return pa.uint32()


BOX = pa.list_(pa.int16(), 4)
PARAM_FIELDS = [  # a view's ids and augmentation parameters: the columns a seeded pool does not store
    ("image_id", pa.int64()), ("view_id", pa.int32()), ("crop", BOX), ("flip", pa.bool_()),
    ("mix", pa.int8()), ("partner_id", pa.int64()), ("partner_crop", BOX), ("partner_flip", pa.bool_()),
    ("mix_box", BOX), ("lam", pa.float32()), ("fill", pa.list_(pa.uint8(), 3)),
]


def label_schema(num_classes: int, sampler_version: int | None = None, topk: int | None = None,
                 seeded: str | None = None) -> pa.Schema:
    """The versioned Arrow schema of a label record; logits are fp16 (Parquet FLOAT16), all of them or the ``topk``
    largest with their class indices (``classes``, largest first; top-1: the class alone); the metadata records the
    schema version, the class count, the logits per record and ``sampler_version``, the version of the sampler that
    drew the views (None: left out, for sizing a record only; check_label_schema refuses a table without it). A
    ``seeded`` table stores no ids or parameters, only what regenerates them (JSON: seed, images, relabel settings)."""
    stored = stored_logits(num_classes, topk)
    fields = [] if seeded else list(PARAM_FIELDS)
    if stored_values(num_classes, topk):
        fields.append(("logits", pa.list_(pa.float16(), stored)))
    if stored < num_classes:
        fields.append(("classes", pa.list_(class_index_type(num_classes), stored)))
    meta = {VERSION_KEY: str(LABEL_SCHEMA_VERSION).encode(), NUM_CLASSES_KEY: str(int(num_classes)).encode(),
            TOPK_KEY: str(stored).encode()}
    if sampler_version is not None:
        meta[SAMPLER_KEY] = str(int(sampler_version)).encode()
    if seeded:
        meta[SEEDED_KEY] = seeded.encode()
    return pa.schema([pa.field(n, t, nullable=False) for n, t in fields], metadata=meta)


def seeded_views_of(schema: pa.Schema) -> str | None:
    """What regenerates a seeded table's views (JSON), or None for a table that stores them."""
    found = (schema.metadata or {}).get(SEEDED_KEY)
    return found.decode() if found else None


def _boxes(boxes: list) -> pa.Array:
    """Boxes (objects with top, left, height, width; None for no box) as a fixed-size list column."""
    flat = np.array([[b.top, b.left, b.height, b.width] if b else [0, 0, 0, 0] for b in boxes], dtype=np.int16)
    return pa.FixedSizeListArray.from_arrays(pa.array(flat.reshape(-1), type=pa.int16()), 4)


def top_logits(logits: Tensor, topk: int) -> tuple[Tensor, Tensor]:
    """The ``topk`` largest of each row of fp16 ``logits`` and their class indices, largest first (ties: the lower
    index first, so that the choice does not depend on the platform)."""
    order = torch.sort(logits.float(), dim=1, descending=True, stable=True).indices[:, :topk]
    return logits.gather(1, order), order


def param_table(views: list) -> pa.Table:
    """The ids and augmentation parameters of ``views``, one row each (PARAM_FIELDS)."""
    columns = [
        pa.array([v.image_id for v in views], pa.int64()), pa.array([v.view_id for v in views], pa.int32()),
        _boxes([v.crop for v in views]), pa.array([v.flip for v in views], pa.bool_()),
        pa.array([v.mix for v in views], pa.int8()), pa.array([v.partner_id for v in views], pa.int64()),
        _boxes([v.partner_crop for v in views]), pa.array([v.partner_flip for v in views], pa.bool_()),
        _boxes([v.mix_box for v in views]), pa.array([v.lam for v in views], pa.float32()),
        pa.FixedSizeListArray.from_arrays(pa.array(np.array([v.fill for v in views], dtype=np.uint8).reshape(-1),
                                                   pa.uint8()), 3),
    ]
    return pa.Table.from_arrays(columns, schema=pa.schema([pa.field(n, t, nullable=False) for n, t in PARAM_FIELDS]))


def records_to_table(views: list, logits: Tensor, num_classes: int, sampler_version: int,
                     topk: int | None = None, seeded: str | None = None) -> pa.Table:
    """One row per view, with the teacher's fp16 output [len(views), num_classes] for it (all of it, or its
    ``topk`` largest values and their classes; top-1: the class alone); the views were drawn by sampler
    ``sampler_version``. ``seeded``:
    the views' ids and parameters are not stored, only ``seeded`` (the JSON that regenerates them, in this order)."""
    if tuple(logits.shape) != (len(views), num_classes):
        raise ValueError(f"logits of shape {tuple(logits.shape)} do not fit {len(views)} views x {num_classes} classes")
    stored = stored_logits(num_classes, topk)
    logits = logits.detach().to("cpu", torch.float16)
    classes = None
    if stored < num_classes:
        logits, classes = top_logits(logits, stored)
    schema = label_schema(num_classes, sampler_version, topk, seeded)
    columns = [] if seeded else param_table(views).columns
    if "logits" in schema.names:
        columns.append(pa.FixedSizeListArray.from_arrays(pa.array(logits.contiguous().numpy().reshape(-1),
                                                                  pa.float16()), stored))
    if classes is not None:
        kind = schema.field("classes").type.value_type
        columns.append(pa.FixedSizeListArray.from_arrays(pa.array(classes.numpy().reshape(-1), kind), stored))
    return pa.Table.from_arrays(columns, schema=schema)


def view_ranks(views: list) -> list[int]:
    """Each view's place among its image's views in view_id order: its view_id when the image keeps views 0..n-1
    (random pruning); metric pruning keeps other view_ids."""
    ranks, seen = [0] * len(views), Counter()
    for j in sorted(range(len(views)), key=lambda j: (views[j].image_id, views[j].view_id)):
        ranks[j] = seen[views[j].image_id]
        seen[views[j].image_id] += 1
    return ranks


def epoch_order(views: list, counts: Tensor | Mapping[int, int]) -> tuple[list[int], list[int]]:
    """Row order (by views of the image, view rank, image_id) and the row group sizes of equal (views, rank):
    epoch e of view cycling uses view e % n of each image, so it reads one row group per distinct n of a shard."""
    keys = [(int(counts[v.image_id]), rank) for v, rank in zip(views, view_ranks(views))]
    order = sorted(range(len(views)), key=lambda j: (*keys[j], views[j].image_id))
    sizes: list[int] = []
    for previous, j in zip([None, *order], order):
        if previous is not None and keys[previous] == keys[j]:
            sizes[-1] += 1
        else:
            sizes.append(1)
    return order, sizes


MIN_ROW_GROUP_BYTES = 64 << 10  # a row group costs ~350 B of footer and page headers: below this, merge groups


def coalesced(row_groups: list[int], row_bytes: float, min_bytes: int) -> list[int]:
    """Consecutive ``row_groups`` (sizes in rows) merged until each holds at least ``min_bytes`` of records (a short
    remainder joins the last group): an epoch then reads a few more rows than its own, in far fewer groups."""
    merged: list[int] = []
    for size in row_groups:
        if merged and merged[-1] * row_bytes < min_bytes:
            merged[-1] += size
        else:
            merged.append(size)
    if len(merged) > 1 and merged[-1] * row_bytes < min_bytes:
        last = merged.pop()
        merged[-1] += last
    return merged


def table_to_parquet(table: pa.Table, row_groups: list[int] | None = None) -> bytes:
    """Parquet bytes, zstd, with page checksums (range readers verify each page); ``row_groups``: their sizes in rows,
    merged to at least MIN_ROW_GROUP_BYTES each. No dictionaries or statistics: logits are not repeated values and
    nothing filters on them, and at 400x a pool's records are a few KB, where those bytes would count."""
    sizes = [s for s in (row_groups if row_groups is not None else [table.num_rows]) if s]
    sizes = coalesced(sizes, table.nbytes / max(1, table.num_rows), MIN_ROW_GROUP_BYTES)
    sink = pa.BufferOutputStream()
    with pq.ParquetWriter(sink, table.schema, compression="zstd", write_page_checksum=True, use_dictionary=False,
                          write_statistics=False) as writer:
        start = 0
        for size in sizes:
            writer.write_table(table.slice(start, size), row_group_size=size)
            start += size
    return sink.getvalue().to_pybytes()


def check_label_schema(schema: pa.Schema, where: str = "label table") -> None:
    """StorageError unless ``schema`` carries the supported label schema version, a class count and a sampler version."""
    meta = schema.metadata or {}
    found = meta.get(VERSION_KEY, b"missing").decode("utf-8", "replace")
    if found != str(LABEL_SCHEMA_VERSION):
        raise StorageError(f"{where} has label schema version {found}, which is not supported "
                           f"(supported: {LABEL_SCHEMA_VERSION}): re-run the relabel stage")
    missing = [k.decode() for k in (NUM_CLASSES_KEY, SAMPLER_KEY, TOPK_KEY) if not meta.get(k, b"").decode("utf-8", "replace").isdigit()]
    if missing:
        raise StorageError(f"{where} has label schema version {found} but no valid {' or '.join(missing)} in its "
                           "metadata: re-run the relabel stage")


def read_label_table(data: bytes) -> pa.Table:
    """A label table from Parquet bytes; StorageError unless its schema version is the supported one."""
    try:
        table = pq.read_table(pa.BufferReader(data))
    except (pa.ArrowException, OSError) as err:
        raise StorageError(f"label object is not a readable Parquet table: {str(err).splitlines()[0]}") from None
    check_label_schema(table.schema)
    return table


def sampler_version_of(table: pa.Table) -> int:
    """The version of the sampler that drew a (checked) label table's views."""
    return int((table.schema.metadata or {})[SAMPLER_KEY])


def topk_of(table: pa.Table) -> int:
    """The logits per record a (checked) label table stores."""
    return int((table.schema.metadata or {})[TOPK_KEY])


def _column_bytes(field: pa.Field) -> int:
    """Bytes of one row of a fixed-width column (a bool counts as 1)."""
    kind, width = (field.type.value_type, field.type.list_size) if pa.types.is_fixed_size_list(field.type) \
        else (field.type, 1)
    return max(1, kind.bit_width // 8) * width


def row_bytes(schema: pa.Schema) -> dict[str, int]:
    """One record's bytes in the paper's terms: fp16 logits, their class indices (top-k only) and the rest (ids and
    augmentation parameters)."""
    sizes = {name: _column_bytes(schema.field(name)) if name in schema.names else 0 for name in ("logits", "classes")}
    sizes["aug"] = sum(_column_bytes(f) for f in schema if f.name not in ("logits", "classes"))
    return sizes


def label_bytes(table: pa.Table) -> dict[str, int]:
    """Label storage in the paper's terms: fp16 logits, their class indices (top-k), augmentation parameters, and
    their total."""
    sizes = {key: table.num_rows * value for key, value in row_bytes(table.schema).items()}
    return {"logits": sizes["logits"], "index": sizes["classes"], "aug": sizes["aug"],
            "total": sizes["logits"] + sizes["classes"] + sizes["aug"]}
