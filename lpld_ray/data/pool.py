"""The label pool as a per-epoch Dataset: each epoch reads only its own views' records and images, in bounded memory."""

from __future__ import annotations

from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from typing import Iterable, Iterator, Sequence

import numpy as np
import pyarrow as pa
import torch
from torch import Tensor
from torch.utils.data import Dataset, Sampler

from lpld_ray.config import VIEW_SAMPLING
from lpld_ray.data.label_shards import LabelShards
from lpld_ray.errors import StorageError
from lpld_ray.method.augment import CropBox
from lpld_ray.method.rng import Stream, generator
from lpld_ray.method.views import ViewParams, compose_view
from lpld_ray.store.codecs import decode_png_uint8
from lpld_ray.store.layout import (
    IMAGES_STAGE,
    image_id_from_name,
)
from lpld_ray.store.manifest import Manifest, read_manifests, read_object, shard_folders
from lpld_ray.store.storage import Store

BOX_FIELDS = ("crop", "partner_crop", "mix_box")


# ----------------------------------------------------------------------------- one epoch's records


class EpochRecords:
    """The records one epoch uses on this rank, as column arrays: view parameters and fp16 teacher outputs."""

    def __init__(self, table: pa.Table, num_classes: int) -> None:
        col = {name: table.column(name).combine_chunks() for name in table.column_names}
        self.ids = col["image_id"].to_numpy()
        self.view_ids = col["view_id"].to_numpy()
        self.flip = col["flip"].to_numpy(zero_copy_only=False)
        self.mix = col["mix"].to_numpy()
        self.partner = col["partner_id"].to_numpy()
        self.partner_flip = col["partner_flip"].to_numpy(zero_copy_only=False)
        self.lam = col["lam"].to_numpy()
        self.fill = col["fill"].values.to_numpy().reshape(-1, 3)
        self.boxes = {n: col[n].values.to_numpy().reshape(-1, 4) for n in BOX_FIELDS}
        stored = table.schema.field("logits" if "logits" in col else "classes").type.list_size  # classes, or k
        self.classes = col["classes"].values.to_numpy().reshape(-1, stored) if "classes" in col else None
        self.logits = col["logits"].values.to_numpy().reshape(-1, stored) if "logits" in col \
            else np.zeros((table.num_rows, stored), np.float16)  # top-1 stores the class alone: its target is one-hot
        self.num_classes = num_classes

    @property
    def nbytes(self) -> int:
        arrays = [self.ids, self.view_ids, self.flip, self.mix, self.partner, self.partner_flip, self.lam, self.fill,
                  self.logits, *([] if self.classes is None else [self.classes])]
        return sum(a.nbytes for a in arrays) + sum(b.nbytes for b in self.boxes.values())

    def partners(self) -> np.ndarray:
        return self.partner[self.mix == 1]

    def view(self, j: int) -> ViewParams:
        crop, partner_crop, box = (CropBox(*map(int, self.boxes[n][j])) for n in BOX_FIELDS)
        mix = int(self.mix[j])
        return ViewParams(int(self.ids[j]), int(self.view_ids[j]), crop, bool(self.flip[j]), mix, int(self.partner[j]),
                          partner_crop if mix == 1 else None, bool(self.partner_flip[j]), box if mix else None,
                          float(self.lam[j]), tuple(int(v) for v in self.fill[j]))

    def target(self, j: int) -> Tensor:
        """The teacher logits of record ``j`` over every class; a top-k record's other classes are -inf, which the
        KD target's softmax turns into probability 0."""
        if self.classes is None:
            return torch.from_numpy(self.logits[j].astype(np.float32))
        full = np.full(self.num_classes, -np.inf, dtype=np.float32)
        full[self.classes[j].astype(np.int64)] = self.logits[j]
        return torch.from_numpy(full)


# ----------------------------------------------------------------------------- images, cached within a budget


class ImageSource:
    """Decoded images (uint8) by run-wide id, read and sha256-checked from the images stage on demand, kept in an
    LRU cache of at most ``cache_bytes``; safe to use after fork and to pickle (the Store reopens its filesystem)."""

    def __init__(self, store: Store, ipc: int, cache_bytes: int, threads: int = 8) -> None:
        self._store = store
        self.cache_bytes, self.threads = int(cache_bytes), int(threads)
        self._where: dict[int, tuple[str, str]] = {}
        self._manifests: dict[str, Manifest] = {}
        for shard, manifest in read_manifests(store, IMAGES_STAGE, shard_folders(store, IMAGES_STAGE)).items():
            if manifest is None:
                raise StorageError(f"images shard '{shard}' has no manifest: run the recover stage")
            self._manifests[shard] = manifest
            self._where.update({image_id_from_name(e.name, ipc): (shard, e.name) for e in manifest.objects})
        self._cache: OrderedDict[int, Tensor] = OrderedDict()
        self.cached_bytes, self.image_bytes = 0, 0

    def __contains__(self, image_id: int) -> bool:
        return int(image_id) in self._where

    def _read(self, image_id: int) -> Tensor:
        if image_id not in self._where:
            raise StorageError(f"image {image_id} is not in the images stage (a CutMix partner of the label pool?): "
                               "re-run the recover stage")
        shard, name = self._where[image_id]
        return decode_png_uint8(read_object(self._store, IMAGES_STAGE, shard, name, self._manifests[shard]))

    def _keep(self, image_id: int, image: Tensor) -> None:
        size = self.image_bytes = image.numel()  # uint8
        while self._cache and self.cached_bytes + size > self.cache_bytes:
            self.cached_bytes -= self._evict()
        if size <= self.cache_bytes:
            self._cache[image_id] = image
            self.cached_bytes += size

    def _evict(self) -> int:
        return self._cache.popitem(last=False)[1].numel()  # uint8: one byte per value

    def get(self, image_id: int) -> Tensor:
        """The image as decode_png gives it: [C,H,W] float in [0,1]."""
        image_id = int(image_id)
        image = self._cache.get(image_id)
        if image is None:
            image = self._read(image_id)
            self._keep(image_id, image)
        else:
            self._cache.move_to_end(image_id)
        return image.float() / 255.0

    def warm(self, image_ids: Iterable[int]) -> int:
        """Read the given images not yet cached, in threads, as far as the cache allows (making room by dropping
        images not in ``image_ids``, least recent first); returns how many were read."""
        wanted = [int(i) for i in dict.fromkeys(image_ids)]
        missing = [i for i in wanted if i not in self._cache]
        read = 0
        if missing and not self.image_bytes:  # learn the decoded size from one image
            self._keep(missing[0], self._read(missing[0]))
            missing, read = missing[1:], 1
        keep = set(wanted)
        unused = iter([i for i in self._cache if i not in keep])
        while self.cached_bytes + len(missing) * self.image_bytes > self.cache_bytes:
            drop = next(unused, None)
            if drop is None:
                break
            self.cached_bytes -= self._cache.pop(drop).numel()
        room = max(0, (self.cache_bytes - self.cached_bytes) // max(1, self.image_bytes))
        missing = missing[:room]  # never read more than the cache keeps: the reads are held until they are stored
        with ThreadPoolExecutor(self.threads) as pool:
            for image_id, image in zip(missing, pool.map(self._read, missing), strict=True):
                self._keep(image_id, image)
        return read + len(missing)


# ----------------------------------------------------------------------------- the Dataset


class LabelPool(Dataset):
    """Each epoch, every image once, through one of its stored views, with the teacher's output for that view.

    ``sampling="cycle"``: image i with n_i views uses view ``epoch % n_i``, so over E epochs each view is used
    floor(E/n_i) or ceil(E/n_i) times (views are independent draws, so a fixed order adds no bias), and the relabel
    stage stores rows so that one epoch reads one row group per distinct n_i of a shard. ``"uniform"``: a draw with
    replacement from the stream keyed by (VIEW_DRAW, seed, epoch, image id), the paper's ablation. Call
    :meth:`set_epoch` with this rank's sampler indices before each epoch: only their records and images are read.
    """

    def __init__(self, shards: LabelShards, images: ImageSource, size: int, sampling: str = "cycle", seed: int = 0) -> None:
        if sampling not in VIEW_SAMPLING:
            raise ValueError(f"bad view sampling {sampling!r} (allowed: one of {', '.join(VIEW_SAMPLING)})")
        self.shards, self.images, self.size, self.sampling, self.seed = shards, images, int(size), sampling, int(seed)
        self.index = shards.index()
        self.num_classes = shards.num_classes
        missing = [int(i) for i in self.index.image_ids if int(i) not in images]
        if missing:
            raise StorageError(f"label pool needs {len(missing)} image(s) not in the images stage, e.g. image id {missing[0]}")
        self.epoch = -1
        self._slot = np.full(len(self), -1, np.int64)
        self._records: EpochRecords | None = None

    def __len__(self) -> int:
        return len(self.index.image_ids)

    @property
    def image_ids(self) -> np.ndarray:
        return self.index.image_ids

    def views_of(self, i: int) -> int:
        return int(self.index.counts[i])

    def view_index(self, i: int, epoch: int) -> int:
        """Which of image i's stored views (its n_i views in view_id order: 0..n_i-1) ``epoch`` uses."""
        n = self.views_of(i)
        if self.sampling == "cycle":
            return int(epoch) % n
        return int(generator(Stream.VIEW_DRAW, self.seed, int(epoch), int(self.index.image_ids[i])).integers(n))

    def row(self, i: int, epoch: int) -> int:
        """The row of its shard's table that image i uses in ``epoch``."""
        return int(self.index.rows_of(i)[self.view_index(i, epoch)])

    def set_epoch(self, epoch: int, indices: Sequence[int] | None = None) -> None:
        """Read the records of ``epoch`` for ``indices`` (all images when None) and warm their images' cache."""
        wanted = np.unique(np.arange(len(self)) if indices is None else np.asarray(list(indices), np.int64))
        by_shard = self.index.shard_of[wanted]
        order = [wanted[by_shard == s] for s in np.unique(by_shard)]
        reads = [(self.index.shards[self.index.shard_of[chosen[0]]],
                  np.array([self.row(int(i), epoch) for i in chosen], np.int64)) for chosen in order]
        with ThreadPoolExecutor(self.images.threads) as pool:  # pyarrow decodes without the GIL; S3 reads overlap
            tables = list(pool.map(lambda read: self.shards.read_rows(*read), reads))
        self._records = None  # drop the last epoch's arrays before the new ones are built
        self._records = EpochRecords(pa.concat_tables(tables), self.num_classes)
        self._slot.fill(-1)
        self._slot[np.concatenate(order)] = np.arange(len(wanted))
        self.epoch = int(epoch)
        self.images.warm([*self.index.image_ids[wanted].tolist(), *self._records.partners().tolist()])

    def memory_bytes(self) -> dict[str, int]:
        """What this pool holds now: the index, this epoch's records, the image cache."""
        records = self._records.nbytes if self._records is not None else 0
        return {"index": self.index.nbytes + self._slot.nbytes, "epoch_records": records,
                "image_cache": self.images.cached_bytes}

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        j = int(self._slot[i]) if self._records is not None else -1
        if j < 0:
            raise IndexError(f"image {i} was not read for epoch {self.epoch}: pass this rank's sampler indices to set_epoch")
        view = self._records.view(j)
        partner = self.images.get(view.partner_id) if view.mix == 1 else None
        return compose_view(self.images.get(view.image_id), partner, view, self.size), self._records.target(j)


# ----------------------------------------------------------------------------- a sampler that keeps reads local


class ShardSampler(Sampler[int]):
    """Each epoch, whole label shards to each rank (a seeded shuffle, then the rank with the fewest images takes the
    next shard), cut into equal runs of ceil(N/W) and shuffled within the rank: every image once per epoch (a few
    repeated to even the ranks, as DistributedSampler pads), and a rank reads about N/W records instead of N.
    Its batches mix the classes of its own shards only, so use it where a rank holds many shards."""

    def __init__(self, shard_of: np.ndarray, num_replicas: int, rank: int, seed: int = 0) -> None:
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is not in [0, {num_replicas})")
        self.shard_of, self.num_replicas, self.rank, self.seed, self.epoch = shard_of, num_replicas, rank, seed, 0
        self.num_samples = -(-len(shard_of) // num_replicas)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.num_samples

    def assignment(self) -> list[np.ndarray]:
        """The image indices of every rank this epoch (the same on every rank)."""
        rng = generator(Stream.SHARD_ASSIGN, self.seed, self.epoch)
        members = [np.flatnonzero(self.shard_of == s) for s in range(int(self.shard_of.max()) + 1)]
        loads, owned = np.zeros(self.num_replicas, np.int64), [[] for _ in range(self.num_replicas)]
        for s in rng.permutation(len(members)):
            r = int(np.argmin(loads))
            owned[r].append(members[s])
            loads[r] += len(members[s])
        flat = np.concatenate([np.concatenate(o) if o else np.empty(0, np.int64) for o in owned])
        bounds = np.linspace(0, len(flat), self.num_replicas + 1).round().astype(int)
        return [flat[bounds[r] : bounds[r + 1]] for r in range(self.num_replicas)]

    def __iter__(self) -> Iterator[int]:
        mine = self.assignment()[self.rank]
        mine = generator(Stream.SHARD_ORDER, self.seed, self.epoch, self.rank).permutation(mine)
        return iter(np.resize(mine if len(mine) else np.arange(len(self.shard_of)), self.num_samples).tolist())
