"""The run's lease: one writer per run directory, taken over only when stale or its process is gone."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from lpld_ray.config import StorageConfig
from lpld_ray.errors import LpldError
from lpld_ray.store.lease import LEASE_DIR, RunLease
from lpld_ray.store.storage import Store


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


CFG = StorageConfig(lease_timeout_s=60, lease_refresh_s=5)


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path):
    if request.param == "local":
        return Store(str(tmp_path / "run"))
    moto_s3 = request.getfixturevalue("moto_s3")
    return Store(f"s3://{moto_s3.make_bucket()}/run", moto_s3.options())


def foreign_holder(store: Store, clock: Clock, generation: int = 0, **fields) -> None:
    """A lease written by a job on another host."""
    record = {"generation": generation, "job": "raysubmit_other", "host": "elsewhere", "pid": 1, "pid_started": "1",
              "acquired_unix": clock.now, "refreshed_unix": clock.now, "released": False, **fields}
    assert store.create_exclusive(f"{LEASE_DIR}/gen-{generation:08d}.json", json.dumps(record).encode())


def test_second_job_is_refused_naming_the_first(store):
    clock = Clock()
    first = RunLease(store, CFG, clock)
    first.acquire()
    clock.now += 30
    with pytest.raises(LpldError, match=rf"is in use by job {first.record.job} .*last refreshed 30s ago"):
        RunLease(store, CFG, clock).acquire()


def test_stale_lease_is_taken_over_and_the_old_holder_learns_it_lost(store):
    clock = Clock()
    foreign_holder(store, clock)
    clock.now += 59
    with pytest.raises(LpldError, match="raysubmit_other"):
        RunLease(store, CFG, clock).acquire()
    clock.now += 2  # 61 s without a refresh > 60 s timeout
    taker = RunLease(store, CFG, clock)
    assert taker.acquire().generation == 1
    assert store.list(LEASE_DIR) == ["gen-00000001.json"]
    old = RunLease(store, CFG, clock)
    old.record = taker.record.__class__(**{**taker.record.__dict__, "generation": 0})
    assert old.refresh() is False and old.lost_to == taker.record.job


def test_refresh_keeps_the_lease_alive(store):
    clock = Clock()
    holder = RunLease(store, CFG, clock)
    holder.acquire()
    for _ in range(5):
        clock.now += 40
        assert holder.refresh()
    with pytest.raises(LpldError, match="in use"):
        RunLease(store, CFG, clock).acquire()  # 200 s after acquiring, but refreshed 0 s ago


def test_release_leaves_a_tombstone_and_frees_the_run(store):
    clock = Clock()
    first = RunLease(store, CFG, clock)
    first.acquire()
    first.release()
    second = RunLease(store, CFG, clock)
    assert second.acquire().generation == 1
    first.record = first.record.__class__(**{**first.record.__dict__, "released": False})
    assert first.refresh() is False  # a stalled earlier holder sees the later generation


def test_dead_process_on_this_host_is_taken_over_at_once(tmp_path):
    store = Store(str(tmp_path / "run"))
    child = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(child.stdout)
    import socket

    clock = Clock()
    foreign_holder(store, clock, host=socket.gethostname(), pid=pid, pid_started="12345")
    assert RunLease(store, CFG, clock).acquire().generation == 1


def test_losing_the_race_for_a_generation_names_the_winner(store, monkeypatch):
    clock = Clock()
    loser = RunLease(store, CFG, clock)
    monkeypatch.setattr(loser, "_generations", lambda: [])  # it listed before the winner wrote
    winner = RunLease(store, CFG, clock)
    winner.acquire()
    with pytest.raises(LpldError, match=f"in use by job {winner.record.job}"):
        loser.acquire()
