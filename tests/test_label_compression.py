"""Top-k logits, the teacher temperature schedule and the calibrated student temperature (LPQLD's levers)."""

from __future__ import annotations

import json
import math
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F
from conftest import pool_items
from test_labels import CLASSES, IPC
from test_pool import open_pool, relabelled

from lpld_ray.config import RelabelConfig, TrainConfig
from lpld_ray.config_io import load_config
from lpld_ray.data.pool import EpochRecords
from lpld_ray.distributed.train_loop import load_state, save_state
from lpld_ray.errors import ConfigError
from lpld_ray.method.kd import SoftTargetKLLoss, TemperatureSchedule, soft_target
from lpld_ray.method.prune import select_views, view_scores
from lpld_ray.pipeline.estimate import dataset_shape, label_bytes, label_record_parts, plan_lines
from lpld_ray.pipeline.student import kd_loss
from lpld_ray.store.label_table import (
    SEEDED_KEY,
    class_index_type,
    coalesced,
    read_label_table,
    records_to_table,
    table_to_parquet,
    topk_of,
)
from lpld_ray.store.label_table import label_bytes as table_bytes


class View:  # the fields records_to_table reads, all plain
    image_id, view_id, crop, flip, mix, partner_id, partner_crop, partner_flip, mix_box, lam, fill = (
        0, 0, None, False, 0, -1, None, False, None, 1.0, (0, 0, 0))


def test_top_k_round_trip_and_the_target_by_hand():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0], [0.5, -1.0, 0.5, 4.0]], dtype=torch.float16)
    table = records_to_table([View(), View()], logits, 4, sampler_version=1, topk=2)
    assert table.column("logits").to_pylist() == [[3.0, 2.0], [4.0, 0.5]]
    assert table.column("classes").to_pylist() == [[1, 2], [3, 0]]  # a tie keeps the lower class first
    assert table.schema.field("classes").type.value_type == pa.uint8() and topk_of(table) == 2
    assert table_bytes(table) == {"logits": 2 * 2 * 2, "index": 2 * 2 * 1, "aug": 2 * 54, "total": 8 + 4 + 108}
    target = EpochRecords(table, 4).target(0)
    assert target.tolist() == [-math.inf, 3.0, 2.0, -math.inf]
    t = 2.0
    expect = [0.0, math.exp(3 / t) / (math.exp(3 / t) + math.exp(2 / t)), math.exp(2 / t) / (math.exp(3 / t) + math.exp(2 / t)), 0.0]
    got = soft_target(target[None], t)[0]
    assert got.tolist() == pytest.approx(expect, abs=1e-6)
    # LPQLD's MR-k: softmax over the stored values, scattered into zeros
    mr = torch.zeros(4).scatter_(0, torch.tensor([1, 2]), F.softmax(torch.tensor([3.0, 2.0]) / t, dim=0))
    assert torch.allclose(got, mr)
    student = torch.tensor([[0.3, 1.0, -0.2, 0.1]])
    loss = SoftTargetKLLoss(t)(student, target[None])
    by_hand = sum(p * (math.log(p) - q) for p, q in zip(expect, F.log_softmax(student[0] / t, 0).tolist()) if p)
    assert float(loss) == pytest.approx(by_hand, rel=1e-5)
    full = records_to_table([View()], logits[:1], 4, sampler_version=1, topk=4)  # k >= classes: every logit
    assert "classes" not in full.schema.names and topk_of(full) == 4


def test_top_1_stores_the_class_alone_and_its_target_is_one_hot(tmp_path):
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0], [0.5, -1.0, 0.5, 4.0]], dtype=torch.float16)
    table = records_to_table([View(), View()], logits, 4, sampler_version=1, topk=1)
    assert "logits" not in table.schema.names and table.column("classes").to_pylist() == [[1], [3]]
    assert table_bytes(table) == {"logits": 0, "index": 2, "aug": 2 * 54, "total": 2 + 108} and topk_of(table) == 1
    assert label_record_parts(4, topk=1, seeded=True) == {"logits": 0, "index": 1, "aug": 0}
    records = EpochRecords(read_label_table(table_to_parquet(table)), 4)
    assert soft_target(records.target(1)[None], 20.0)[0].tolist() == [0.0, 0.0, 0.0, 1.0]
    base = RelabelConfig(epochs=3, mix="cutmix", batch_size=5, params="seeded")
    full_store, *_ = relabelled(tmp_path / "full", base)
    top_store, meta, *_ = relabelled(tmp_path / "top1", base.model_copy(update={"topk": 1}))
    assert meta["logit_bytes"] == 0 and meta["index_bytes"] == meta["records"]  # one uint8 per view, nothing else
    full = {(v.image_id, v.view_id): y for _, _, y, v in pool_items(open_pool(full_store), 3)}
    for _, _, y, view in pool_items(open_pool(top_store), 3):
        assert int(torch.isfinite(y).sum()) == 1 and int(y.argmax()) == int(full[(view.image_id, view.view_id)].argmax())


@pytest.mark.parametrize("classes, kind", [(10, pa.uint8()), (256, pa.uint8()), (257, pa.uint16()),
                                           (10450, pa.uint16()), (70000, pa.uint32())])
def test_class_indices_take_the_smallest_unsigned_type(classes, kind):
    assert class_index_type(classes) == kind


def test_relabelled_top_k_pool_keeps_the_largest_teacher_outputs(tmp_path):
    base = RelabelConfig(epochs=3, mix="cutmix", batch_size=5)
    full_store, *_ = relabelled(tmp_path / "full", base)
    top_store, meta, *_ = relabelled(tmp_path / "top", base.model_copy(update={"topk": 2}))
    assert meta["index_bytes"] == meta["records"] * 2 and meta["logit_bytes"] == meta["records"] * 2 * 2
    assert meta["full_pool_bytes"] == IPC * 3 * (CLASSES * 2 + 54)
    full = {(v.image_id, v.view_id): y for _, _, y, v in pool_items(open_pool(full_store), 3)}
    seen = 0
    for _, _, y, view in pool_items(open_pool(top_store), 3):
        whole = full[(view.image_id, view.view_id)]
        kept = torch.isfinite(y)
        assert int(kept.sum()) == 2 and float(whole[~kept].max()) <= float(whole[kept].min())
        assert torch.equal(y[kept], whole[kept])  # the same fp16 values, at their classes
        seen += 1
    assert seen == 3 * IPC


def test_step_and_cosine_teacher_temperatures():
    step = TemperatureSchedule(20.0, "step", epochs=300, step=30, gamma=0.7, minimum=2.0)
    expect = {1: 20.0, 29: 20.0, 30: 14.0, 59: 14.0, 60: 9.8, 90: 6.86, 120: 4.802, 150: 3.3614, 180: 2.35298,
              210: 2.0, 300: 2.0}  # max(2, 20 * 0.7 ** floor(e / 30))
    assert {e: round(step.at(e), 6) for e in expect} == expect
    cosine = TemperatureSchedule(20.0, "cosine", epochs=300, minimum=2.0)
    assert cosine.at(150) == pytest.approx(11.0) and cosine.at(300) == pytest.approx(2.0)
    assert cosine.at(1) == pytest.approx(2 + 9 * (1 + math.cos(math.pi / 300)))
    assert TemperatureSchedule(4.0).at(77) == 4.0
    loss = kd_loss(TrainConfig(epochs=300, temperature=20, temperature_schedule="step"))
    loss.set_epoch(29)  # 0-based epoch 29 is the 30th
    assert loss.teacher_temperature == pytest.approx(14.0) and loss.student_temperature == pytest.approx(14.0)


def test_calibration_picks_the_temperature_that_fits_the_last_batch_and_survives_a_checkpoint(tmp_path):
    torch.manual_seed(0)
    student = torch.randn(16, 10) * 3
    teacher = student * 4  # softmax(teacher / 2) == softmax(student / 0.5): t = 0.5 fits exactly
    loss = SoftTargetKLLoss(2.0, student_temperature=1.0, calibrate=True)
    loss(student, teacher)
    assert loss.student_temperature == 1.0  # the first epoch runs at the start value
    used = loss.end_epoch()
    assert used == {"teacher_temperature": 2.0, "student_temperature": 1.0}
    assert loss.student_temperature == pytest.approx(0.5)
    summed = []
    other = SoftTargetKLLoss(2.0, calibrate=True)
    other(student, teacher)
    other.end_epoch(lambda losses: summed.append(losses.clone()))  # every rank's candidate losses are summed
    assert summed[0].shape == (100,) and other.student_temperature == pytest.approx(0.5)
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    os.makedirs(tmp_path / "ckpt")
    save_state(str(tmp_path / "ckpt"), model, optimizer, scheduler, 3, None, [], loss_fn=loss)
    restored = SoftTargetKLLoss(2.0, calibrate=True)
    assert restored.student_temperature == 1.0
    assert load_state(str(tmp_path / "ckpt"), model, optimizer, scheduler, restored)[0] == 3
    assert restored.student_temperature == pytest.approx(0.5)
    fixed = SoftTargetKLLoss(2.0, student_temperature=3.0)
    fixed(student, teacher)
    assert fixed.end_epoch()["student_temperature"] == 3.0 and fixed.student_temperature == 3.0


@pytest.mark.parametrize("key, value, allowed", [
    ("relabel.topk", "0", "null (every logit) or an integer >= 1"),
    ("train.temperature_schedule", "linear", "one of constant, step, cosine"),
    ("train.student_temperature", "-1", "null (the teacher's temperature) or a number > 0"),
    ("train.temperature_gamma", "1.5", "1"),
])
def test_label_compression_settings_are_checked(key, value, allowed):
    with pytest.raises(ConfigError) as err:
        load_config("jobs/configs/fashion_mnist.yaml", [f"{key}={value}"])
    message = str(err.value)
    assert key in message and value in message and allowed in message and "\n" not in message


def test_plan_counts_top_k_logits_and_their_indices():
    """ImageNet-1K IPC 10 at 10x with top-100 (LPQLD's setting): 300,000 records of 100 fp16 logits, 100 uint16
    class indices and 54 B of ids and parameters."""
    assert label_record_parts(1000, 100) == {"logits": 200, "index": 200, "aug": 54}
    assert label_bytes(10_000, 300, 10, 1000, 100) == 300_000 * 454
    cfg = load_config("jobs/configs/imagenet1k_rn18.yaml", ["recover.ipc=10", "relabel.compression=10",
                                                            "relabel.topk=100"])
    text = "\n".join(plan_lines(cfg, dataset_shape(cfg.data), "8"))
    assert "454 B per stored view (the top 100 logits: logits 200 B + class indices 200 B" in text
    seeded = load_config("jobs/configs/imagenet1k_rn18.yaml", ["recover.ipc=10", "relabel.compression=10",
                                                               "relabel.topk=100", "relabel.params=seeded"])
    seeded_text = "\n".join(plan_lines(seeded, dataset_shape(seeded.data), "8"))
    assert "400 B per stored view (the top 100 logits: logits 200 B + class indices 200 B + ids and augmentation " \
           "parameters 0 B, seeded, not stored)" in seeded_text
    full = 10_000 * 300 * (2000 + 54)
    assert f"labels at 10x: 129.89 MiB, 1/{full / (300_000 * 454):,.1f} of the full 1x pool  <- this run" in text


def test_each_pruning_metric_on_hand_built_views():
    logits = torch.log(torch.tensor([[0.7, 0.2, 0.1],     # plain view of class 0: teacher right
                                     [0.1, 0.5, 0.4],     # CutMix class 0 + partner class 2: top-2 {1, 2}
                                     [0.45, 0.1, 0.45],   # CutMix class 0 + partner class 2: top-2 {0, 2}
                                     [0.2, 0.3, 0.5]]))   # Cutout view of class 1: teacher says 2
    image_class, partner_class = torch.tensor([0, 0, 0, 1]), torch.tensor([-1, 2, 2, -1])
    lam = torch.tensor([1.0, 0.6, 0.3, 1.0])

    def score(metric):
        return view_scores(logits, metric, image_class, partner_class, lam).tolist()

    assert score("confidence") == pytest.approx([0.7, 0.5, 0.45, 0.5])
    assert score("diff") == pytest.approx([0.5, 0.1, 0.0, 0.2])
    assert score("diff_signed") == pytest.approx([0.7 - 0.2, 0.1 - 0.4, 0.45 - 0.45, 0.3 - 0.5])
    assert score("cut_ratio") == pytest.approx([1.0, 0.6, 0.3, 1.0])
    assert score("correct") == [1.0, 0.0, 1.0, 0.0]


def test_select_views_keeps_each_images_best_or_worst_with_ties_to_the_lower_view():
    scores = torch.tensor([0.9, 0.1, 0.5, 0.5, 0.2, 0.8])
    images, views = [0, 0, 0, 1, 1, 1], [0, 1, 2, 3, 1, 2]
    assert select_views(scores, images, views, {0: 2, 1: 1}) == [0, 2, 5]
    assert select_views(scores, images, views, {0: 1, 1: 2}, easy=False) == [1, 3, 4]
    tied = torch.ones(6)
    assert select_views(tied, images, views, {0: 1, 1: 1}) == [0, 4]  # view 0 of image 0, view 1 of image 1


@pytest.mark.parametrize("keep", ["easy", "hard"])
def test_metric_pruning_stores_each_images_best_views_and_the_pool_serves_them(tmp_path, keep):
    from test_labels import make_images, normalize, tiny_teacher
    from test_pool import commit_images

    from lpld_ray.method.views import image_id_of
    from lpld_ray.pipeline.labels import relabel_shard, relabel_task
    from lpld_ray.store.storage import Store

    images, teacher = make_images(), tiny_teacher()
    ids = [image_id_of(1, i, IPC) for i in range(IPC)]
    full_cfg = RelabelConfig(epochs=8, compression=1, mix="cutmix", batch_size=16)
    cfg = full_cfg.model_copy(update={"compression": 4, "prune_by": "confidence", "prune_keep": keep})
    logits_of = {}
    for name, c in (("full", full_cfg), ("pruned", cfg)):
        store = Store(str(tmp_path / name))
        task = relabel_task("shard-00001", ids, c, 7, IPC, CLASSES, 16)
        meta = relabel_shard(store, teacher, normalize, images, task)
        commit_images(store, images)
        logits_of[name] = {(v.image_id, v.view_id): y for _, _, y, v in pool_items(open_pool(store), c.epochs)}
    assert meta["records"] == IPC * 8 // 4
    for image in ids:
        conf = {v: float(torch.softmax(y, 0).max()) for (i, v), y in logits_of["full"].items() if i == image}
        kept = sorted(v for (i, v) in logits_of["pruned"] if i == image)
        ranked = sorted(conf, key=lambda v: (-conf[v] if keep == "easy" else conf[v], v))
        assert kept == sorted(ranked[:2])  # the 2 of 8 views the teacher is most (least) sure of
        for v in kept:
            assert torch.equal(logits_of["pruned"][(image, v)], logits_of["full"][(image, v)])


@pytest.mark.parametrize("mix, fill", [("cutmix", "zero"), ("cutout", "random")])
def test_seeded_pool_stores_only_logits_and_rebuilds_the_stored_views_bit_for_bit(tmp_path, mix, fill):
    cfg = RelabelConfig(epochs=5, compression=2, mix=mix, cutout_fill=fill, batch_size=7, crop_scale=(0.3, 1.0))
    stored_store, stored_meta, *_ = relabelled(tmp_path / "stored", cfg)
    seeded_store, seeded_meta, *_ = relabelled(tmp_path / "seeded", cfg.model_copy(update={"params": "seeded"}))
    assert seeded_meta["records"] == stored_meta["records"] and seeded_meta["aug_bytes"] == 0
    assert seeded_meta["logit_bytes"] == stored_meta["logit_bytes"] == seeded_meta["records"] * CLASSES * 2
    assert seeded_meta["parquet_bytes"] < stored_meta["parquet_bytes"]
    stored = list(pool_items(open_pool(stored_store), cfg.epochs))
    seeded = list(pool_items(open_pool(seeded_store), cfg.epochs))
    assert len(seeded) == len(stored) == cfg.epochs * IPC
    for (_, x1, y1, v1), (_, x2, y2, v2) in zip(stored, seeded):
        assert v1 == v2 and torch.equal(x1, x2) and torch.equal(y1, y2)


def test_seeded_views_need_random_pruning_and_the_same_sampler(tmp_path):
    with pytest.raises(ConfigError, match="relabel.params"):
        load_config("jobs/configs/fashion_mnist.yaml", ["relabel.params=seeded", "relabel.prune_by=confidence"])
    cfg = RelabelConfig(epochs=2, mix="cutmix", params="seeded", batch_size=8)
    store, *_ = relabelled(tmp_path, cfg)
    path = tmp_path / "run" / "labels" / "shard-00001" / "labels.parquet"
    import pyarrow.parquet as pq

    from lpld_ray.store.label_table import SAMPLER_KEY, table_to_parquet

    table = pq.read_table(path)
    from test_pool import recommit_labels  # a manifest that matches: the loader's own check is what is tested

    recommit_labels(store, table_to_parquet(table.replace_schema_metadata({**table.schema.metadata, SAMPLER_KEY: b"99"})))
    from lpld_ray.errors import StorageError

    with pytest.raises(StorageError, match="seeded by view sampler version 99"):
        open_pool(store).set_epoch(0)


@pytest.mark.parametrize("groups, row_bytes, expect", [
    ([3, 4, 3, 4], 10, [7, 7]),  # each merged group reaches 64 B, 70 B each
    ([3, 4, 3, 4], 100, [3, 4, 3, 4]),  # every group is already large enough
    ([3, 4, 1], 10, [8]),  # a short remainder joins the last group
    ([5], 1, [5]),
    ([], 10, []),
])
def test_row_groups_merge_until_each_holds_the_minimum(groups, row_bytes, expect):
    assert coalesced(groups, row_bytes, 64) == expect
    assert sum(coalesced(groups, row_bytes, 64)) == sum(groups)


def test_a_small_seeded_top_k_pool_is_its_records_plus_a_small_fixed_overhead(tmp_path):
    cfg = RelabelConfig(epochs=40, compression=4, mix="cutmix", params="seeded", topk=2, batch_size=64)
    store, meta, *_ = relabelled(tmp_path, cfg)
    path = tmp_path / "run" / "labels" / "shard-00001" / "labels.parquet"
    parquet = pq.ParquetFile(path)
    assert parquet.metadata.num_row_groups == 1  # 10 (views, view id) groups of a few bytes each, merged
    seeded = json.loads(parquet.schema_arrow.metadata[SEEDED_KEY])
    assert seeded["image_ranges"] == [[IPC, 2 * IPC]] and "image_ids" not in seeded  # shard 1: one run of ids
    records = meta["logit_bytes"] + meta["index_bytes"]
    assert records == meta["records"] * 2 * 3 and meta["aug_bytes"] == 0  # 2 fp16 logits + 2 uint8 classes
    assert meta["parquet_bytes"] == path.stat().st_size < records + 3000, meta
    pool = open_pool(store)
    pool.set_epoch(3)
    assert all(pool[i][1].shape == (CLASSES,) for i in range(len(pool)))
