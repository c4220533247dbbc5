"""End to end through a real local Ray cluster: `ray job submit -- python jobs/distill.py` with a tiny config.
The session's finished run (conftest) is read, never written: tests that resume a run resume a copy of it."""

from __future__ import annotations

import json

import pytest
from conftest import (
    CLASS_SHARDS,
    assert_one_line_error,
    tree_snapshot,
)

from lpld_ray.store.manifest import list_shards, verify_shard
from lpld_ray.store.storage import Store

pytestmark = pytest.mark.ray

SHARDS = [f"shard-{i:05d}" for i in range(CLASS_SHARDS)]


def test_job_commits_every_shard(finished_run):
    run_dir, summary = finished_run.run_dir, finished_run.summary
    store = Store(str(run_dir))
    assert store.exists("run.yaml")
    assert verify_shard(store, "teacher", "model") is not None
    assert sorted(list_shards(store, "stats")) == ["global", *SHARDS]
    for stage in ("stats", "images", "labels"):
        for shard in list_shards(store, stage):
            assert verify_shard(store, stage, shard) is not None, (stage, shard)
    assert sorted(list_shards(store, "images")) == sorted(list_shards(store, "labels")) == SHARDS
    images = verify_shard(store, "images", "shard-00001")
    assert sorted(e.name for e in images.objects) == [f"00001_{i:04d}.png" for i in range(4)]
    assert images.meta["classes"] == [1]
    assert (run_dir / "report" / "contact_sheet.png").stat().st_size > 100
    assert verify_shard(store, "train", "model") is not None
    # the job's own account: every shard made here, the teacher trained here, training not resumed
    assert summary["recover"]["shards_done"] == summary["relabel"]["shards_done"] == CLASS_SHARDS
    assert not summary["teacher"].get("given") and summary["train"]["resumed_from"] == 0


REPORT_KEYS = {"teacher_top1", "student_top1", "ipc", "compression", "batching", "image_bytes", "label_bytes",
               "label_bytes_logits", "label_bytes_aug", "epochs", "wall_seconds"}


def test_report_has_every_key_and_student_beats_chance(finished_run):
    report = json.loads((finished_run.run_dir / "report" / "report.json").read_text())
    summary = finished_run.summary
    assert REPORT_KEYS <= set(report)
    assert set(report["wall_seconds"]) == {"teacher", "squeeze", "recover", "relabel", "train"}
    assert report["ipc"] == 4 and report["compression"] == 4 and report["batching"] == "class_wise"
    # 16 images x 40 epochs / k=4 = 160 views; logits are fp16 over the 4 classes in use
    assert report["label_records"] == 160
    assert report["label_bytes_logits"] == 160 * 4 * 2
    assert report["label_bytes"] == report["label_bytes_logits"] + report["label_bytes_aug"]
    assert report["image_bytes"] > 0
    # the report states what the stages measured
    assert report["teacher_top1"] == summary["teacher"]["test_top1"]
    assert report["student_top1"] == summary["train"]["student_top1"]
    # 4 classes: chance is 25%. The tiny teacher reaches ~80%+; 45% is a wide margin over chance
    # that 16 synthetic images with pruned soft labels clear easily.
    assert report["teacher_top1"] > 0.6
    assert report["student_top1"] > 0.45, report


def test_changed_config_refuses_to_resume(finished_run, cli):
    before = tree_snapshot(finished_run.run_dir)
    error = assert_one_line_error(cli([*finished_run.args, "--set", "recover.iterations=6"]), "recover.iterations")
    assert "use the same config to resume, or a new --run-dir" in error
    assert tree_snapshot(finished_run.run_dir) == before
