"""The report a person reads: report.md's table and links, the training curve, and the labelled contact sheet."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from lpld_ray.config import DataConfig, TeacherConfig, TrainConfig
from lpld_ray.config_io import config_from_dict
from lpld_ray.data.datasets import FASHION_CLASSES
from lpld_ray.pipeline.history import HISTORY_OBJECT, read_history
from lpld_ray.pipeline.plots import CURVE_OBJECT, training_histories
from lpld_ray.pipeline.report import build_report, report_inputs
from lpld_ray.pipeline.report_md import REPORT_MD_OBJECT, write_report_md
from lpld_ray.pipeline.shards import ClassShard, plan_class_shards
from lpld_ray.pipeline.sheet import (
    MIN_CELL_PX,
    PADDING_PX,
    SHEET_OBJECT,
    contact_sheet,
    write_contact_sheet,
)
from lpld_ray.pipeline.student import STUDENT_SHARD, StudentJob
from lpld_ray.pipeline.teacher import TEACHER_SHARD, TeacherJob
from lpld_ray.store.codecs import encode_png
from lpld_ray.store.layout import STUDENT_STAGE, TEACHER_STAGE, image_object_name
from lpld_ray.store.manifest import ShardWriter, verify_shard
from lpld_ray.store.storage import Store

NAMES = list(FASHION_CLASSES[:4])


def write_images(store: Store, ipc: int, size: int, shards: list[ClassShard], channels: int = 1) -> None:
    for shard in shards:
        writer = ShardWriter(store, "images", shard.name)
        for c in shard.class_ids:
            for i in range(ipc):
                writer.put(image_object_name(c, i), encode_png(torch.full((channels, size, size), (c + 1) / 10)))
        writer.commit(seed=0, meta={"classes": list(shard.class_ids)})


def history(epochs: int, loss0: float) -> list[dict]:
    return [{"epoch": e, "loss": loss0 / e, "seconds": 0.5, **({"test_top1": 0.1 * e} if e % 2 == 0 else {})}
            for e in range(1, epochs + 1)]


def fake_run(tmp_path, teacher_history: list[dict] | None = None) -> tuple[Store, dict]:
    """A run with committed images, labels, teacher and student, and its report.json dict."""
    store = Store(str(tmp_path / "run"))
    shards = plan_class_shards(4, 2)
    write_images(store, ipc=3, size=28, shards=shards)
    labels = ShardWriter(store, "labels", "shard-00000")
    labels.put("labels.parquet", b"x" * 300)
    labels.commit(seed=0, meta={"logit_bytes": 1000, "index_bytes": 500, "aug_bytes": 234, "records": 7,
                                "full_pool_bytes": 17340})
    write_contact_sheet(store, shards, NAMES)
    model = torch.nn.Linear(2, 2)
    TeacherJob(DataConfig(), TeacherConfig(), store, seed=0).commit(model, 0.9123, 0, 1.0, teacher_history)
    StudentJob(DataConfig(), TrainConfig(epochs=6), store, seed=0, ipc=3).commit(model, 0.8045, 2, 3.0, history(6, 2.0))
    cfg = config_from_dict({"recover": {"ipc": 3, "batching": "across_classes"}, "relabel": {"compression": 40},
                            "train": {"epochs": 6}, "seed": 11})
    return store, build_report(store, cfg, 0.9123, 0.8045, {"recover": 1.5, "train": 75.0})


def decode(store: Store, rel: str) -> Image.Image:
    image = Image.open(io.BytesIO(store.read_bytes(rel)))
    image.load()
    return image


def test_report_md_holds_the_table_values_and_links_the_pngs(tmp_path):
    store, report = fake_run(tmp_path, teacher_history=history(4, 3.0))
    uri = write_report_md(store, report, NAMES, training_histories(store, teacher_given=False))
    assert uri == store.uri(REPORT_MD_OBJECT)
    assert report["label_bytes"] == 1734 and report["label_ratio_to_full_pool"] == 17340 / 1734
    md = store.read_text(REPORT_MD_OBJECT)
    image_bytes = sum(p.stat().st_size for p in (tmp_path / "run" / "images").rglob("*.png"))
    for row in ("| Teacher test top-1 | 91.23% |", "| Student test top-1 | 80.45% |",
                "| Images per class (IPC, `recover.ipc`) | 3 |", "| k (`relabel.compression`) | 40 |",
                "| Method (`recover.batching` / `recover.source`) | across_classes / synthetic |",
                "| Label bytes, paper's terms (logits + class indices + augmentation params) | 1,734 B (1.7 KiB) |",
                "| Label bytes: soft-label logits | 1,000 B (1.0 KiB) |",
                "| Label bytes: class indices (top-k) | 500 B (0.5 KiB) |",
                "| Label bytes: augmentation params | 234 B (0.2 KiB) |", "| Label records | 7 |",
                "| Label pool against the full 1x pool | 1/10.0 |",
                "| Label files (`labels/`) | 300 B (0.3 KiB) |", f"| Image files (`images/`) | {image_bytes:,} B",
                "| Seed | 11 |", "| recover | 1.5 s |", "| train | 75.0 s (1 min 15 s) |", "| **total** | **76.5 s"):
        assert row in md
    assert "](contact_sheet.png)" in md and "](training_curve.png)" in md  # beside report.md
    assert "Rows, top to bottom: 0 T-shirt/top, 1 Trouser, 2 Pullover, 3 Dress." in md
    assert "- student: 6 epochs recorded, last loss 0.3333, test top-1 60.00%" in md
    assert "- teacher: 4 epochs recorded" in md
    assert decode(store, CURVE_OBJECT).size == (1000, 400)
    assert decode(store, SHEET_OBJECT).format == "PNG"


def test_no_history_no_curve_and_a_given_teacher_is_left_out(tmp_path):
    store, report = fake_run(tmp_path, teacher_history=history(4, 3.0))
    assert set(training_histories(store, teacher_given=True)) == {"student"}
    assert set(training_histories(store, teacher_given=False)) == {"student", "teacher"}
    write_report_md(store, report, NAMES, training_histories(store, teacher_given=False))
    assert store.exists(CURVE_OBJECT)
    write_report_md(store, report, None, {})  # e.g. models trained before histories were kept
    md = store.read_text(REPORT_MD_OBJECT)
    assert "training_curve.png" not in md and "No training history recorded" in md
    assert not store.exists(CURVE_OBJECT)  # the earlier curve is gone with its link
    assert "Rows, top to bottom" not in md and "](contact_sheet.png)" in md


def test_commits_list_the_history_and_a_bad_one_is_ignored(tmp_path):
    store, _ = fake_run(tmp_path)  # the teacher committed without a history: an empty list
    assert verify_shard(store, STUDENT_STAGE, STUDENT_SHARD) is not None
    assert [r["epoch"] for r in read_history(store, STUDENT_STAGE, STUDENT_SHARD)] == [1, 2, 3, 4, 5, 6]
    assert read_history(store, TEACHER_STAGE, TEACHER_SHARD) == []
    store.write_text(f"{STUDENT_STAGE}/{STUDENT_SHARD}/{HISTORY_OBJECT}", "[]")  # altered after the commit
    assert read_history(store, STUDENT_STAGE, STUDENT_SHARD) == []
    assert read_history(store, STUDENT_STAGE, "absent") == []


def label_column(sheet: Image.Image, cell: int, per_class: int) -> int:
    return sheet.size[0] - (PADDING_PX + per_class * (cell + PADDING_PX))


@pytest.mark.parametrize("classes", [2, 4])
def test_sheet_rows_are_labelled_and_small_images_upscaled(tmp_path, classes):
    store = Store(str(tmp_path / "run"))
    shards = plan_class_shards(classes, 2)
    write_images(store, ipc=3, size=28, shards=shards)
    sheet = Image.open(io.BytesIO(contact_sheet(store, shards, per_class=3, class_names=NAMES))).convert("L")
    cell = 84  # 28 px shown 3x, the first whole factor reaching MIN_CELL_PX
    assert cell >= MIN_CELL_PX and sheet.size[1] == PADDING_PX + classes * (cell + PADDING_PX)  # a row per class
    label_w = label_column(sheet, cell, 3)
    assert label_w > 60  # room for "T-shirt/top" at a readable size
    pixels = np.asarray(sheet)
    for r in range(classes):
        top = PADDING_PX + r * (cell + PADDING_PX)
        assert pixels[top:top + cell, :label_w].min() < 100  # dark text in the row's label column
        first = pixels[top:top + cell, label_w + PADDING_PX:label_w + PADDING_PX + cell]
        assert first.min() == first.max() == round(255 * (r + 1) / 10)  # the image, upscaled pixel-exact


def test_sheet_labels_fall_back_to_class_ids_and_cut_long_names(tmp_path):
    store = Store(str(tmp_path / "run"))
    shards = plan_class_shards(2, 2)
    write_images(store, ipc=1, size=8, shards=shards, channels=3)
    widths = {}
    for key, names in {"none": None, "short": ["a", "b"], "long": ["x" * 200, "y"]}.items():
        widths[key] = label_column(Image.open(io.BytesIO(contact_sheet(store, shards, per_class=1,
                                                                       class_names=names))), 64, 1)
    assert widths["short"] < widths["none"] < widths["long"] < 400  # "class 0"; 200 x's cut short


def test_the_report_inputs_change_with_any_shard_or_the_config_and_only_then(tmp_path):
    """A no-op re-run finds the report current (same digest) and reads no data object for it; a redone shard of any
    stage it shows, or another config, asks for a new report."""
    store, _ = fake_run(tmp_path)
    cfg = config_from_dict({"recover": {"ipc": 3}})
    before = report_inputs(store, cfg)
    assert report_inputs(store, cfg) == before
    assert report_inputs(store, config_from_dict({"recover": {"ipc": 3}, "seed": 1})) != before
    labels = ShardWriter(store, "labels", "shard-00000")
    labels.put("labels.parquet", b"y" * 300)  # same size, other bytes: a redone shard
    labels.commit(seed=0, meta={"records": 7})
    assert report_inputs(store, cfg) != before
