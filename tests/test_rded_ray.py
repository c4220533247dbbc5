"""RDED end to end: `ray job submit -- python jobs/distill.py` with recover.source rded and the tiny config."""

from __future__ import annotations

import logging

import pytest
from conftest import CLASS_SHARDS, job_args, submit_ok

from lpld_ray.store.manifest import list_shards, verify_shard
from lpld_ray.store.storage import Store

pytestmark = pytest.mark.ray
log = logging.getLogger(__name__)

RDED = ["recover.source=rded", "rded.candidates=24", "rded.crops=3", "rded.factor=2", "rded.batch_size=32"]


def test_rded_images_are_committed_per_class_shard_through_ray(ray_cluster, finished_run, tmp_path):
    run_dir = tmp_path / "rded"
    args = job_args(run_dir, *RDED, f"teacher.weights={finished_run.teacher}") + ["--stages", "squeeze,recover"]
    output, summary = submit_ok(ray_cluster, args)
    log.info("rded job: %s", {k: v.get("wall_seconds") for k, v in summary.items()})
    assert summary["recover"]["shards_done"] == CLASS_SHARDS
    store = Store(str(run_dir))
    assert sorted(list_shards(store, "images")) == [f"shard-{i:05d}" for i in range(CLASS_SHARDS)]
    digests = set()
    for shard in list_shards(store, "images"):
        manifest = verify_shard(store, "images", shard)
        assert manifest is not None and manifest.meta["source"] == "rded" and manifest.meta["rded"]["candidates"] == 24
        assert len(manifest.objects) == 4  # recover.ipc
        digests.add(manifest.meta["inputs"])
    assert len(digests) == 1 and "" not in digests  # the teacher's digest, the same for every shard
    # a resumed stage is tested in-process (tests/test_rded.py): a second job here would double this test's time
