"""Issue 13 at CI size: C = 200 classes of 8 px images on S3 (moto, requests counted at the server), a 3-node Ray
cluster (head with 0 CPUs + two 1-CPU worker nodes); every stage completes, a driver SIGKILLed mid-recover is
resumed redoing only what was not committed, and a no-op re-run reads no data object of the run."""

from __future__ import annotations

import pytest

from lpld_ray.store.storage import Store
from lpld_ray.testing.folder_tree import write_teacher, write_tree
from lpld_ray.testing.ray_nodes import LocalRayCluster
from lpld_ray.testing.s3_counts import CountingS3
from lpld_ray.testing.scale_run import ScaleRun, ScaleSetup, scale_config, write_config

pytestmark = pytest.mark.ray

SETUP = ScaleSetup(classes=200, size=8, train_per_class=2, val_per_class=1, ipc=2)  # 10 class shards of 20


@pytest.fixture(scope="module")
def scale(tmp_path_factory):
    """The counting S3 server, the 3-node cluster, the generated tree and the config: (cluster, s3, config, bucket)."""
    folder = tmp_path_factory.mktemp("scale")
    with CountingS3() as s3, LocalRayCluster(workers=2, cpus_per_worker=1) as cluster:
        bucket = s3.make_bucket("scale-test")
        write_tree(Store(f"s3://{bucket}/data", s3.options()), SETUP.classes, SETUP.train_per_class,
                   SETUP.val_per_class, SETUP.size)
        teacher = write_teacher(folder / "teacher.pt", SETUP.arch, SETUP.classes, SETUP.size)
        config = write_config(folder / "config.yaml", scale_config(s3, SETUP, f"s3://{bucket}/data", teacher))
        yield cluster, s3, config, bucket, folder


@pytest.fixture(scope="module")
def killed_then_finished(scale) -> tuple[ScaleRun, dict]:
    """All stages in one job on a fresh run, its driver SIGKILLed once the first images shard is committed, then the
    same command again, which finishes the run: (the run, {"killed": ..., "rerun": ...})."""
    cluster, s3, config, bucket, folder = scale
    run = ScaleRun(cluster, s3, config, bucket, "run", folder / "logs")
    return run, run.kill_mid_recover(stages=None)


def test_driver_sigkill_mid_recover_redoes_only_the_uncommitted_shards(killed_then_finished):
    _, outcome = killed_then_finished
    committed = outcome["killed"]["shards_committed_before_kill"]
    assert outcome["killed"]["job_status"] == "FAILED"
    assert 0 < committed < SETUP.shards, "the kill did not land mid-recover"
    rerun = outcome["rerun"]
    assert rerun["ok"], rerun
    assert rerun["shards_redone"] == SETUP.shards - committed
    assert rerun["stages"]["squeeze"]["shards_written"] == 0  # committed before the kill, not redone


def test_every_stage_completes_on_three_nodes_over_s3(killed_then_finished):
    figures = killed_then_finished[1]["rerun"]
    assert figures["ok"], figures
    stages = figures["stages"]
    assert set(stages) == {"teacher", "squeeze", "recover", "relabel", "train", "report"}
    assert stages["relabel"]["shards_done"] == SETUP.shards
    assert all(part["driver_peak_rss_mib"] < 2048 for part in stages.values())
    images_redone = SETUP.class_shard_size * SETUP.ipc * stages["recover"]["shards_done"]
    assert figures["by_kind"]["PUT"]["images"] >= images_redone + stages["recover"]["shards_done"]  # images, manifests


def test_a_no_op_rerun_reads_manifests_not_data(killed_then_finished):
    run, _ = killed_then_finished
    figures = run.job("noop")
    assert figures["ok"], figures
    stages = figures["stages"]
    assert stages["recover"]["shards_done"] == stages["relabel"]["shards_done"] == 0
    assert stages["squeeze"]["shards_written"] == 0
    # nothing of a stage's own output is written again (report/ is rebuilt every time; _lease/ is the lease)
    written = {k: n for k, n in figures["by_kind"]["PUT"].items() if k in ("teacher", "stats", "images", "labels",
                                                                             "train", "run.yaml")}
    print("no-op re-run:", figures["requests"], figures["by_kind"])
    # each shard's manifest read about once per stage folder (stats, images, labels), not once per stage reading it
    assert figures["by_kind"]["GET"]["manifest"] <= 3 * SETUP.shards + 8, figures["by_kind"]["GET"]
    # the goal of issue 13: the driver decides from manifests alone, so no data object is read
    assert figures["run_data_gets"] == 0, (f"{figures['run_data_gets']} data objects of the run read, e.g. "
                                           f"{figures['run_data_get_examples']}; by kind {figures['by_kind']}")
    assert not written, written

