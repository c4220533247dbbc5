"""End to end through a real local Ray cluster: `ray job submit -- python jobs/distill.py` with a tiny config."""

from __future__ import annotations

import json
import time
import uuid

import pytest
from conftest import job_args, registered_checkpoint_epoch, tree_snapshot

from lpld_ray.store.manifest import list_shards, verify_shard
from lpld_ray.store.storage import Store

pytestmark = pytest.mark.ray


def test_job_commits_every_shard(finished_run):
    run_dir, result = finished_run
    store = Store(str(run_dir))
    assert store.exists("run.yaml")
    assert verify_shard(store, "teacher", "model") is not None
    assert sorted(list_shards(store, "stats")) == ["global", "shard-00000", "shard-00001"]
    assert sorted(list_shards(store, "images")) == ["shard-00000", "shard-00001"]
    for stage in ("stats", "images"):
        for shard in list_shards(store, stage):
            assert verify_shard(store, stage, shard) is not None, (stage, shard)
    images = verify_shard(store, "images", "shard-00001")
    assert sorted(e.name for e in images.objects) == [f"{c:05d}_{i:04d}.png" for c in (2, 3) for i in range(4)]
    assert images.meta["classes"] == [2, 3]
    assert (run_dir / "report" / "contact_sheet.png").stat().st_size > 100
    assert "recover: 2/2 shards" in result.stdout + result.stderr
    assert sorted(list_shards(store, "labels")) == ["shard-00000", "shard-00001"]
    assert verify_shard(store, "train", "model") is not None


REPORT_KEYS = {"teacher_top1", "student_top1", "ipc", "compression", "batching", "image_bytes", "label_bytes",
               "label_bytes_logits", "label_bytes_aug", "epochs", "wall_seconds"}


def test_report_has_every_key_and_student_beats_chance(finished_run):
    run_dir, result = finished_run
    report = json.loads((run_dir / "report" / "report.json").read_text())
    assert REPORT_KEYS <= set(report)
    assert set(report["wall_seconds"]) == {"teacher", "squeeze", "recover", "relabel", "train"}
    assert report["ipc"] == 4 and report["compression"] == 4 and report["batching"] == "class_wise"
    # 16 images x 40 epochs / k=4 = 160 views; logits are fp16 over the 4 classes in use
    assert report["label_records"] == 160
    assert report["label_bytes_logits"] == 160 * 4 * 2
    assert report["label_bytes"] == report["label_bytes_logits"] + report["label_bytes_aug"]
    assert report["image_bytes"] > 0
    # 4 classes: chance is 25%. The tiny teacher reaches ~80%+; 45% is a wide margin over chance
    # that 16 synthetic images with pruned soft labels clear easily.
    assert report["teacher_top1"] > 0.6
    assert report["student_top1"] > 0.45, report
    assert "student top-1" in result.stdout + result.stderr


def test_resubmit_skips_verified_shards(ray_cluster, finished_run):
    run_dir, _ = finished_run
    before = tree_snapshot(run_dir / "images")
    teacher_before = tree_snapshot(run_dir / "teacher")
    result = ray_cluster.submit(job_args(run_dir))
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout + result.stderr
    assert "recover: 0 of 2 class shards to do" in out
    assert "teacher: verified model already in the run; skipping" in out
    assert tree_snapshot(run_dir / "images") == before
    assert {k: v for k, v in tree_snapshot(run_dir / "teacher").items() if k.startswith("model")} == {
        k: v for k, v in teacher_before.items() if k.startswith("model")
    }


def test_partial_shard_is_redone(ray_cluster, finished_run):
    run_dir, _ = finished_run
    kept = tree_snapshot(run_dir / "images" / "shard-00000")
    (run_dir / "images" / "shard-00001" / "_MANIFEST.json").unlink()  # as if killed before the commit
    (run_dir / "images" / "shard-00001" / "00003_0003.png").write_bytes(b"half")
    result = ray_cluster.submit(job_args(run_dir))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "recover: 1 of 2 class shards to do" in result.stdout + result.stderr
    store = Store(str(run_dir))
    assert verify_shard(store, "images", "shard-00001") is not None
    assert tree_snapshot(run_dir / "images" / "shard-00000") == kept


def test_changed_config_refuses_to_resume(ray_cluster, finished_run):
    run_dir, _ = finished_run
    before = tree_snapshot(run_dir)
    result = ray_cluster.submit(job_args(run_dir, "recover.iterations=6"))
    assert result.returncode != 0
    assert "recover.iterations" in result.stdout + result.stderr
    assert tree_snapshot(run_dir) == before


def test_training_resumes_from_checkpoint(ray_cluster, finished_run, tmp_path):
    """Stop a job mid-training, re-submit the same command: training continues from the checkpoint."""
    source, _ = finished_run
    run_dir = tmp_path / "resume"
    args = job_args(run_dir, f"teacher.weights={source / 'teacher' / 'model' / 'teacher.pt'}",
                    "train.epochs=400", "train.checkpoint_every=20", "train.eval_every=400")
    job_id = f"resume-{uuid.uuid4().hex[:8]}"
    assert ray_cluster.submit(args, wait=False, job_id=job_id).returncode == 0
    train_dir = run_dir / "train"
    deadline = time.time() + 600
    # wait until Ray Train has registered a checkpoint (a checkpoint folder alone may not be registered yet)
    while time.time() < deadline and registered_checkpoint_epoch(train_dir) < 20:
        status = ray_cluster.status(job_id)
        assert status in ("PENDING", "RUNNING"), status
        time.sleep(0.5)
    stop = ray_cluster.job("stop", job_id)
    assert stop.returncode == 0, stop.stderr
    assert not (run_dir / "train" / "model" / "_MANIFEST.json").exists(), "training finished before it was stopped"
    result = ray_cluster.submit(args)
    assert result.returncode == 0, result.stderr[-3000:]
    manifest = verify_shard(Store(str(run_dir)), "train", "model")
    assert manifest is not None
    assert 20 <= manifest.meta["resumed_from"] < 400
    assert "resuming from the checkpoint of epoch" in result.stdout + result.stderr
    # given teacher weights are evaluated on the test set, so the report has the teacher's top-1 all the same
    report = json.loads((run_dir / "report" / "report.json").read_text())
    trained = json.loads((source / "report" / "report.json").read_text())["teacher_top1"]
    assert report["teacher_top1"] == pytest.approx(trained, abs=0.01), (report["teacher_top1"], trained)
