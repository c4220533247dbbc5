"""Stage planning without Ray: the stage order, and what each asked stage needs from the run already."""

from __future__ import annotations

from lpld_ray.config import Config
from lpld_ray.errors import LpldError
from lpld_ray.pipeline.teacher import TEACHER_SHARD, TEACHER_STAGE
from lpld_ray.pipeline.units import GLOBAL_SHARD, IMAGES_STAGE, STATS_STAGE, ClassShard
from lpld_ray.store.manifest import read_manifest, shard_problem
from lpld_ray.store.storage import Store

STAGE_ORDER = ("teacher", "squeeze", "recover", "relabel", "train", "report")
STAGE_FOLDERS = ("teacher", "stats", "images", "labels", "train", "report")  # what each stage writes, in order


def require_stage(store: Store, stage: str, names: list[str], needed_by: str, producer: str, fresh: bool = False) -> None:
    """Fail with one line naming the missing stage when a later stage's inputs are absent (or all are, when ``fresh``).
    Only manifests are read here; the stage that reads the objects verifies them."""
    missing = list(names) if fresh else [n for n in names if read_manifest(store, stage, n) is None]
    if missing:
        raise LpldError(f"{needed_by} needs the {producer} stage's output, but {stage}/{missing[0]} is missing "
                        f"({len(missing)} of {len(names)} shards): run with --stages {producer},{needed_by}")


def check_stage_inputs(cfg: Config, store: Store, stages: list[str], shards: list[ClassShard], fresh: bool = False) -> None:
    """Before any work: every asked stage's input is either made by an earlier asked stage or already in the run
    (``fresh``: the run is about to be emptied, so nothing in it counts)."""
    from lpld_ray.pipeline.labels import LABELS_STAGE

    names = [s.name for s in shards]
    needs_teacher = {"squeeze", "recover", "relabel"} & set(stages)
    if needs_teacher and "teacher" not in stages and not cfg.teacher.weights:
        require_stage(store, TEACHER_STAGE, [TEACHER_SHARD], sorted(needs_teacher)[0], "teacher", fresh)
    if "recover" in stages and "squeeze" not in stages and cfg.recover.source == "synthetic":
        needed = names if cfg.recover.batching == "class_wise" else [GLOBAL_SHARD]
        require_stage(store, STATS_STAGE, needed, "recover", "squeeze", fresh)
    for stage in ("relabel", "train"):
        if stage in stages and "recover" not in stages:
            require_stage(store, IMAGES_STAGE, names, stage, "recover", fresh)
    if "train" in stages and "relabel" not in stages:
        require_stage(store, LABELS_STAGE, names, "train", "relabel", fresh)
        require_label_schema(store, names)


def require_label_schema(store: Store, names: list[str]) -> None:
    """Fail with one line naming the shard when a labels shard has a schema version this lpld_ray cannot read."""
    from lpld_ray.pipeline.labels import LABELS_STAGE
    from lpld_ray.store.label_table import LABEL_SCHEMA_VERSION

    for name in names:
        manifest = read_manifest(store, LABELS_STAGE, name)
        found = manifest.meta.get("schema_version") if manifest else LABEL_SCHEMA_VERSION
        if found != LABEL_SCHEMA_VERSION:
            raise LpldError(f"train cannot read {LABELS_STAGE}/{name}: label schema version {found} is not supported "
                            f"(supported: {LABEL_SCHEMA_VERSION}): run with --stages relabel,train to redo it")


def require_verified(store: Store, stage: str, names: list[str], needed_by: str, producer: str) -> None:
    """Fail with one line naming the object when an input shard does not verify (truncated, altered, missing)."""
    for name in names:
        _manifest, problem = shard_problem(store, stage, name)
        if problem is not None:
            raise LpldError(f"{needed_by} will not use {stage}/{name}: {problem}; run with --stages {producer},{needed_by} "
                            "to redo it")
