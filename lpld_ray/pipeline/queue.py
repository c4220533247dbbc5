"""The bookkeeping of a class-shard queue without Ray: what is pending, and how often a shard may lose its worker."""

from __future__ import annotations

import logging
from collections import deque

from lpld_ray.pipeline.shards import ClassShard

log = logging.getLogger(__name__)


class ShardLost(RuntimeError):
    """A shard lost its worker more often than the retries allow."""


class ShardQueue:
    """Pending shards in order; a shard whose worker died goes back to the front, at most ``max_retries`` times."""

    def __init__(self, stage: str, pending: list[ClassShard], max_retries: int) -> None:
        self.stage, self.max_retries = stage, max_retries
        self._pending = deque(pending)
        self.attempts = {s.index: 0 for s in pending}

    def __bool__(self) -> bool:
        return bool(self._pending)

    def __len__(self) -> int:
        return len(self._pending)

    def take(self) -> ClassShard:
        """The next shard to hand to an idle worker."""
        return self._pending.popleft()

    def worker_lost(self, shard: ClassShard, why: str) -> None:
        """Put ``shard`` back at the front; ShardLost once it has lost more than ``max_retries`` workers."""
        self.attempts[shard.index] += 1
        if self.attempts[shard.index] > self.max_retries:
            raise ShardLost(f"{self.stage} shard {shard.name} lost its worker {self.attempts[shard.index]} times "
                            f"(runner.max_shard_retries is {self.max_retries}); last: {why}")
        log.warning("%s: worker for %s died (%s); shard goes back on the queue", self.stage, shard.name, why)
        self._pending.appendleft(shard)
