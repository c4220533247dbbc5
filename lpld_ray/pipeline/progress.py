"""Progress of a stage over its shards: done/total, rate and ETA, logged at most every few seconds."""

from __future__ import annotations

import logging
import time

log = logging.getLogger(__name__)


class Progress:
    """Logs shards done/total, rate and ETA for one stage, at most every ``every_s`` seconds."""

    def __init__(self, stage: str, total: int, every_s: float) -> None:
        self.stage, self.total, self.every_s = stage, total, every_s
        self.done, self.started, self.last = 0, time.time(), 0.0

    def advance(self, n: int = 1) -> None:
        self.done += n
        now = time.time()
        if now - self.last >= self.every_s or self.done == self.total:
            self.last = now
            elapsed = now - self.started
            rate = self.done / elapsed if elapsed > 0 else 0.0
            eta = (self.total - self.done) / rate if rate > 0 else float("inf")
            log.info("%s: %d/%d shards, %.2f shards/min, elapsed %.0fs, ETA %.0fs",
                     self.stage, self.done, self.total, rate * 60, elapsed, eta)
