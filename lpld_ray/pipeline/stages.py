"""The stage table: one record per stage, from which the order, the input checks, --force-new and dispatch follow."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Callable

from lpld_ray.config import Config
from lpld_ray.pipeline.shards import ClassShard, stats_shard_for
from lpld_ray.pipeline.teacher import TEACHER_SHARD
from lpld_ray.store.layout import FOLDERS, IMAGES_STAGE, LABELS_STAGE, STATS_STAGE
from lpld_ray.store.manifest import content_digest, inputs_digest, required_manifests
from lpld_ray.store.storage import Store


@dataclass(frozen=True)
class Stage:
    """One stage: its name, what one unit of its work is, and which stages' committed output it reads."""

    name: str
    unit: str
    reads: Callable[[Config], tuple[str, ...]]

    @property
    def folder(self) -> str:
        """The folder under the run root this stage writes."""
        return FOLDERS[self.name]

    def needs_teacher(self, cfg: Config) -> bool:
        """Whether the stage loads the teacher's weights (given weights are evaluated by the teacher stage itself)."""
        return "teacher" in self.reads(cfg) or (self.name == "teacher" and bool(cfg.teacher.weights))


def _recover_reads(cfg: Config) -> tuple[str, ...]:
    return ("teacher", "squeeze") if cfg.recover.source == "synthetic" else ("teacher",)


STAGES: tuple[Stage, ...] = (
    Stage("teacher", "one Ray Train run (given weights: one evaluation on the test set)", lambda cfg: ()),
    Stage("squeeze", "data partitions, reduced and committed per class shard", lambda cfg: ("teacher",)),
    Stage("recover", "class shard", _recover_reads),
    Stage("relabel", "class shard (after every images shard exists)", lambda cfg: ("teacher", "recover")),
    Stage("train", "one Ray Train run per label pool", lambda cfg: ("recover", "relabel")),
    Stage("report", "one step on the driver", lambda cfg: ()),
)
STAGE_NAMES: tuple[str, ...] = tuple(stage.name for stage in STAGES)
BY_NAME: dict[str, Stage] = {stage.name: stage for stage in STAGES}


def output_shards(stage: str, cfg: Config, shards: list[ClassShard]) -> list[str]:
    """The shards of ``stage`` that a later stage reads (the teacher's only when it is trained in the run)."""
    if stage == "teacher":
        return [] if cfg.teacher.weights else [TEACHER_SHARD]
    if stage == "squeeze":
        return sorted({stats_shard_for(cfg.recover.statistics, s) for s in shards})
    if stage in ("recover", "relabel"):
        return [s.name for s in shards]
    raise ValueError(f"no later stage reads the output of stage '{stage}'")


# ----------------------------------------------------------------------------- inputs digests


def recover_inputs(cfg: Config, store: Store, shards: list[ClassShard], teacher_sha: str = "") -> dict[str, str]:
    """Per class shard, the digest of what its images are made from: its stats (synthetic), the teacher that scored
    the crops (rded), nothing ('' for random real images). Stats manifests are read once each, in parallel."""
    if cfg.recover.source == "rded":
        return dict.fromkeys((s.name for s in shards), hashlib.sha256(f"rded:{teacher_sha}".encode()).hexdigest())
    if cfg.recover.source != "synthetic":
        return dict.fromkeys((s.name for s in shards), "")
    stats_of = {s.name: stats_shard_for(cfg.recover.statistics, s) for s in shards}
    manifests = required_manifests(store, STATS_STAGE, sorted(set(stats_of.values())))
    return {name: content_digest([manifests[stats]]) for name, stats in stats_of.items()}


def relabel_inputs(store: Store, shards: list[ClassShard], teacher_sha: str) -> str:
    """Digest of every images shard (CutMix partners come from any class) and the teacher's weights."""
    images = inputs_digest(store, (IMAGES_STAGE,), [s.name for s in shards])
    return hashlib.sha256(f"{images}:{teacher_sha}".encode()).hexdigest()


def train_inputs(store: Store, shards: list[ClassShard]) -> str:
    """Digest of what the student learns from: every labels and images shard."""
    return inputs_digest(store, (LABELS_STAGE, IMAGES_STAGE), [s.name for s in shards])
