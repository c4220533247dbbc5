"""--force-new: what an earlier run wrote (and only that), so that starting over never deletes a user's own files."""

from __future__ import annotations

from lpld_ray.errors import LpldError
from lpld_ray.pipeline.plots import CURVE_OBJECT
from lpld_ray.pipeline.report import REPORT_OBJECT
from lpld_ray.pipeline.report_md import REPORT_MD_OBJECT
from lpld_ray.pipeline.sheet import SHEET_OBJECT
from lpld_ray.pipeline.stages import STAGES
from lpld_ray.store.layout import RUN_RECORD, TRAIN_RUN_PREFIX
from lpld_ray.store.manifest import MANIFEST_NAME, list_shards, read_manifest
from lpld_ray.store.storage import Store


def written_by_the_run(store: Store) -> list[str]:
    """Objects the run at ``store`` wrote: every shard's manifest and the objects it lists, Ray Train's checkpoint
    folders, the report, and run.yaml last. Anything else under the root is the user's and is kept."""
    objects: list[str] = []
    for stage in STAGES:
        for shard in list_shards(store, stage.folder):
            manifest = read_manifest(store, stage.folder, shard)
            listed = [e.name for e in manifest.objects] if manifest else []
            objects += [f"{stage.folder}/{shard}/{name}" for name in listed]
            objects.append(f"{stage.folder}/{shard}/{MANIFEST_NAME}")
        objects += [f"{stage.folder}/{name}" for name in store.list(stage.folder)
                    if name.startswith(TRAIN_RUN_PREFIX) and "/" in name]
    objects += [rel for rel in (REPORT_OBJECT, REPORT_MD_OBJECT, SHEET_OBJECT, CURVE_OBJECT) if store.exists(rel)]
    return [*objects, RUN_RECORD]


def require_a_run(store: Store) -> None:
    """--force-new refuses a folder that holds no run: there is nothing of a run's to delete there."""
    if not store.exists(RUN_RECORD):
        raise LpldError(f"--force-new: '{store.root}' holds no run (no {RUN_RECORD}), so there is nothing to start "
                        "over: leave out --force-new, or give the --run-dir of an earlier run")


def start_over(store: Store) -> int:
    """Delete what the earlier run wrote (manifest-listed objects and manifests, checkpoints, report, run.yaml);
    returns how many objects were deleted."""
    objects = written_by_the_run(store)
    for rel in objects:
        store.delete(rel)
    return len(objects)
