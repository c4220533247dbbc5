"""Where every view of the label pool is: the index of image and view ids, and range reads of the label shards."""

from __future__ import annotations

import threading
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from lpld_ray.data.seeded import SeededViews
from lpld_ray.errors import StorageError
from lpld_ray.method.rng import SAMPLER_VERSION
from lpld_ray.store.label_table import NUM_CLASSES_KEY, SAMPLER_KEY, check_label_schema, seeded_views_of
from lpld_ray.store.layout import LABELS_OBJECT, LABELS_STAGE
from lpld_ray.store.manifest import check_object, list_shards, read_manifests
from lpld_ray.store.storage import Store

INDEX_COLUMNS = ["image_id", "view_id"]


# ----------------------------------------------------------------------------- where every view is


@dataclass(frozen=True)
class PoolIndex:
    """Per image (sorted run-wide ids): its label shard, and the table rows of its views in view_id order."""

    shards: tuple[str, ...]
    image_ids: np.ndarray  # int64 [N], sorted
    shard_of: np.ndarray  # int32 [N]: index into shards
    first: np.ndarray  # int64 [N]: where the image's rows start in view_rows
    counts: np.ndarray  # int64 [N]: views stored per image
    view_rows: np.ndarray  # int32 [R]: row in its shard's table

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in (self.image_ids, self.shard_of, self.first, self.counts, self.view_rows))

    def rows_of(self, i: int) -> np.ndarray:
        start = int(self.first[i])
        return self.view_rows[start : start + int(self.counts[i])]


def build_index(columns: dict[str, tuple[np.ndarray, np.ndarray]]) -> PoolIndex:
    """The index from each shard's image_id and view_id columns; every image in one shard, its view_ids distinct
    (0..n-1 under random pruning, any E-view subset under metric pruning)."""
    image_id = np.concatenate([ids for ids, _ in columns.values()]).astype(np.int64)
    view_id = np.concatenate([views for _, views in columns.values()]).astype(np.int64)
    row = np.concatenate([np.arange(len(ids), dtype=np.int32) for ids, _ in columns.values()])
    shard = np.concatenate([np.full(len(ids), s, np.int32) for s, (ids, _) in enumerate(columns.values())])
    order = np.lexsort((view_id, image_id))
    image_ids, first, counts = np.unique(image_id[order], return_index=True, return_counts=True)
    repeated = np.zeros(len(order), bool)
    repeated[1:] = (image_id[order][1:] == image_id[order][:-1]) & (view_id[order][1:] == view_id[order][:-1])
    spread = shard[order] != np.repeat(shard[order][first], counts)
    if np.any(repeated) or np.any(spread):
        bad = int(image_id[order][np.argmax(repeated | spread)])
        raise StorageError(f"label pool: image {bad} has duplicate or split views: re-run the relabel stage")
    return PoolIndex(tuple(columns), image_ids, shard[order][first], first, counts, row[order])


# ----------------------------------------------------------------------------- range reads of label shards


class LabelShards:
    """The committed label shards of a store, read by range: two columns for the index, row groups for an epoch; each
    shard's object is checked against its manifest (size, sha256) when first opened, so no damaged label is used."""

    def __init__(self, store: Store, names: Sequence[str] | None = None) -> None:
        self.store = store
        self.names = list(list_shards(store, LABELS_STAGE) if names is None else names)
        if not self.names:
            raise StorageError("no committed label shards: run the relabel stage")
        self._manifests = read_manifests(store, LABELS_STAGE, self.names)  # each object checked at its first open
        self._meta: dict[str, pq.FileMetaData] = {}
        self._seeded: dict[str, tuple[SeededViews, np.ndarray, np.ndarray]] = {}  # regenerated views, their ids
        self.num_classes = 0
        self.bytes_read = 0  # compressed bytes of the row groups decoded so far
        self._lock = threading.Lock()

    @contextmanager
    def _file(self, name: str) -> Iterator[pq.ParquetFile]:
        rel = f"{LABELS_STAGE}/{name}/{LABELS_OBJECT}"
        if name not in self._meta:  # the first open: the whole object against its manifest, once (then by range)
            manifest = self._manifests.get(name)
            if manifest is None:
                raise StorageError(f"{self.store.uri(f'{LABELS_STAGE}/{name}')} has no valid manifest: run the "
                                   "relabel stage")
            check_object(self.store, LABELS_STAGE, name, LABELS_OBJECT, manifest)
        with self.store.open(rel) as handle:
            try:
                parquet = pq.ParquetFile(handle, metadata=self._meta.get(name), page_checksum_verification=True)
                if name not in self._meta:
                    self._first_open(name, parquet)
                yield parquet
            except (pa.ArrowException, OSError) as err:
                raise StorageError(f"label shard '{name}' is not readable ({str(err).splitlines()[0]}): "
                                   "re-run the relabel stage") from None

    def _first_open(self, name: str, parquet: pq.ParquetFile) -> None:
        """Check a shard's schema; keep its footer, and a seeded shard's regenerated view ids."""
        schema = parquet.schema_arrow
        check_label_schema(schema, f"label shard '{name}'")
        seeded = seeded_views_of(schema)
        if seeded is not None:
            drawn_by = int(schema.metadata[SAMPLER_KEY])
            if drawn_by != SAMPLER_VERSION:
                raise StorageError(f"label shard '{name}' is seeded by view sampler version {drawn_by}"
                                   f", which this lpld_ray cannot redraw (it has {SAMPLER_VERSION}): re-run the "
                                   "relabel stage")
            views = SeededViews.from_json(seeded)
            self._seeded[name] = (views, *views.ids())
        self._meta[name] = parquet.metadata
        self.num_classes = int(schema.metadata[NUM_CLASSES_KEY])

    def index(self) -> PoolIndex:
        columns = {}
        for name in self.names:
            with self._file(name) as parquet:
                if name in self._seeded:  # no id columns: the views are drawn again from the seed
                    columns[name] = self._seeded[name][1:]
                    continue
                table = parquet.read(columns=INDEX_COLUMNS)
            columns[name] = (table.column("image_id").to_numpy(), table.column("view_id").to_numpy())
        return build_index(columns)

    def row_group_starts(self, name: str) -> np.ndarray:
        """Row number at which each row group of shard ``name`` starts, and the row count last."""
        if name not in self._meta:
            with self._file(name):  # reads the footer once
                pass
        meta = self._meta[name]
        return np.cumsum([0] + [meta.row_group(g).num_rows for g in range(meta.num_row_groups)])

    def read_rows(self, name: str, rows: np.ndarray) -> pa.Table:
        """Rows ``rows`` of shard ``name``, in that order, decoding only the row groups that hold them."""
        starts = self.row_group_starts(name)
        group_of_row = np.searchsorted(starts, rows, side="right") - 1
        groups = np.unique(group_of_row)
        with self._file(name) as parquet:
            table = parquet.read_row_groups(groups.tolist())
        meta = self._meta[name]
        read = sum(meta.row_group(int(g)).column(c).total_compressed_size for g in groups for c in range(meta.num_columns))
        with self._lock:  # set_epoch reads shards from several threads
            self.bytes_read += read
        sizes = starts[groups + 1] - starts[groups]
        base = np.concatenate([[0], np.cumsum(sizes)[:-1]])
        positions = base[np.searchsorted(groups, group_of_row)] + rows - starts[group_of_row]
        table = table.take(pa.array(positions, pa.int64()))
        if name not in self._seeded:
            return table
        views, image_ids, view_ids = self._seeded[name]
        params = views.params(image_ids[rows], view_ids[rows])
        return pa.Table.from_arrays([*params.columns, *table.columns], names=[*params.column_names, *table.column_names])
