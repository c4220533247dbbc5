"""The per-epoch label pool: bit-identical views, view cycling, reads of one epoch only, bounded memory, bad shards."""

from __future__ import annotations

import dataclasses

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from conftest import pool_items
from test_labels import (
    CLASSES,
    IPC,
    SIDE,
    make_images,
    normalize,
    relabel,
    tiny_teacher,
)
from torch.utils.data import DataLoader, DistributedSampler

from lpld_ray.config import RelabelConfig
from lpld_ray.data.label_shards import LabelShards
from lpld_ray.data.pool import ImageSource, LabelPool, ShardSampler
from lpld_ray.errors import StorageError
from lpld_ray.method.views import compose_view, image_id_of, sample_view
from lpld_ray.pipeline.estimate import label_record_bytes
from lpld_ray.store import label_table
from lpld_ray.store.codecs import encode_png
from lpld_ray.store.label_table import VERSION_KEY, table_to_parquet
from lpld_ray.store.layout import (
    IMAGES_STAGE,
    LABELS_OBJECT,
    LABELS_STAGE,
    image_object_name,
)
from lpld_ray.store.manifest import CorruptShard, ShardWriter, read_manifest

LABEL_REL = f"{LABELS_STAGE}/shard-00001/{LABELS_OBJECT}"


def commit_images(store, images: dict[int, torch.Tensor], ipc: int = IPC) -> None:
    """Every image of the run as the recover stage leaves them: one PNG per image, shard by class."""
    for c in sorted({i // ipc for i in images}):
        writer = ShardWriter(store, IMAGES_STAGE, f"shard-{c:05d}")
        for i in sorted(i for i in images if i // ipc == c):
            writer.put(image_object_name(c, i % ipc), encode_png(images[i]))
        writer.commit(0, {})


def open_pool(store, sampling: str = "cycle", cache_bytes: int = 1 << 20) -> LabelPool:
    return LabelPool(LabelShards(store), ImageSource(store, IPC, cache_bytes), SIDE, sampling=sampling, seed=3)


def relabelled(tmp_path, cfg: RelabelConfig, **kw):
    """One class shard (class 1) relabelled from a run whose images are all committed."""
    store, meta, rec, images, counts = relabel(tmp_path, cfg, [image_id_of(1, i, IPC) for i in range(IPC)], **kw)
    commit_images(store, images)
    return store, meta, rec, images, counts


@pytest.mark.parametrize("mix", ["none", "cutmix", "cutout"])
def test_pool_rebuilds_the_view_the_teacher_saw_bit_for_bit(tmp_path, mix):
    cfg = RelabelConfig(epochs=5, mix=mix, batch_size=7, crop_scale=(0.3, 1.0))
    teacher = tiny_teacher()
    bn_before = teacher[1].running_mean.clone()
    store, meta, rec, images, counts = relabelled(tmp_path, cfg, teacher=teacher)
    assert teacher.training and torch.equal(teacher[1].running_mean, bn_before)  # eval during relabel, mode restored
    order = [(i, v) for i in sorted(image_id_of(1, j, IPC) for j in range(IPC)) for v in range(int(counts[i]))]
    assert rec.seen().shape[0] == len(order) == meta["records"]  # only the kept views were made, each once
    seen = dict(zip(order, rec.seen()))  # what the teacher saw, in the order relabel made the views
    pool = open_pool(store)
    assert len(pool) == IPC
    touched = 0
    for epoch, x, y, view in pool_items(pool, cfg.epochs):
        assert view.view_id == epoch % int(counts[view.image_id])
        assert torch.equal(x, seen[(view.image_id, view.view_id)])
        assert view == sample_view(7, view.image_id, view.view_id, len(images), SIDE, cfg)
        with torch.no_grad():
            expect = teacher.eval()(normalize(x[None]))[0].half().float()
        assert y.dtype == torch.float32 and torch.allclose(y, expect, atol=2e-3)
        plain = compose_view(images[view.image_id], None, dataclasses.replace(view, mix=0), SIDE)
        box = view.mix_box
        if mix == "none":
            assert view.mix == 0 and box is None and torch.equal(x, plain)
        elif box is not None and box.height * box.width > 0:
            region = x[:, box.top:box.top + box.height, box.left:box.left + box.width]
            if mix == "cutout":
                assert torch.all(region == 0)
            else:
                assert view.partner_id != view.image_id and 0 < view.lam < 1
                touched += int(view.partner_id // IPC != 1 and not torch.equal(x, plain))
            touched += mix == "cutout"
    if mix != "none":
        assert touched > 0  # some views really were mixed (cutmix: with a partner of another class)


def spy_row_groups(monkeypatch) -> list[list[int]]:
    calls: list[list[int]] = []
    real = pq.ParquetFile.read_row_groups

    def spy(self, row_groups, *args, **kwargs):
        calls.append(list(row_groups))
        return real(self, row_groups, *args, **kwargs)

    monkeypatch.setattr(pq.ParquetFile, "read_row_groups", spy)
    return calls


def test_views_cycle_evenly_and_an_epoch_reads_one_row_group_per_view_count(tmp_path, monkeypatch):
    epochs = 10
    monkeypatch.setattr(label_table, "MIN_ROW_GROUP_BYTES", 0)  # one group per (views, view id), however small
    store, meta, _, _, counts = relabelled(tmp_path, RelabelConfig(epochs=epochs, compression=3.0, mix="cutmix"),
                                           images=make_images(classes=CLASSES, ipc=IPC))
    pool = open_pool(store)
    shard_counts = {int(counts[i]) for i in pool.image_ids}
    assert shard_counts == {3, 4}  # 40/3 views over 12 images: some images keep 3, some 4
    for i in range(len(pool)):
        used = [pool.view_index(i, e) for e in range(epochs)]
        hist = [used.count(v) for v in range(pool.views_of(i))]
        assert sum(hist) == epochs and max(hist) - min(hist) <= 1
    shards = LabelShards(store)
    pool = LabelPool(shards, ImageSource(store, IPC, 1 << 20), SIDE, seed=3)
    groups = len(shards.row_group_starts("shard-00001")) - 1
    assert groups == 7  # one row group per (views of the image, view id): 3 + 4
    calls = spy_row_groups(monkeypatch)
    for epoch in range(epochs):
        pool.set_epoch(epoch)
        assert len(calls[-1]) == 2  # the epoch's view of the 3-view images and of the 4-view images
    assert len({tuple(c) for c in calls}) > 2


def test_uniform_draws_are_seeded_and_serve_the_stored_row(tmp_path):
    store, *_ = relabelled(tmp_path, RelabelConfig(epochs=10, compression=3.0, mix="cutmix"))
    pool = open_pool(store, sampling="uniform")
    for i in range(len(pool)):
        drawn = [pool.view_index(i, e) for e in range(10)]
        assert all(0 <= d < pool.views_of(i) for d in drawn) and drawn == [pool.view_index(i, e) for e in range(10)]
    assert len({tuple(pool.view_index(i, e) for i in range(len(pool))) for e in range(10)}) > 1
    pool.set_epoch(3)
    x, y = pool[2]
    assert x.shape == (1, SIDE, SIDE) and y.shape == (CLASSES,) and y.dtype == torch.float32
    table = pq.read_table(store.uri(LABEL_REL))
    stored = torch.from_numpy(table.column("logits").combine_chunks().values.to_numpy().copy()).view(-1, CLASSES)
    assert torch.equal(y, stored[pool.row(2, 3)].float())


def test_uniform_draws_are_keyed_by_epoch_and_image_not_by_the_pool(tmp_path):
    from lpld_ray.method.rng import Stream, generator

    cfg = RelabelConfig(epochs=12, compression=2.0, mix="cutmix")
    images = make_images(classes=3, ipc=IPC)
    for c in range(3):
        store, *_ = relabel(tmp_path, cfg, [image_id_of(c, i, IPC) for i in range(IPC)], images=images,
                            shard=f"shard-{c:05d}")
    commit_images(store, images)
    whole = open_pool(store, sampling="uniform")
    one = LabelPool(LabelShards(store, ["shard-00002"]), ImageSource(store, IPC, 1 << 20), SIDE, "uniform", seed=3)
    offset = int(np.searchsorted(whole.image_ids, one.image_ids[0]))
    for epoch in range(6):
        for i in range(len(one)):
            image_id, n = int(one.image_ids[i]), one.views_of(i)
            assert one.view_index(i, epoch) == whole.view_index(offset + i, epoch)  # the same draw in any pool
            assert one.view_index(i, epoch) == int(generator(Stream.VIEW_DRAW, 3, epoch, image_id).integers(n))
    counts = np.bincount([whole.view_index(0, e) for e in range(600)], minlength=whole.views_of(0))
    assert counts.min() > 600 / whole.views_of(0) * 0.7  # every stored view is drawn, about equally often


def test_a_rank_holds_only_its_records_and_images_within_the_cache(tmp_path):
    store, *_ = relabelled(tmp_path, RelabelConfig(epochs=8, compression=2.0, mix="cutmix"),
                           images=make_images(classes=CLASSES, ipc=IPC))
    one_image = SIDE * SIDE  # uint8, one channel
    pool = open_pool(store, cache_bytes=3 * one_image)
    seen: dict[int, list[int]] = {}
    for rank in range(2):
        sampler = DistributedSampler(pool, num_replicas=2, rank=rank, shuffle=True, seed=3)
        sampler.set_epoch(5)
        mine = list(sampler)
        pool.set_epoch(5, mine)
        memory = pool.memory_bytes()
        assert pool._records is not None and len(pool._records.ids) == len(set(mine)) == len(pool) // 2
        assert memory["epoch_records"] == pool._records.nbytes == len(set(mine)) * label_record_bytes(CLASSES)
        assert memory["index"] == 36 * len(pool) + 4 * int(pool.index.counts.sum())  # as lpld_ray.pipeline.estimate states it
        assert memory["image_cache"] <= 3 * one_image
        others = sorted(set(range(len(pool))) - set(mine))
        with pytest.raises(IndexError, match="set_epoch"):
            pool[others[0]]
        for i in mine:
            x, y = pool[i]
            assert pool.images.cached_bytes <= 3 * one_image
            seen.setdefault(i, []).append(rank)
    assert sorted(seen) == list(range(len(pool))) and all(len(r) == 1 for r in seen.values())


def test_loader_workers_give_the_same_batches_as_the_main_process(tmp_path):
    store, *_ = relabelled(tmp_path, RelabelConfig(epochs=6, compression=2.0, mix="cutmix"))
    pool = open_pool(store, cache_bytes=2 * SIDE * SIDE)  # the forked workers read most images themselves
    batches = {}
    for workers in (0, 2):
        pool.set_epoch(4)
        loader = DataLoader(pool, batch_size=3, num_workers=workers)
        batches[workers] = [(x.clone(), y.clone()) for x, y in loader]
    assert len(batches[0]) == len(batches[2]) == 2
    for (x0, y0), (x2, y2) in zip(batches[0], batches[2]):
        assert torch.equal(x0, x2) and torch.equal(y0, y2)


def test_image_cache_reads_on_demand_and_evicts_least_recent(tmp_path):
    images = make_images()
    store = relabelled(tmp_path, RelabelConfig(epochs=2))[0]
    source = ImageSource(store, IPC, cache_bytes=3 * SIDE * SIDE)
    assert source.warm(range(10)) == 3 and source.cached_bytes == 3 * SIDE * SIDE
    for i in (5, 6, 0):
        assert torch.equal(source.get(i), images[i])
    assert list(source._cache) == [5, 6, 0]  # 0, 1, 2 warmed; 5 and 6 evicted 0 and 1; 0 read again evicted 2
    assert source.warm([6, 7]) == 1 and list(source._cache) == [6, 0, 7]  # room made by dropping an unused image
    roomy = ImageSource(store, IPC, cache_bytes=100 * SIDE * SIDE)
    assert roomy.warm(range(4)) == 4 and roomy.warm(range(4, 8)) == 4 and len(roomy._cache) == 8  # kept while there is room
    assert roomy.warm(range(8)) == 0
    with pytest.raises(StorageError, match="image 999"):
        source.get(999)


def recommit_labels(store, data: bytes) -> None:
    """Replace the label object of shard-00001 and commit a manifest that matches it (as if it were written bad)."""
    meta = read_manifest(store, LABELS_STAGE, "shard-00001").meta
    writer = ShardWriter(store, LABELS_STAGE, "shard-00001")
    writer.put(LABELS_OBJECT, data)
    writer.commit(seed=0, meta=meta)


def corrupt_logits_page(store) -> bytes:
    path = store.uri(LABEL_REL)
    meta = pq.ParquetFile(path).metadata
    logits = meta.row_group(0).column(meta.num_columns - 1)
    data = bytearray(open(path, "rb").read())
    data[logits.data_page_offset + logits.total_compressed_size // 2] ^= 0x10
    return bytes(data)


def test_a_label_object_altered_after_its_commit_is_caught_at_its_first_open(tmp_path):
    store, *_ = relabelled(tmp_path, RelabelConfig(epochs=6, compression=1.0, mix="cutmix"))
    store.write_bytes(LABEL_REL, corrupt_logits_page(store))
    with pytest.raises(CorruptShard, match="labels/shard-00001/labels.parquet: sha256 mismatch") as err:
        open_pool(store)  # before any record is used
    assert (err.value.stage, err.value.shard) == (LABELS_STAGE, "shard-00001")


def test_a_corrupted_label_page_fails_the_range_read_with_one_line(tmp_path):
    """Bytes bad before the commit (the manifest matches them): Parquet's page checksums still catch them."""
    store, *_ = relabelled(tmp_path, RelabelConfig(epochs=6, compression=1.0, mix="cutmix"))
    recommit_labels(store, corrupt_logits_page(store))
    pool = open_pool(store)  # the index reads image_id and view_id only: their pages are intact
    with pytest.raises(StorageError) as err:
        pool.set_epoch(0)
    assert "shard-00001" in str(err.value) and "relabel" in str(err.value) and "\n" not in str(err.value)


def test_an_unknown_label_schema_version_is_refused_by_the_loader(tmp_path):
    store, *_ = relabelled(tmp_path, RelabelConfig(epochs=2))
    table = pq.read_table(store.uri(LABEL_REL))
    recommit_labels(store, table_to_parquet(table.replace_schema_metadata({**table.schema.metadata, VERSION_KEY: b"7"})))
    with pytest.raises(StorageError, match="label shard 'shard-00001' has label schema version 7, which is not supported"):
        open_pool(store)


def test_split_or_duplicate_views_are_refused(tmp_path):
    from lpld_ray.data.label_shards import build_index

    ok = build_index({"a": (np.array([0, 0, 1]), np.array([1, 0, 0])), "b": (np.array([2]), np.array([0]))})
    assert ok.counts.tolist() == [2, 1, 1] and ok.rows_of(0).tolist() == [1, 0]
    with pytest.raises(StorageError, match="image 0"):
        build_index({"a": (np.array([0, 0]), np.array([0, 0]))})
    with pytest.raises(StorageError, match="image 1"):
        build_index({"a": (np.array([1]), np.array([0])), "b": (np.array([1]), np.array([1]))})


@pytest.mark.parametrize("world", [1, 2, 3, 5])
def test_shard_sampler_covers_every_image_once_with_equal_ranks(world):
    shard_of = np.repeat(np.arange(7), [10, 10, 10, 10, 10, 10, 4])  # 64 images in 7 shards, the last one short
    orders = {}
    for epoch in (0, 1):
        samplers = [ShardSampler(shard_of, world, r, seed=3) for r in range(world)]
        for sampler in samplers:
            sampler.set_epoch(epoch)
        ranks = [list(s) for s in samplers]
        assert {len(r) for r in ranks} == {len(samplers[0])} == {-(-64 // world)}  # DDP needs equal batch counts
        assignment = samplers[0].assignment()
        assert sorted(np.concatenate(assignment).tolist()) == list(range(64))  # each image to exactly one rank
        for r, indices in enumerate(ranks):
            assert set(indices) == set(assignment[r].tolist()) and indices == list(samplers[r])  # padding repeats its own
            assert len(set(shard_of[indices].tolist())) <= -(-7 // world) + 2  # whole shards, cut at most at both ends
        orders[epoch] = ranks
    assert orders[0] != orders[1]
    again = ShardSampler(shard_of, world, world - 1, seed=3)
    again.set_epoch(1)
    assert list(again) == orders[1][world - 1]  # a rank's order depends only on (seed, epoch, rank)
    other = ShardSampler(shard_of, world, world - 1, seed=4)
    other.set_epoch(1)
    assert list(other) != list(again)  # and on the seed


def test_shard_sampler_lets_a_rank_read_only_its_shards(tmp_path, monkeypatch):
    cfg = RelabelConfig(epochs=4, compression=2.0, mix="cutmix")
    images = make_images(classes=4, ipc=IPC)
    store = None
    for c in range(4):
        store, *_ = relabel(tmp_path, cfg, [image_id_of(c, i, IPC) for i in range(IPC)], images=images,
                            shard=f"shard-{c:05d}")
    commit_images(store, images)
    pool = open_pool(store)
    assert len(pool.index.shards) == 4
    calls = spy_row_groups(monkeypatch)
    touched = {}
    for kind in ("global", "shard"):
        from lpld_ray.pipeline.student import image_sampler

        sampler = image_sampler(pool, kind, 2, 0, seed=1)
        sampler.set_epoch(2)
        calls.clear()
        pool.set_epoch(2, list(sampler))
        touched[kind] = len(calls)
        for i in set(sampler):
            pool[i]
    assert touched == {"global": 4, "shard": 2}  # label shards read by rank 0 of 2
