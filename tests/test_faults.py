"""Faults injected into real `ray job submit` runs (local files and moto S3): killed driver, actor and Ray Train
worker, corrupted objects, an unreachable store, a second job on the same run. Every interrupted run must end up
byte-equal to the session's finished run (conftest), whose teacher it is given. Each records a row of the fault table
(docs/RESULTS.md) when LPLD_FAULT_TABLE names a file."""

from __future__ import annotations

import json
import os
import signal
import time
import uuid
from pathlib import Path

import psutil
import pytest
import yaml
from conftest import (
    CLASS_SHARDS,
    REPO,
    assert_one_line_error,
    cluster_processes,
    freeze_at_checkpoint,
    job_args,
    job_summary,
    submit_ok,
    tree_snapshot,
    wait_until,
)

from lpld_ray.config_io import load_config
from lpld_ray.distributed.driver import StageRun, run_train
from lpld_ray.errors import LpldError
from lpld_ray.pipeline.shards import plan_class_shards
from lpld_ray.store.manifest import MANIFEST_NAME, copy_stage, list_shards, verify_shard
from lpld_ray.store.storage import Store

pytestmark = pytest.mark.ray

def record_fault(fault: str, injected: int, recovered: bool, redone: str, lost: int) -> None:
    path = os.environ.get("LPLD_FAULT_TABLE")
    if path:
        with open(path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps({"fault": fault, "injected": injected, "recovered": recovered, "redone": redone,
                                 "lost": lost}) + "\n")


def fault_args(run_dir, teacher: Path, *extra: str, config: str = "jobs/configs/fashion_mnist.yaml") -> list[str]:
    """The finished run's config on another run directory, its teacher given as weights."""
    return job_args(run_dir, f"teacher.weights={teacher}", *extra, config=config)


def images_of(store: Store) -> dict[str, bytes]:
    """class/index image name -> PNG bytes, over every images shard."""
    return {name.split("/")[-1]: store.read_bytes(f"images/{name}") for name in store.list("images")
            if not name.endswith(MANIFEST_NAME)}


def wait_for_job_end(ray_cluster, job_id: str, timeout: float = 600) -> str:
    def ended():
        status = ray_cluster.status(job_id)
        return status if status in ("SUCCEEDED", "FAILED", "STOPPED") else None

    return wait_until(ended, timeout, f"job {job_id} to end", every=1.0)


def job_logs(ray_cluster, job_id: str) -> str:
    return ray_cluster.job("logs", job_id).stdout


def s3_config(moto_s3, tmp_path: Path) -> str:
    """The preset plus a storage: section pointing at moto (retries and timeouts short so an outage fails fast)."""
    tree = yaml.safe_load((REPO / "jobs/configs/fashion_mnist.yaml").read_text())
    tree["storage"] = moto_s3.storage_section(retries=2, connect_timeout_s=1.0, read_timeout_s=5.0,
                                              lease_timeout_s=30.0, lease_refresh_s=2.0)
    path = tmp_path / "s3.yaml"
    path.write_text(yaml.safe_dump(tree))
    return str(path)


@pytest.fixture(scope="module")
def teacher(finished_run) -> Path:
    return finished_run.teacher


@pytest.fixture(scope="module")
def reference(finished_run) -> Path:
    """The uninterrupted run of the same config: what every interrupted run must end up equal to."""
    return finished_run.run_dir


def kill_all(procs: list) -> None:
    for proc in procs:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass


def test_driver_sigkill_mid_recover_then_a_rerun_that_loses_an_actor_is_byte_identical(ray_cluster, teacher,
                                                                                         reference, tmp_path):
    """The driver is SIGKILLed once a first images shard is committed (the shard actors frozen first, so that no
    further shard commits on any machine). The re-run redoes the other shards alone; one of its actors is SIGKILLed
    mid-shard, and that shard goes back on the queue, once. The run ends with the reference's bytes."""
    run_dir = tmp_path / "killed"
    store = Store(str(run_dir))
    args = ["--stages", "squeeze,recover", *fault_args(run_dir, teacher)]
    job_id = f"kill-driver-{uuid.uuid4().hex[:8]}"
    assert ray_cluster.submit(args, wait=False, job_id=job_id).returncode == 0
    wait_until(lambda: list_shards(store, "images"), 600, "the first images shard")
    actors = cluster_processes(ray_cluster, "ShardWorker")
    for actor in actors:
        actor.suspend()
    try:
        (driver,) = wait_until(lambda: [p for p in cluster_processes(ray_cluster, str(run_dir)) if p.name() != "sh"], 30,
                               "the driver process")
        driver.send_signal(signal.SIGKILL)
        assert wait_for_job_end(ray_cluster, job_id) == "FAILED"
    finally:
        kill_all(actors)
    wait_until(lambda: not cluster_processes(ray_cluster, "ShardWorker"), 60, "the dead job's actors to go")
    finished = [s for s in list_shards(store, "images") if verify_shard(store, "images", s) is not None]
    assert 0 < len(finished) < CLASS_SHARDS, "the kill did not land mid-recover"
    kept = {s: object_stamps(store, f"images/{s}") for s in finished}
    record_fault("driver SIGKILL mid-recover", 1, True, f"{CLASS_SHARDS - len(finished)} of {CLASS_SHARDS} image shards", 0)

    rerun = f"rerun-{uuid.uuid4().hex[:8]}"
    assert ray_cluster.submit(args, wait=False, job_id=rerun).returncode == 0
    workers = wait_until(lambda: cluster_processes(ray_cluster, "ray::ShardWorker.recover"), 300, "a recovering actor",
                         every=0.05)
    workers[0].send_signal(signal.SIGKILL)
    assert wait_for_job_end(ray_cluster, rerun) == "SUCCEEDED"
    logs = job_logs(ray_cluster, rerun)
    assert logs.count("died (") == 1 and "shard goes back on the queue" in logs, logs[-3000:]
    assert job_summary(logs)["recover"]["shards_done"] == CLASS_SHARDS - len(finished), finished
    assert {s: object_stamps(store, f"images/{s}") for s in finished} == kept  # same mtime: not rewritten
    for shard in list_shards(store, "images"):  # the killed actor's half-written shard left nothing behind
        manifest = verify_shard(store, "images", shard)
        assert manifest is not None
        assert sorted(store.list(f"images/{shard}")) == sorted([MANIFEST_NAME, *(o.name for o in manifest.objects)])
    assert len(list_shards(store, "images")) == CLASS_SHARDS
    assert images_of(store) == images_of(Store(str(reference)))
    record_fault("shard actor SIGKILL mid-shard", 1, True, "1 image shard", 0)


def object_stamps(store: Store, prefix: str) -> dict[str, tuple]:
    """name -> (size, ETag or mtime) of every object under ``prefix``."""
    fs, base = store._fs, store._path(prefix)
    return {p: (info["size"], info.get("ETag") or info.get("mtime")) for p, info in fs.find(base, detail=True).items()}


def test_train_worker_kill_and_job_stop_both_resume_from_checkpoints(ray_cluster, finished_run, tmp_path, cli):
    """The student's Ray Train worker is frozen at its first registered checkpoint (so the job cannot finish
    meanwhile); a second job on the run is refused; the worker is killed and Ray Train restarts it from that
    checkpoint; frozen again at a later checkpoint, the job is stopped (`ray job stop`), and the same command
    re-submitted continues from there."""
    run_dir, train_dir = tmp_path / "train", tmp_path / "train" / "train"
    for stage in ("stats", "images", "labels"):
        copy_stage(Store(str(finished_run.run_dir)), Store(str(run_dir)), stage)
    args = ["--stages", "teacher,train,report", *fault_args(run_dir, finished_run.teacher, "train.epochs=20",
                                                            "train.checkpoint_every=2", "train.eval_every=20")]
    job_id = f"train-{uuid.uuid4().hex[:8]}"
    assert ray_cluster.submit(args, wait=False, job_id=job_id).returncode == 0
    worker, first = freeze_at_checkpoint(ray_cluster, train_dir, every=2)
    try:
        assert_one_line_error(cli(args), f"is in use by job {job_id}")  # a second job, while the first holds the run
    finally:
        kill_all([worker])
    worker, later = freeze_at_checkpoint(ray_cluster, train_dir, every=2, after=first, dead=(worker.pid,))
    try:
        assert ray_cluster.job("stop", job_id).returncode == 0
        assert wait_until(lambda: ray_cluster.status(job_id) in ("STOPPED", "FAILED"), 120, "the job to stop")
    finally:
        kill_all([worker])
    assert f"resuming from the checkpoint of epoch {first}" in job_logs(ray_cluster, job_id)
    record_fault("Ray Train worker SIGKILL", 1, True, f"epochs {first}-{later}+ (from checkpoint)", 0)
    record_fault("second job on a run in use", 1, True, "none (refused, named the holder)", 0)
    assert verify_shard(Store(str(run_dir)), "train", "model") is None
    _, summary = submit_ok(ray_cluster, args)
    manifest = verify_shard(Store(str(run_dir)), "train", "model")
    assert manifest is not None
    assert later <= summary["train"]["resumed_from"] < 20 and manifest.meta["resumed_from"] == summary["train"]["resumed_from"]
    record_fault("`ray job stop` mid-training", 1, True, f"epochs {summary['train']['resumed_from']}-20 (from checkpoint)", 0)
    # given teacher weights are evaluated on the test set, so the report has the teacher's top-1 all the same
    assert summary["teacher"]["given"] is True
    assert summary["teacher"]["test_top1"] == pytest.approx(finished_run.summary["teacher"]["test_top1"], abs=0.01)
    report = json.loads((run_dir / "report" / "report.json").read_text())
    assert report["teacher_top1"] == summary["teacher"]["test_top1"]
    assert report["student_top1"] == summary["train"]["student_top1"]


def test_partial_and_corrupt_shards_alone_are_redone_and_never_trained_on(ray_cluster, finished_run, tmp_path):
    """A copy of the finished run with one images shard cut off before its commit, a truncated image object, a label
    object with a flipped byte and a stats manifest that is not JSON: a re-run with --verify names each, redoes those
    shards alone (to the reference's bytes) and keeps everything else, the student included. (Without --verify,
    manifests alone decide what is done and each object is checked by its reader: tests/test_stages.py.)"""
    run_dir = tmp_path / "damaged"
    args = finished_run.copy_to(run_dir)
    store = Store(str(run_dir))
    (run_dir / "images" / "shard-00001" / MANIFEST_NAME).unlink()  # as if killed before the commit
    (run_dir / "images" / "shard-00001" / "00001_0003.png").write_bytes(b"half")
    image = run_dir / "images" / "shard-00002" / "00002_0001.png"
    image.write_bytes(image.read_bytes()[:40])  # truncated
    labels = run_dir / "labels" / "shard-00000" / "labels.parquet"
    data = bytearray(labels.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte
    labels.write_bytes(bytes(data))
    (run_dir / "stats" / "shard-00003" / MANIFEST_NAME).write_text("{not json")
    before = tree_snapshot(run_dir)
    out, summary = submit_ok(ray_cluster, [*args, "--verify"])
    assert "images/shard-00002/00002_0001.png: size 40 !=" in out
    assert "labels/shard-00000/labels.parquet: sha256 mismatch" in out
    assert "manifest is not valid JSON" in out
    assert summary["squeeze"]["shards_written"] >= 1
    assert summary["recover"]["shards_done"] == 2  # shards 1 and 2; shard 3's statistics came back the same
    assert summary["relabel"]["shards_done"] == 1  # shard 0; the redone images have the same bytes: labels hold
    after = tree_snapshot(run_dir)
    for kept in ("teacher/model/", "train/model/", "images/shard-00000/", "images/shard-00003/", "labels/shard-00001/",
                 "labels/shard-00002/", "labels/shard-00003/"):
        assert {k: v for k, v in after.items() if k.startswith(kept)} == {
            k: v for k, v in before.items() if k.startswith(kept)}, kept  # the student: what it trained on is back
    assert tree_bytes(run_dir, "images", "labels", "stats") == tree_bytes(finished_run.run_dir, "images", "labels", "stats")
    record_fault("images shard cut off before its commit", 1, True, "1 image shard", 0)
    record_fault("truncated image object", 1, True, "1 image shard", 0)
    record_fault("flipped byte in a label object", 1, True, "1 label shard", 0)
    record_fault("manifest that is not JSON", 1, True, "stats (one squeeze pass)", 0)
    # with only the train stage asked and --verify, a corrupt label object stops the driver's train stage before any
    # training (the start-up checks read manifests only): called here, without Ray, on the damaged run
    labels.write_bytes(bytes(data))
    store.delete(f"train/model/{MANIFEST_NAME}")
    cfg = load_config(args[args.index("--config") + 1], [a for i, a in enumerate(args) if args[i - 1] == "--set"])
    with pytest.raises(LpldError, match="train will not use labels/shard-00000: .*sha256 mismatch"):
        run_train(StageRun(cfg, store, plan_class_shards(CLASS_SHARDS, 1), CLASS_SHARDS, verify=True))
    assert verify_shard(store, "train", "model") is None


def tree_bytes(root: Path, *stages: str) -> dict[str, bytes]:
    """Every data object of ``stages`` (manifests differ in their timings only)."""
    return tree_bytes_of(Store(str(root)), *stages)


def tree_bytes_of(store: Store, *stages: str) -> dict[str, bytes]:
    """Every data object of ``stages`` in ``store``, by name under the run (manifests left out)."""
    return {f"{s}/{name}": store.read_bytes(f"{s}/{name}") for s in stages for name in store.list(s)
            if not name.endswith(MANIFEST_NAME)}


def test_store_outage_mid_recover_then_every_stage_but_training_on_s3(ray_cluster, teacher, reference, moto_s3, tmp_path):
    """Squeeze and recover on S3 with the object store stopped mid-recover: the job fails with one clear line and no
    secret. Then every stage up to the labels, and the report, on S3 (the teacher's weights read from S3 too): the
    committed image shards are kept as they are, the rest redone to the reference's bytes, and no object or log holds
    the secret. (Ray Train's checkpoints and a student on S3: the ImageFolder test's run.)"""
    bucket = moto_s3.make_bucket()
    run_dir = f"s3://{bucket}/full"
    store = Store(run_dir, moto_s3.options())
    weights = f"s3://{bucket}/weights/teacher.pt"
    Store(f"s3://{bucket}/weights", moto_s3.options()).write_bytes("teacher.pt", teacher.read_bytes())
    args = job_args(run_dir, f"teacher.weights={weights}", config=s3_config(moto_s3, tmp_path))
    job_id = f"outage-{uuid.uuid4().hex[:8]}"
    assert ray_cluster.submit(["--stages", "squeeze,recover", *args], wait=False, job_id=job_id).returncode == 0
    wait_until(lambda: list_shards(store, "images"), 600, "the first images shard")
    moto_s3.stop()
    try:
        stopped = time.time()
        assert wait_for_job_end(ray_cluster, job_id, timeout=300) == "FAILED"
        failed_after = time.time() - stopped
    finally:
        moto_s3.start()
    logs = job_logs(ray_cluster, job_id)
    assert "object store unreachable while" in logs and "2 retries" in logs, logs[-3000:]
    assert moto_s3.secret_key not in logs
    finished = [s for s in list_shards(store, "images") if verify_shard(store, "images", s) is not None]
    assert len(finished) < CLASS_SHARDS, "the outage did not land mid-recover"
    kept = {s: object_stamps(store, f"images/{s}") for s in finished}
    out, summary = submit_ok(ray_cluster, ["--stages", "teacher,squeeze,recover,relabel,report", *args])
    assert summary["recover"]["shards_done"] == CLASS_SHARDS - len(finished), finished
    assert {s: object_stamps(store, f"images/{s}") for s in finished} == kept  # same ETag: not rewritten
    assert images_of(store) == images_of(Store(str(reference)))
    record_fault("object store down mid-recover (moto stopped)", 1, True,
                 f"{CLASS_SHARDS - len(finished)} of {CLASS_SHARDS} image shards; job failed {failed_after:.0f}s after "
                 "the outage", 0)
    shards = [f"shard-{i:05d}" for i in range(CLASS_SHARDS)]
    for stage, names in (("teacher", ["given"]), ("stats", ["global", *shards]), ("images", shards),
                         ("labels", shards)):
        for shard in names:
            assert verify_shard(store, stage, shard) is not None, (stage, shard)
    assert tree_bytes_of(store, "labels") == tree_bytes(reference, "labels")  # S3 and local files: the same bytes
    assert summary["teacher"]["given"] is True
    report = json.loads(store.read_text("report/report.json"))
    assert report["teacher_top1"] == summary["teacher"]["test_top1"] and report["student_top1"] is None
    assert yaml.safe_load(store.read_text("run.yaml"))["config"]["storage"]["secret_access_key"] == "<redacted>"
    assert moto_s3.secret_key not in out
    for name in store.list(""):
        assert moto_s3.secret_key.encode() not in store.read_bytes(name), name


# RDED's selected real crops, stitched 2x2, at a size the tiny run affords
RDED = ["recover.source=rded", "rded.candidates=24", "rded.crops=3", "rded.factor=2", "rded.batch_size=32"]


def test_force_new_starts_over_with_rded_images_after_a_refused_resume(ray_cluster, finished_run, teacher, tmp_path,
                                                                       cli):
    """A changed image source is refused on the earlier run; with --force-new that run's outputs go and the shard
    actors commit RDED images (which need the teacher only, not squeeze's statistics) per class shard."""
    run_dir = tmp_path / "again"
    src, store = Store(str(finished_run.run_dir)), Store(str(run_dir))
    for stage in ("stats", "images", "labels"):
        copy_stage(src, store, stage)
    store.write_bytes("run.yaml", src.read_bytes("run.yaml"))
    before = tree_snapshot(run_dir)
    changed = ["--stages", "recover", *fault_args(run_dir, teacher, *RDED)]
    assert_one_line_error(cli(changed), "recover.source (was 'synthetic', now 'rded')")
    assert tree_snapshot(run_dir) == before
    _, summary = submit_ok(ray_cluster, ["--force-new", *changed])
    assert summary["recover"]["shards_done"] == CLASS_SHARDS
    assert store.list("stats") == store.list("labels") == []  # the earlier run's other stages went too
    assert yaml.safe_load((run_dir / "run.yaml").read_text())["config"]["recover"]["source"] == "rded"
    assert sorted(list_shards(store, "images")) == [f"shard-{i:05d}" for i in range(CLASS_SHARDS)]
    digests = set()
    for shard in list_shards(store, "images"):
        manifest = verify_shard(store, "images", shard)
        assert manifest is not None and manifest.meta["source"] == "rded" and manifest.meta["rded"]["candidates"] == 24
        assert len(manifest.objects) == 4  # recover.ipc
        digests.add(manifest.meta["inputs"])
    assert len(digests) == 1 and "" not in digests  # the teacher's digest, the same for every shard
