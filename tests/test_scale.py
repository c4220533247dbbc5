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
def finished(scale) -> tuple[ScaleRun, dict]:
    """Every stage in one job on a fresh run: (the run, the job's figures)."""
    cluster, s3, config, bucket, folder = scale
    run = ScaleRun(cluster, s3, config, bucket, "run", folder / "logs")
    return run, run.job("all")


def test_every_stage_completes_on_three_nodes_over_s3(finished):
    _, figures = finished
    assert figures["ok"], figures
    stages = figures["stages"]
    assert set(stages) == {"teacher", "squeeze", "recover", "relabel", "train", "report"}
    assert stages["recover"]["shards_done"] == stages["relabel"]["shards_done"] == SETUP.shards
    assert all(part["driver_peak_rss_mib"] < 2048 for part in stages.values())
    images = SETUP.classes * SETUP.ipc
    assert figures["by_kind"]["PUT"]["images"] >= images + SETUP.shards  # every image and every manifest


def test_a_no_op_rerun_reads_manifests_not_data(finished):
    run, _ = finished
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


def test_driver_sigkill_mid_recover_redoes_only_the_uncommitted_shards(scale, finished):
    cluster, s3, config, bucket, folder = scale
    run, _ = finished
    killed = ScaleRun(cluster, s3, config, bucket, "run-kill", folder / "logs")
    killed.copy_prefixes(run, ("run.yaml", "teacher/", "stats/"))
    outcome = killed.kill_mid_recover()
    committed = outcome["killed"]["shards_committed_before_kill"]
    assert outcome["killed"]["job_status"] == "FAILED"
    assert 0 < committed < SETUP.shards, "the kill did not land mid-recover"
    rerun = outcome["rerun"]
    assert rerun["ok"], rerun
    assert rerun["shards_redone"] == SETUP.shards - committed
