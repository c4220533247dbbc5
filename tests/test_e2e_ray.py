"""End to end through a real local Ray cluster: `ray job submit -- python jobs/distill.py` with a tiny config."""

from __future__ import annotations

import pytest

from conftest import TINY_OVERRIDES, tree_snapshot
from lpld_ray.storage import Store, list_shards, verify_shard

pytestmark = pytest.mark.ray


def job_args(run_dir, *extra: str) -> list[str]:
    args = ["--config", "jobs/configs/fashion_mnist.yaml", "--run-dir", str(run_dir)]
    for item in [*TINY_OVERRIDES, *extra]:
        args += ["--set", item]
    return args


@pytest.fixture(scope="module")
def finished_run(ray_cluster, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("e2e") / "run"
    result = ray_cluster.submit(job_args(run_dir))
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    return run_dir, result


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
    assert sorted(e.name for e in images.objects) == ["00002_0000.png", "00002_0001.png", "00003_0000.png", "00003_0001.png"]
    assert images.meta["classes"] == [2, 3]
    assert (run_dir / "report" / "contact_sheet.png").stat().st_size > 100
    assert "recover: 2/2 shards" in result.stdout + result.stderr


def test_resubmit_skips_verified_shards(ray_cluster, finished_run):
    run_dir, _ = finished_run
    before = tree_snapshot(run_dir / "images")
    teacher_before = tree_snapshot(run_dir / "teacher")
    result = ray_cluster.submit(job_args(run_dir))
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout + result.stderr
    assert "recover: 0 of 2 class shards to do" in out
    assert "verified weights already in the run" in out
    assert tree_snapshot(run_dir / "images") == before
    assert {k: v for k, v in tree_snapshot(run_dir / "teacher").items() if k.startswith("model")} == {
        k: v for k, v in teacher_before.items() if k.startswith("model")
    }


def test_partial_shard_is_redone(ray_cluster, finished_run):
    run_dir, _ = finished_run
    kept = tree_snapshot(run_dir / "images" / "shard-00000")
    (run_dir / "images" / "shard-00001" / "_MANIFEST.json").unlink()  # as if killed before the commit
    (run_dir / "images" / "shard-00001" / "00003_0001.png").write_bytes(b"half")
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
