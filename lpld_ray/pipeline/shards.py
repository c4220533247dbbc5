"""Class shards: fixed, contiguous ranges of class ids, the unit of parallelism, retry and resume."""

from __future__ import annotations

from dataclasses import dataclass

from lpld_ray.store.uris import shard_name

GLOBAL_SHARD = "global"


@dataclass(frozen=True)
class ClassShard:
    """A fixed, contiguous range of class ids: the unit of parallelism, retry and resume."""

    index: int
    class_ids: tuple[int, ...]

    @property
    def name(self) -> str:
        return shard_name(self.index)


def plan_class_shards(num_classes: int, shard_size: int) -> list[ClassShard]:
    return [
        ClassShard(i, tuple(range(start, min(start + shard_size, num_classes))))
        for i, start in enumerate(range(0, num_classes, shard_size))
    ]


def stats_shard_for(statistics: str, shard: ClassShard) -> str:
    """The stats shard a recover shard's images are matched to (``recover.statistics``): its own classes'
    (class_wise, LPLD), or the global row (global, SRe2L)."""
    return shard.name if statistics == "class_wise" else GLOBAL_SHARD
