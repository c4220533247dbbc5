"""Relabelling: view counts, seeded views, Parquet records and their schema, the images a shard reads."""

from __future__ import annotations

import dataclasses

import pyarrow as pa
import pytest
import torch
from torch import nn

from lpld_ray.config import RelabelConfig
from lpld_ray.errors import ConfigError, StorageError
from lpld_ray.method.rng import SAMPLER_VERSION
from lpld_ray.method.views import (
    image_id_of,
    plan_views,
    sample_view,
    view_counts,
)
from lpld_ray.pipeline.labels import (
    RelabelTask,
    current_labels,
    read_label_shard,
    relabel_shard,
    relabel_task,
)
from lpld_ray.store.label_table import (
    LABEL_SCHEMA_VERSION,
    SAMPLER_KEY,
    VERSION_KEY,
    label_bytes,
    read_label_table,
    sampler_version_of,
    table_to_parquet,
)
from lpld_ray.store.layout import LABELS_OBJECT, LABELS_STAGE
from lpld_ray.store.manifest import MANIFEST_NAME, read_manifest, verify_shard
from lpld_ray.store.storage import Store

CLASSES, IPC, SIDE = 3, 4, 16


def make_images(classes: int = CLASSES, ipc: int = IPC, side: int = SIDE, seed: int = 0) -> dict[int, torch.Tensor]:
    """Random 8-bit images as decoded PNGs would be: [1,side,side] in [0,1]."""
    gen = torch.Generator().manual_seed(seed)
    return {image_id_of(c, i, ipc): torch.randint(0, 256, (1, side, side), generator=gen).float() / 255
            for c in range(classes) for i in range(ipc)}


def tiny_teacher(num_classes: int = CLASSES) -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                        nn.Flatten(), nn.Linear(4, num_classes))
    with torch.no_grad():
        net[1].running_mean.uniform_(-0.1, 0.1)
        net[1].running_var.uniform_(0.5, 1.5)
    return net


def normalize(x: torch.Tensor) -> torch.Tensor:
    return (x - 0.5) / 0.25


class Recorder:
    """A normalize_fn that keeps every batch the teacher is given."""

    def __init__(self) -> None:
        self.batches: list[torch.Tensor] = []

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.batches.append(x.clone())
        return normalize(x)

    def seen(self) -> torch.Tensor:
        return torch.cat(self.batches)


def relabel(tmp_path, cfg: RelabelConfig, ids: list[int], images=None, teacher=None, seed: int = 7, shard="shard-00001",
            num_images: int | None = None):
    images = images if images is not None else make_images()
    teacher = teacher if teacher is not None else tiny_teacher()
    rec = Recorder()
    store = Store(str(tmp_path / "run"))
    counts = view_counts(num_images or len(images), cfg.epochs, cfg.compression, seed)
    size = int(next(iter(images.values())).shape[-1])
    if num_images is None and (cfg.params == "seeded" or cfg.prune_by != "random"):  # as the shard actor does
        task = relabel_task(shard, ids, cfg, seed, len(images) // CLASSES, CLASSES, size)
    else:
        task = RelabelTask(shard, tuple(ids), tuple(plan_views(seed, ids, counts, cfg, size)), cfg, seed, CLASSES)
    meta = relabel_shard(store, teacher, rec, images, task, "cpu")
    return store, meta, rec, images, counts


def test_compression_keeps_one_in_k_views_and_label_bytes(tmp_path):
    n, epochs = 60, 300
    images = make_images(classes=CLASSES, ipc=n // CLASSES, side=8)
    teacher = nn.Sequential(nn.Flatten(), nn.Linear(64, CLASSES))
    metas = {}
    for kk in (1, 10, 40):
        cfg = RelabelConfig(epochs=epochs, compression=kk, mix="none", flip=False, batch_size=2048)
        _, metas[kk], *_ = relabel(tmp_path / f"k{kk}", cfg, list(range(n)), images=images, teacher=teacher)
        expected = n * epochs / kk
        assert abs(int(view_counts(n, epochs, kk, 7).sum()) - expected) <= 0.01 * expected
        assert abs(metas[kk]["records"] - expected) <= 0.01 * expected
    for k in (10, 40):
        ratio = metas[1]["logit_bytes"] / metas[k]["logit_bytes"]
        assert abs(ratio - k) <= 0.01 * k
        assert metas[k]["logit_bytes"] == metas[k]["records"] * CLASSES * 2


def test_view_counts_are_seeded_and_shard_slices_sum_to_the_total():
    a, b = view_counts(60, 7, 3.0, seed=1), view_counts(60, 7, 3.0, seed=1)
    assert a.dtype == torch.int64 and torch.equal(a, b)
    assert not torch.equal(a, view_counts(60, 7, 3.0, seed=2))
    assert int(a.sum()) == 140 and set(a.tolist()) == {2, 3}
    slices = [view_counts(60, 7, 3.0, seed=1)[s:s + 20] for s in range(0, 60, 20)]  # each shard on its own
    assert sum(int(s.sum()) for s in slices) == int(a.sum())
    assert view_counts(10, 5, 40.0, seed=0).tolist() == [1] * 10  # k > E: floored at one view per image


def test_views_do_not_depend_on_call_order_and_partners_are_other_images():
    cfg = RelabelConfig(mix="cutmix")
    first = [sample_view(3, i, v, 12, SIDE, cfg) for i in range(12) for v in range(3)]
    again = [sample_view(3, i, v, 12, SIDE, cfg) for i in reversed(range(12)) for v in range(3)][::-1]
    assert sorted(first, key=lambda v: (v.image_id, v.view_id)) == sorted(again, key=lambda v: (v.image_id, v.view_id))
    assert sample_view(4, 0, 0, 12, SIDE, cfg) != sample_view(3, 0, 0, 12, SIDE, cfg)
    many = [sample_view(5, i, v, 4, SIDE, cfg) for i in range(4) for v in range(60)]
    assert all(v.partner_id != v.image_id and 0 <= v.partner_id < 4 for v in many)
    for i in range(4):  # uniform over the 3 other images
        assert {v.partner_id for v in many if v.image_id == i} == set(range(4)) - {i}


def test_cutmix_lambda_is_numpys_beta_draw():
    """The CutMix box of a view is cut from numpy's Beta(a, a) draw at its place in the view's stream."""
    import math

    import numpy as np

    from lpld_ray.method.augment import randint, sample_crop, uniform
    from lpld_ray.method.rng import Stream, generator
    from lpld_ray.method.views import _centered_box

    for a in (0.5, 1.0, 2.0):
        cfg = RelabelConfig(mix="cutmix", cutmix_beta=a)
        lams = []
        for image_id in range(200):
            gen = generator(Stream.VIEW, 9, image_id, 1)
            sample_crop(gen, SIDE, SIDE, cfg.crop_scale), uniform(gen, 0, 1), randint(gen, 0, 10)
            sample_crop(gen, SIDE, SIDE, cfg.crop_scale), uniform(gen, 0, 1)
            lam = gen.beta(a, a)
            lams.append(lam)
            view = sample_view(9, image_id, 1, 12, SIDE, cfg)
            assert view.mix_box == _centered_box(gen, SIDE, int(SIDE * math.sqrt(1.0 - lam)))
        ref = np.random.default_rng(0).beta(a, a, 20000)  # and the draws are Beta(a, a): numpy's moments
        assert abs(np.mean(lams) - ref.mean()) < 0.06 and abs(np.var(lams) - ref.var()) < 0.03


def test_parquet_round_trip_and_schema_version_check(tmp_path):
    cfg = RelabelConfig(epochs=4, mix="cutmix", batch_size=5)
    store, meta, rec, images, counts = relabel(tmp_path, cfg, [0, 1, 2, 3], shard="shard-00000")
    manifest = verify_shard(store, LABELS_STAGE, "shard-00000")
    assert manifest is not None and [o.name for o in manifest.objects] == [LABELS_OBJECT]
    assert manifest.meta == meta and meta["schema_version"] == LABEL_SCHEMA_VERSION
    assert meta["sampler_version"] == SAMPLER_VERSION
    table = read_label_shard(store, "shard-00000")
    assert sampler_version_of(table) == SAMPLER_VERSION
    assert table.schema.field("logits").type == pa.list_(pa.float16(), CLASSES)
    assert table.num_rows == meta["records"] == int(counts[:4].sum())
    sizes = label_bytes(table)
    assert meta["index_bytes"] == 0  # every logit kept: no class indices
    assert sizes == {"logits": meta["logit_bytes"], "index": 0, "aug": meta["aug_bytes"],
                     "total": meta["logit_bytes"] + meta["aug_bytes"]}
    assert sizes["aug"] == table.num_rows * 54
    old = dict(table.schema.metadata)
    bad = table.replace_schema_metadata({**old, VERSION_KEY: b"99"})
    with pytest.raises(StorageError) as err:
        read_label_table(table_to_parquet(bad))
    msg = str(err.value)
    assert "99" in msg and f"supported: {LABEL_SCHEMA_VERSION}" in msg and "\n" not in msg
    with pytest.raises(StorageError, match="missing"):
        read_label_table(table_to_parquet(table.replace_schema_metadata({})))
    no_sampler = {k: v for k, v in old.items() if k != SAMPLER_KEY}
    with pytest.raises(StorageError, match="no valid lpld_sampler_version"):
        read_label_table(table_to_parquet(table.replace_schema_metadata(no_sampler)))
    with pytest.raises(StorageError, match="Parquet"):
        read_label_table(b"not parquet")


def test_a_labels_shard_of_another_schema_version_is_redone(tmp_path):
    store, meta, *_ = relabel(tmp_path, RelabelConfig(epochs=2), [0, 1], shard="shard-00000")
    inputs = meta.get("inputs", "")
    assert current_labels(store, ["shard-00000"], inputs)["shard-00000"] is not None
    manifest = read_manifest(store, LABELS_STAGE, "shard-00000")
    newer = dataclasses.replace(manifest, meta={**manifest.meta, "schema_version": LABEL_SCHEMA_VERSION + 1})
    store.write_text(f"{LABELS_STAGE}/shard-00000/{MANIFEST_NAME}", newer.to_json())
    assert verify_shard(store, LABELS_STAGE, "shard-00000") is not None  # its objects are intact ...
    assert current_labels(store, ["shard-00000"], inputs)["shard-00000"] is None  # ... but this lpld_ray cannot read them: redo
    other = dataclasses.replace(manifest, meta={**manifest.meta, "sampler_version": SAMPLER_VERSION + 1})
    store.write_text(f"{LABELS_STAGE}/shard-00000/{MANIFEST_NAME}", other.to_json())
    assert current_labels(store, ["shard-00000"], inputs)["shard-00000"] is None  # views of another sampler: redo


def test_a_schema_version_1_label_shard_is_refused_with_one_line(tmp_path):
    """Version 1 shards (no sampler version) are refused when read and by the train stage's plan check."""
    from lpld_ray.errors import LpldError
    from lpld_ray.pipeline.plan import require_label_schema

    store, meta, *_ = relabel(tmp_path, RelabelConfig(epochs=2), [0, 1], shard="shard-00000")
    table = read_label_shard(store, "shard-00000")
    v1 = {VERSION_KEY: b"1", b"num_classes": str(CLASSES).encode()}  # what version 1 wrote
    with pytest.raises(StorageError) as err:
        read_label_table(table_to_parquet(table.replace_schema_metadata(v1)))
    msg = str(err.value)
    assert f"label schema version 1, which is not supported (supported: {LABEL_SCHEMA_VERSION})" in msg and "\n" not in msg
    manifest = read_manifest(store, LABELS_STAGE, "shard-00000")
    old = dataclasses.replace(manifest, meta={k: v for k, v in {**manifest.meta, "schema_version": 1}.items()
                                              if k != "sampler_version"})
    store.write_text(f"{LABELS_STAGE}/shard-00000/{MANIFEST_NAME}", old.to_json())
    assert current_labels(store, ["shard-00000"], meta.get("inputs", ""))["shard-00000"] is None
    with pytest.raises(LpldError) as err:
        require_label_schema(store, ["shard-00000"])
    msg = str(err.value)
    assert "labels/shard-00000" in msg and f"version 1 is not supported (supported: {LABEL_SCHEMA_VERSION})" in msg and "\n" not in msg


@pytest.mark.parametrize("field,value", [("compression", 0.5), ("epochs", 0), ("cutmix_beta", 0.0),
                                         ("cutout_fraction", 0.0), ("mix", "mixup")])
def test_relabel_config_rejects_bad_values(field, value):
    with pytest.raises(ConfigError, match=f"relabel.{field}"):
        RelabelConfig(**{field: value})


@pytest.mark.parametrize("mix", ["cutmix", "cutout"])
def test_relabel_reads_only_its_images_and_their_partners(tmp_path, mix):
    cfg = RelabelConfig(epochs=4, compression=2, mix=mix, batch_size=5)
    ids = [image_id_of(0, i, IPC) for i in range(IPC)]
    images = make_images(classes=6)  # 24 images in the run
    counts = view_counts(len(images), cfg.epochs, cfg.compression, 7)
    views = plan_views(7, ids, counts, cfg, SIDE)
    assert [(v.image_id, v.view_id) for v in views] == [(i, j) for i in ids for j in range(int(counts[i]))]
    needed = RelabelTask("shard-00001", tuple(ids), tuple(views), cfg, 7, CLASSES).images_needed()
    assert set(ids) <= needed
    assert needed == set(ids) | {v.partner_id for v in views if v.mix == 1}
    if mix == "cutout":
        assert needed == set(ids)  # no partners
    else:
        assert len(needed) < len(images)  # 4 images x 2 views reach at most 8 partners of 20
    full, *_ = relabel(tmp_path / "full", cfg, ids, images=images)
    few, *_ = relabel(tmp_path / "few", cfg, ids, images={i: images[i] for i in needed}, num_images=len(images))
    assert full.read_bytes("labels/shard-00001/labels.parquet") == few.read_bytes("labels/shard-00001/labels.parquet")
    if mix == "cutmix":
        short = {i: images[i] for i in needed - {max(needed - set(ids))}}
        with pytest.raises(ValueError, match="is needed but not given"):
            relabel(tmp_path / "short", cfg, ids, images=short, num_images=len(images))


def test_a_relabel_task_refuses_views_of_images_not_its_own():
    cfg = RelabelConfig(epochs=2)
    counts = view_counts(12, cfg.epochs, cfg.compression, 7)
    views = plan_views(7, [0, 1, 5], counts, cfg, SIDE)
    with pytest.raises(ValueError, match="image 5"):
        RelabelTask("shard-00000", (0, 1), tuple(views), cfg, 7, CLASSES)
