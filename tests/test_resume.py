"""What is done is decided from manifests alone (read in parallel), the bytes are checked by their reader, and a
damaged shard found by a reader is redone from its producing stage before anything uses it; no Ray."""

from __future__ import annotations

import dataclasses

import pytest

from lpld_ray.config import Config
from lpld_ray.distributed import driver
from lpld_ray.errors import LpldError
from lpld_ray.store.manifest import (
    MANIFEST_NAME,
    CorruptShard,
    ShardWriter,
    current_shards,
    read_manifests,
    read_object,
)
from lpld_ray.store.storage import Store

NAMES = [f"shard-{i:05d}" for i in range(40)]


class CountingStore(Store):
    """A local Store that records the objects whose bytes are read."""

    def __init__(self, root: str) -> None:
        super().__init__(root)
        self.read: list[str] = []

    def read_bytes(self, rel: str, size: int | None = None) -> bytes:
        self.read.append(rel)
        return super().read_bytes(rel, size)

    def sha256(self, rel: str) -> str:
        self.read.append(rel)
        return super().sha256(rel)


def committed(tmp_path, inputs: str = "in") -> CountingStore:
    store = CountingStore(str(tmp_path / "run"))
    for name in NAMES:
        writer = ShardWriter(store, "images", name)
        writer.put("a.png", name.encode() * 100)
        writer.commit(seed=0, meta={"inputs": inputs})
    store.read.clear()
    return store


def test_done_is_decided_from_manifests_alone_and_verify_reads_every_object(tmp_path):
    store = committed(tmp_path)
    store.write_bytes("images/shard-00007/a.png", b"truncated")  # damaged after its commit
    store.delete(f"images/shard-00009/{MANIFEST_NAME}")  # cut off before its commit
    inputs = dict.fromkeys(NAMES, "in") | {"shard-00011": "other"}  # made from other inputs
    done = current_shards(store, "images", inputs)
    assert [n for n, m in done.items() if m is None] == ["shard-00009", "shard-00011"]
    assert store.read and all(rel.endswith(MANIFEST_NAME) for rel in store.read)  # no data object read
    store.read.clear()
    checked = current_shards(store, "images", inputs, verify=True)
    assert [n for n, m in checked.items() if m is None] == ["shard-00007", "shard-00009", "shard-00011"]
    assert "images/shard-00012/a.png" in store.read


def test_manifests_are_read_in_parallel_in_their_order(tmp_path):
    store = committed(tmp_path)
    manifests = read_manifests(store, "images", reversed(NAMES))
    assert list(manifests) == NAMES[::-1] and all(m.shard == n for n, m in manifests.items())


def test_the_reader_names_the_damaged_shard(tmp_path):
    store = committed(tmp_path)
    manifest = read_manifests(store, "images", ["shard-00003"])["shard-00003"]
    store.write_bytes("images/shard-00003/a.png", b"x" * manifest.objects[0].size)
    with pytest.raises(CorruptShard, match="images/shard-00003/a.png: sha256 mismatch") as err:
        read_object(store, "images", "shard-00003", "a.png", manifest)
    assert (err.value.stage, err.value.shard) == ("images", "shard-00003")
    assert isinstance(pickle_round_trip(err.value), CorruptShard)  # crosses from a Ray worker as itself


def pickle_round_trip(err: CorruptShard) -> CorruptShard:
    import pickle

    back = pickle.loads(pickle.dumps(err))
    assert (back.stage, back.shard, str(back)) == (err.stage, err.shard, str(err))
    return back


@pytest.fixture
def fake_stages(monkeypatch):
    """The driver's stage loop with stage functions that record their calls; ``damage`` holds the CorruptShards the
    next calls of a stage raise, one per call."""
    calls: list[str] = []
    damage: dict[str, list[CorruptShard]] = {}

    def runner(name):
        def run(_ctx):
            calls.append(name)
            if damage.get(name):
                raise damage[name].pop(0)
            return {}
        return run

    monkeypatch.setattr(driver, "init_ray", lambda: None)
    monkeypatch.setattr(driver.StageRun, "load_teacher", lambda self: None)
    monkeypatch.setattr(driver, "RUNNERS", {name: runner(name) for name in driver.RUNNERS})
    return calls, damage


def test_a_damaged_shard_found_by_a_reader_is_redone_from_its_producer(tmp_path, fake_stages):
    calls, damage = fake_stages
    store = committed(tmp_path)
    damage["train"] = [CorruptShard("images", "shard-00001", "images/shard-00001/a.png: sha256 mismatch")]
    summary = driver.run_pipeline(Config(), store, ["recover", "relabel", "train", "report"], 10)
    assert calls == ["recover", "relabel", "train", "recover", "relabel", "train", "report"]
    assert not store.exists(f"images/shard-00001/{MANIFEST_NAME}")  # no longer counts as done: recover redid it
    assert store.exists(f"images/shard-00002/{MANIFEST_NAME}")
    assert {"wall_seconds", "driver_cpu_seconds", "driver_peak_rss_mib"} <= set(summary["train"])


def test_a_damaged_shard_whose_producer_is_not_asked_stops_with_one_line(tmp_path, fake_stages):
    calls, damage = fake_stages
    store = committed(tmp_path)
    damage["train"] = [CorruptShard("images", "shard-00001", "images/shard-00001/a.png: sha256 mismatch")]
    with pytest.raises(LpldError, match="train found images/shard-00001/a.png: sha256 mismatch .its stage is not "
                                        "asked.; the shard now counts as not done: run with --stages recover,train$"):
        driver.run_pipeline(Config(), store, ["train"], 10)
    assert calls == ["train"] and not store.exists(f"images/shard-00001/{MANIFEST_NAME}")


def test_damage_that_keeps_coming_back_stops_after_max_redos(tmp_path, fake_stages):
    calls, damage = fake_stages
    store = committed(tmp_path)
    damage["relabel"] = [CorruptShard("images", "shard-00004", "bad") for _ in range(driver.MAX_REDOS + 1)]
    with pytest.raises(LpldError, match=f"redone {driver.MAX_REDOS} times already"):
        driver.run_pipeline(Config(), store, ["recover", "relabel"], 10)
    assert calls == ["recover", "relabel"] * (driver.MAX_REDOS + 1)


def test_a_resumed_run_checks_its_image_folder_top_level_only(tmp_path, monkeypatch):
    """The job that writes run.yaml lists both splits in full and decodes an image of each; a job resuming that run
    with the same data section lists the class folders only (a full listing of 21K-P is 11,000 LIST pages)."""
    from PIL import Image

    from lpld_ray.cli import check_data
    from lpld_ray.config import DataConfig
    from lpld_ray.config_io import replace
    from lpld_ray.store.run_record import data_checked_before, write_run_record

    for split, count in (("train", 2), ("val", 1)):
        for name in ("a", "b", "c"):
            (tmp_path / "tree" / split / name).mkdir(parents=True)
            for i in range(count):
                Image.new("RGB", (8, 8), (i, 0, 0)).save(tmp_path / "tree" / split / name / f"{i}.png")
    cfg = Config(data=DataConfig(name="image_folder", root=str(tmp_path / "tree"), image_size=8, num_classes=2))
    run = Store(str(tmp_path / "run"))
    assert not data_checked_before(run, cfg)
    full = check_data(cfg)
    write_run_record(run, cfg)
    listed: list[str] = []
    original = Store.list
    monkeypatch.setattr(Store, "list", lambda self, rel: listed.append(rel) or original(self, rel))
    assert data_checked_before(run, cfg)
    assert check_data(cfg, checked_before=True) == dataclasses.replace(full, train_images=None)
    assert listed == []  # no recursive listing of train/ or val/
    other = replace(cfg, data=replace(cfg.data, num_classes=3))
    assert not data_checked_before(run, other)  # another data section: checked in full
    check_data(other)
    assert sorted(listed) == ["train", "val"]
