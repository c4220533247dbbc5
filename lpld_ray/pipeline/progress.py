"""Stage progress over shards: a tqdm bar on a terminal, else a done/total, rate and ETA log line every few seconds."""

from __future__ import annotations

import logging
import sys
import time
from typing import TextIO

from tqdm import tqdm

log = logging.getLogger(__name__)


def is_terminal(stream: TextIO) -> bool:
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty and isatty())
    except ValueError:  # a closed stream
        return False


class Progress:
    """Shards done/total, rate and ETA for one stage: a bar on a terminal (``stream``, stderr by default), else a log
    line at most every ``every_s`` seconds."""

    def __init__(self, stage: str, total: int, every_s: float, stream: TextIO | None = None) -> None:
        self.stage, self.total, self.every_s = stage, total, every_s
        self.done, self.started, self.last = 0, time.time(), 0.0
        stream = stream or sys.stderr
        self.bar = tqdm(total=total, desc=stage, unit="shard", file=stream, dynamic_ncols=True) \
            if is_terminal(stream) else None

    def advance(self, n: int = 1) -> None:
        self.done += n
        now = time.time()
        if self.bar is not None:
            self.bar.update(n)
            if self.done >= self.total:
                self.bar.close()
                self.log_line(now)
        elif now - self.last >= self.every_s or self.done == self.total:
            self.log_line(now)

    def log_line(self, now: float) -> None:
        self.last = now
        elapsed = now - self.started
        rate = self.done / elapsed if elapsed > 0 else 0.0
        eta = (self.total - self.done) / rate if rate > 0 else float("inf")
        log.info("%s: %d/%d shards, %.2f shards/min, elapsed %.0fs, ETA %.0fs",
                 self.stage, self.done, self.total, rate * 60, elapsed, eta)
