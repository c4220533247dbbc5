"""Object storage on moto's S3 server: options from the storage: section, and one-line errors for bad buckets,
refused credentials and an unreachable store; credentials never appear in a message."""

from __future__ import annotations

import time

import pytest

from lpld_ray.config import StorageConfig
from lpld_ray.errors import StorageError
from lpld_ray.store.manifest import ShardWriter, verify_shard
from lpld_ray.store.storage import Store, read_uri_bytes, storage_options


def test_storage_options_come_from_the_section_and_only_for_s3():
    cfg = StorageConfig(endpoint_url="http://127.0.0.1:9", region="eu-west-1", access_key_id="AK", secret_access_key="SK",
                        retries=3, connect_timeout_s=2.0)
    opts = storage_options(cfg, "s3://bucket/run")
    assert opts["client_kwargs"] == {"endpoint_url": "http://127.0.0.1:9", "region_name": "eu-west-1"}
    assert (opts["key"], opts["secret"]) == ("AK", "SK") and "token" not in opts
    assert opts["config_kwargs"]["retries"] == {"max_attempts": 3, "mode": "standard"}
    assert opts["config_kwargs"]["connect_timeout"] == 2.0
    assert "key" not in storage_options(StorageConfig(), "s3://bucket/run")  # left to AWS_* environment variables
    assert storage_options(cfg, "/tmp/run") == {} and storage_options(cfg, "memory://x") == {}
    assert "SK" not in repr(cfg) and "SK" not in repr(Store("s3://bucket/run", opts))


def test_round_trip_and_exclusive_create_on_s3(moto_s3):
    store = Store(f"s3://{moto_s3.make_bucket()}/run", moto_s3.options())
    store.check_reachable()
    writer = ShardWriter(store, "images", "shard-00000")
    writer.put("a.png", b"abc")
    manifest = writer.commit(seed=1)
    assert verify_shard(store, "images", "shard-00000") == manifest
    assert store.create_exclusive("_lease/gen-00000000.json", b"1") is True
    assert store.create_exclusive("_lease/gen-00000000.json", b"2") is False  # S3 If-None-Match, enforced by moto
    assert store.delete_tree("images") == 2 and store.list("images") == []


def test_missing_bucket_is_one_line_and_writes_nothing(moto_s3):
    store = Store("s3://no-such-bucket-lpld/run", moto_s3.options())
    with pytest.raises(StorageError, match=r"bucket 'no-such-bucket-lpld' of run directory 's3://no-such-bucket-lpld/run' does not exist"):
        store.check_reachable()


def test_refused_credentials_name_the_object_not_the_secret(moto_s3, monkeypatch):
    import moto.settings

    store = Store(f"s3://{moto_s3.make_bucket()}/run", moto_s3.options())
    store.write_bytes("run.yaml", b"x")
    monkeypatch.setattr(moto.settings, "INITIAL_NO_AUTH_ACTION_COUNT", 0)  # moto now checks keys: ours is unknown
    other = Store(store.root, dict(moto_s3.options(), skip_instance_cache=True))
    for call in (other.check_reachable, lambda: other.read_bytes("run.yaml"), lambda: other.write_bytes("a", b"1")):
        with pytest.raises(StorageError, match="access denied while") as err:
            call()
        assert moto_s3.secret_key not in str(err.value) and "\n" not in str(err.value)


def test_unreachable_store_fails_after_bounded_retries_then_recovers(moto_s3):
    store = Store(f"s3://{moto_s3.make_bucket()}/run", moto_s3.options())
    store.write_bytes("images/a.bin", b"kept")
    moto_s3.stop()
    try:
        started = time.time()
        with pytest.raises(StorageError, match=r"object store unreachable while reading 's3://.*/run/images/a.bin' "
                                               r"\(endpoint http://127.0.0.1:\d+, 2 retries\)") as err:
            store.read_bytes("images/a.bin")
        assert time.time() - started < 60  # bounded: 2 retries with a 1 s connect timeout
        assert moto_s3.secret_key not in str(err.value)
        with pytest.raises(StorageError, match="unreachable while writing"):
            store.write_bytes("images/b.bin", b"new")
        with pytest.raises(StorageError, match="unreachable while reading"):
            read_uri_bytes(store.uri("images/a.bin"), moto_s3.options())
    finally:
        moto_s3.start()
    assert store.read_bytes("images/a.bin") == b"kept"


def test_pickled_s3_store_reads_the_same_bytes_and_hides_the_secret(moto_s3):
    import pickle

    store = Store(f"s3://{moto_s3.make_bucket()}/run", moto_s3.options())
    store.write_bytes("images/a.bin", b"abc" * 100)
    data = pickle.dumps(store)
    assert moto_s3.secret_key.encode() not in data and b"S3FileSystem" not in data
    copy = pickle.loads(data)
    assert copy == store and copy.storage_options == moto_s3.options() and copy._opened is None
    assert copy.read_bytes("images/a.bin") == b"abc" * 100 and copy.size("images/a.bin") == 300
    assert moto_s3.secret_key not in repr(copy)


def _unpickle_and_write(data: bytes, name: str) -> None:
    """In a fresh Python process: the pickled Store writes ``name`` (a worker of another process)."""
    import subprocess
    import sys
    from pathlib import Path

    code = ("import pickle, sys; store = pickle.loads(sys.stdin.buffer.read()); "
            f"store.write_bytes({name!r}, b'late'); assert store.list('images')")
    root = str(Path(__file__).resolve().parents[1])
    result = subprocess.run([sys.executable, "-c", code], input=data, capture_output=True, timeout=120,
                            env={**__import__("os").environ, "PYTHONPATH": root})
    assert result.returncode == 0, result.stderr.decode()[-2000:]


def test_listing_sees_what_another_process_wrote(moto_s3):
    import pickle

    store = Store(f"s3://{moto_s3.make_bucket()}/run", moto_s3.options())
    store.write_bytes("images/s0/a.bin", b"a")
    assert store.list("images") == ["s0/a.bin"] and store.folders("images") == ["s0"]
    assert not store.exists("images/s1/b.bin")
    _unpickle_and_write(pickle.dumps(store), "images/s1/b.bin")
    assert store.list("images") == ["s0/a.bin", "s1/b.bin"] and store.folders("images") == ["s0", "s1"]
    assert store.exists("images/s1/b.bin") and store.size("images/s1/b.bin") == 4
    other = Store(store.root, dict(moto_s3.options(), skip_instance_cache=True))  # its own s3fs client
    other.write_bytes("images/s0/c.bin", b"cc")
    assert store.list("images/s0") == ["a.bin", "c.bin"] and store.read_bytes("images/s0/c.bin") == b"cc"


def test_s3_store_works_in_a_forked_child(moto_s3):
    import multiprocessing

    store = Store(f"s3://{moto_s3.make_bucket()}/run", moto_s3.options())
    store.write_bytes("a.bin", b"parent")  # the parent's s3fs client and event loop are now running
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_child_reads_and_writes, args=(store, queue))
    child.start()
    child.join(90)
    if child.exitcode is None:
        child.kill()
    assert child.exitcode == 0 and queue.get(timeout=5) == b"parent"
    assert store.read_bytes("b.bin") == b"child" and store.list("") == ["a.bin", "b.bin"]


def _child_reads_and_writes(store: Store, queue) -> None:
    queue.put(store.read_bytes("a.bin"))
    store.write_bytes("b.bin", b"child")


def test_delete_tree_is_one_batched_delete_on_s3(moto_s3, monkeypatch):
    store = Store(f"s3://{moto_s3.make_bucket()}/run", moto_s3.options())
    names = [f"images/shard-{s:05d}/{i:03d}.png" for s in range(3) for i in range(7)]
    for name in names:
        store.write_bytes(name, b"x")
    store.write_bytes("labels/global/labels.parquet", b"y")
    fs = store._fs
    batches = []
    real_bulk = fs._bulk_delete

    async def bulk_spy(paths, **kw):
        batches.append(list(paths))
        return await real_bulk(paths, **kw)

    monkeypatch.setattr(fs, "_bulk_delete", bulk_spy)
    monkeypatch.setattr(store, "delete", lambda rel: pytest.fail(f"one request per object: {rel}"))
    assert store.delete_tree("images") == len(names)
    assert len(batches) == 1  # one DeleteObjects request for all 21 objects (s3fs adds the folder prefixes)
    assert {store._path(n) for n in names} <= set(batches[0])
    assert store.list("images") == [] and store.list("labels") == ["global/labels.parquet"]
    assert store.delete_tree("images") == 0 and store.delete_tree("nothing/here") == 0 and len(batches) == 1
