"""End to end through a real local Ray cluster: `ray job submit -- python jobs/distill.py` with a tiny config.
The session's finished run (conftest) is read, never written: tests that resume a run resume a copy of it."""

from __future__ import annotations

import json
import uuid

import psutil
import pytest
from conftest import (
    CLASS_SHARDS,
    assert_one_line_error,
    freeze_at_first_checkpoint,
    job_args,
    submit_ok,
    tree_snapshot,
    wait_until,
)

from lpld_ray.store.manifest import copy_stage, list_shards, verify_shard
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


def test_resubmit_redoes_only_a_partial_shard(ray_cluster, finished_run, tmp_path):
    """Re-running a run whose images shard was cut off before its commit redoes that shard, to the same bytes, and
    nothing else: the verified teacher, stats, labels and student are kept as they are."""
    run_dir = tmp_path / "resubmit"
    args = finished_run.copy_to(run_dir)
    before = tree_snapshot(run_dir)
    (run_dir / "images" / "shard-00001" / "_MANIFEST.json").unlink()  # as if killed before the commit
    (run_dir / "images" / "shard-00001" / "00001_0003.png").write_bytes(b"half")
    _, summary = submit_ok(ray_cluster, args)
    assert summary["recover"]["shards_done"] == 1
    assert summary["relabel"]["shards_done"] == 0  # the redone shard has the same bytes: its labels still hold
    after = tree_snapshot(run_dir)
    for stage in ("teacher/model/", "stats/", "labels/", "train/model/", "images/shard-00000/", "images/shard-00002/"):
        assert {k: v for k, v in after.items() if k.startswith(stage)} == {
            k: v for k, v in before.items() if k.startswith(stage)}, stage
    redone = run_dir / "images" / "shard-00001"
    assert verify_shard(Store(str(run_dir)), "images", "shard-00001") is not None
    assert {p.name: p.read_bytes() for p in redone.glob("*.png")} == {
        p.name: p.read_bytes() for p in (finished_run.run_dir / "images" / "shard-00001").glob("*.png")}


def test_changed_config_refuses_to_resume(finished_run, cli):
    before = tree_snapshot(finished_run.run_dir)
    error = assert_one_line_error(cli([*finished_run.args, "--set", "recover.iterations=6"]), "recover.iterations")
    assert "use the same config to resume, or a new --run-dir" in error
    assert tree_snapshot(finished_run.run_dir) == before


def test_stopped_job_resumes_from_its_checkpoint(ray_cluster, finished_run, tmp_path):
    """`ray job stop` mid-training, re-submit the same command: training continues from the registered checkpoint.
    The Ray Train worker is frozen at its first checkpoint, so the stop lands mid-training on any machine."""
    run_dir = tmp_path / "resume"
    for stage in ("stats", "images", "labels"):
        copy_stage(Store(str(finished_run.run_dir)), Store(str(run_dir)), stage)
    args = ["--stages", "teacher,train,report",
            *job_args(run_dir, f"teacher.weights={finished_run.teacher}", "train.epochs=20", "train.checkpoint_every=2",
                      "train.eval_every=20")]
    job_id = f"resume-{uuid.uuid4().hex[:8]}"
    assert ray_cluster.submit(args, wait=False, job_id=job_id).returncode == 0
    worker, epoch = freeze_at_first_checkpoint(ray_cluster, run_dir / "train", every=2)
    try:
        stop = ray_cluster.job("stop", job_id)
        assert stop.returncode == 0, stop.stderr
        assert wait_until(lambda: ray_cluster.status(job_id) in ("STOPPED", "FAILED"), 120, "the job to stop")
    finally:
        try:
            worker.kill()
        except psutil.NoSuchProcess:
            pass
    assert not (run_dir / "train" / "model" / "_MANIFEST.json").exists()
    _, summary = submit_ok(ray_cluster, args)
    assert verify_shard(Store(str(run_dir)), "train", "model") is not None
    assert epoch <= summary["train"]["resumed_from"] < 20
    # given teacher weights are evaluated on the test set, so the report has the teacher's top-1 all the same
    assert summary["teacher"]["given"] is True
    trained = finished_run.summary["teacher"]["test_top1"]
    assert summary["teacher"]["test_top1"] == pytest.approx(trained, abs=0.01)
    report = json.loads((run_dir / "report" / "report.json").read_text())
    assert report["teacher_top1"] == summary["teacher"]["test_top1"]
    assert report["student_top1"] == summary["train"]["student_top1"]
