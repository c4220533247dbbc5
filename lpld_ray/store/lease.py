"""One writer per run: a lease object made with a conditional write, refreshed by the driver, taken over when stale."""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from dataclasses import asdict, dataclass, replace
from typing import Callable

from lpld_ray.config import StorageConfig
from lpld_ray.errors import LpldError, StorageError
from lpld_ray.store.storage import Store

log = logging.getLogger(__name__)

LEASE_DIR = "_lease"


@dataclass(frozen=True)
class LeaseRecord:
    """Who holds (or held) the run; one object per generation, never renamed."""

    generation: int
    job: str
    host: str
    pid: int
    pid_started: str
    acquired_unix: float
    refreshed_unix: float
    released: bool = False

    def describe(self, now: float) -> str:
        return f"job {self.job} (host {self.host}, pid {self.pid}, last refreshed {now - self.refreshed_unix:.0f}s ago)"


def job_name() -> str:
    """The Ray job submission id when run by `ray job submit`, else the local process."""
    try:
        metadata = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}")).get("metadata", {})
    except ValueError:
        metadata = {}
    return metadata.get("job_submission_id") or f"local-{socket.gethostname()}-{os.getpid()}"


def process_started(pid: int) -> str:
    """Start time of a local process (Linux clock ticks since boot) to tell a live pid from a reused one; '' if unknown."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as fh:
            return fh.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return ""


def _generation_name(generation: int) -> str:
    return f"{LEASE_DIR}/gen-{generation:08d}.json"


class RunLease:
    """The run's lease: ``acquire`` or refuse, keep fresh from a daemon thread, ``release`` at the end."""

    def __init__(self, store: Store, cfg: StorageConfig, clock: Callable[[], float] = time.time) -> None:
        self.store, self.cfg, self.clock = store, cfg, clock
        self.record: LeaseRecord | None = None
        self.lost_to: str | None = None
        self._stop = threading.Event()
        self._lock = threading.Lock()  # refresh and release never interleave their writes
        self._thread: threading.Thread | None = None
        self._refreshed_ok = clock()

    def _generations(self) -> list[int]:
        names = (n for n in self.store.list(LEASE_DIR) if n.startswith("gen-") and n.endswith(".json"))
        return sorted(int(n[4:-5]) for n in names if n[4:-5].isdigit())

    def _read(self, generation: int) -> LeaseRecord | None:
        try:
            return LeaseRecord(**json.loads(self.store.read_text(_generation_name(generation))))
        except FileNotFoundError:
            return None
        except (ValueError, TypeError) as err:
            log.warning("ignoring unreadable lease %s: %s", self.store.uri(_generation_name(generation)), err)
            return None

    def _is_free(self, holder: LeaseRecord | None, now: float) -> bool:
        """Released, unreadable, older than the timeout, or held by a process of this host that is gone."""
        if holder is None or holder.released or now - holder.refreshed_unix > self.cfg.lease_timeout_s:
            return True
        return holder.host == socket.gethostname() and process_started(holder.pid) != holder.pid_started

    def acquire(self) -> LeaseRecord:
        """Take the next generation with a conditional create; raise naming the holder when the run is in use."""
        now = self.clock()
        generations = self._generations()
        top = generations[-1] if generations else -1
        holder = self._read(top) if generations else None
        if not self._is_free(holder, now):
            raise self._in_use(holder, now)
        if holder is not None and not holder.released:
            log.warning("taking over the run's lease from %s", holder.describe(now))
        pid = os.getpid()
        record = LeaseRecord(top + 1, job_name(), socket.gethostname(), pid, process_started(pid), now, now)
        if not self.store.create_exclusive(_generation_name(record.generation), self._encode(record)):
            raise self._in_use(self._read(record.generation), now)  # another job won the race for this generation
        self.record = record
        for old in generations:
            self.store.delete(_generation_name(old))
        log.info("holding the run's lease as %s (generation %d)", record.job, record.generation)
        return record

    def _in_use(self, holder: LeaseRecord | None, now: float) -> LpldError:
        who = holder.describe(now) if holder else "another job"
        return LpldError(f"run directory '{self.store.root}' is in use by {who}: wait for it to end, stop it, or use "
                         f"another --run-dir (a lease not refreshed for {self.cfg.lease_timeout_s:g}s is taken over)")

    @staticmethod
    def _encode(record: LeaseRecord) -> bytes:
        return json.dumps(asdict(record)).encode()

    def refresh(self) -> bool:
        """Rewrite our lease with the current time; False (and ``lost_to`` set) when a later generation exists."""
        with self._lock:
            return self._refresh()

    def _refresh(self) -> bool:
        assert self.record is not None, "refresh before acquire"
        newer = [g for g in self._generations() if g > self.record.generation]
        if newer:
            holder = self._read(newer[-1])
            self.lost_to = holder.job if holder else f"generation {newer[-1]}"
            return False
        self.record = replace(self.record, refreshed_unix=self.clock())
        self.store.write_bytes(_generation_name(self.record.generation), self._encode(self.record))
        self._refreshed_ok = self.record.refreshed_unix
        return True

    def release(self) -> None:
        """Mark our generation released (kept as a tombstone so a stalled old holder sees it lost the run)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        if self.record is None or self.lost_to is not None:
            return
        try:
            with self._lock:
                if self._refresh():
                    self.record = replace(self.record, released=True)
                    self.store.write_bytes(_generation_name(self.record.generation), self._encode(self.record))
        except StorageError as err:
            log.warning("could not release the run's lease (it expires after %gs): %s", self.cfg.lease_timeout_s, err)

    def keep_fresh(self, on_lost: Callable[[str], None]) -> None:
        """Refresh every ``lease_refresh_s`` from a daemon thread; ``on_lost(job)`` when another job took the run."""
        def loop() -> None:
            while not self._stop.wait(self.cfg.lease_refresh_s):
                try:
                    if not self.refresh():
                        on_lost(self.lost_to or "another job")
                        return
                except Exception as err:  # noqa: BLE001 - transient unless it lasts: the next refresh tries again
                    log.warning("could not refresh the run's lease: %s", err)
                stale_for = self.clock() - self._refreshed_ok
                if stale_for > self.cfg.lease_timeout_s - self.cfg.lease_refresh_s:  # another job may take it over
                    self.lost_to = f"nobody yet (not refreshed for {stale_for:.0f}s)"
                    on_lost(self.lost_to)
                    return

        self._thread = threading.Thread(target=loop, name="lpld-lease", daemon=True)
        self._thread.start()
