"""Tests for lpld_ray.store.storage: URIs, Store round trips, manifests, verification."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import uuid

import pytest

from lpld_ray.errors import StorageError
from lpld_ray.store.manifest import (
    MANIFEST_NAME,
    MANIFEST_SCHEMA_VERSION,
    Manifest,
    ObjectEntry,
    ShardWriter,
    list_shards,
    read_manifest,
    read_object,
    verify_shard,
)
from lpld_ray.store.storage import Store, read_uri_bytes
from lpld_ray.store.uris import check_uri, join_uri, shard_name


def _memory_root() -> str:
    return f"memory://test-{uuid.uuid4().hex}"


@pytest.fixture(params=["path", "file", "memory"])
def store(request, tmp_path) -> Store:
    if request.param == "path":
        return Store(str(tmp_path / "run"))
    if request.param == "file":
        return Store(f"file://{tmp_path}/run/")
    return Store(_memory_root() + "/")


def _write_shard(store: Store, stage: str = "images", shard: str = "shard-00003") -> Manifest:
    writer = ShardWriter(store, stage, shard)
    writer.put("a.bin", b"alpha" * 100)
    writer.put("sub/b.bin", b"\x00\x01\x02beta")
    return writer.commit(seed=7, meta={"classes": [3, 4]})


# --- URIs -------------------------------------------------------------------


@pytest.mark.parametrize("uri", ["/tmp/x", "rel/dir", "file:///tmp/x", "memory://a", "s3://b/p", "gs://b", "gcs://b/p"])
def test_check_uri_accepts_supported(uri):
    check_uri(uri)


def test_check_uri_rejects_other_scheme_with_one_line_message():
    with pytest.raises(StorageError) as err:
        check_uri("ftp://x/y")
    msg = str(err.value)
    assert msg == ("unsupported scheme 'ftp' in run directory 'ftp://x/y': "
                   "use a local path, file://, memory://, s3:// or gs://")
    assert "\n" not in msg


def test_check_uri_rejects_empty_and_store_checks_too():
    with pytest.raises(StorageError, match="empty"):
        check_uri("")
    with pytest.raises(StorageError, match="'hdfs'"):
        Store("hdfs://nn/run")


@pytest.mark.parametrize(
    "root, parts, expected",
    [
        ("s3://b/p", ("stage", "shard-00001", "x.bin"), "s3://b/p/stage/shard-00001/x.bin"),
        ("s3://b/p/", ("/stage/", "x"), "s3://b/p/stage/x"),
        ("/tmp/x", ("a", "b"), "/tmp/x/a/b"),
        ("/tmp/x//", ("a//b/",), "/tmp/x/a/b"),
        ("memory://", ("r", "a"), "memory://r/a"),
        ("/", ("a",), "/a"),
        ("s3://b/p/", (), "s3://b/p"),
        ("/tmp/x", ("", "a"), "/tmp/x/a"),
    ],
)
def test_join_uri(root, parts, expected):
    assert join_uri(root, *parts) == expected


def test_shard_name():
    assert shard_name(42) == "shard-00042"
    assert shard_name(0) == "shard-00000"
    assert shard_name("global") == "global"
    with pytest.raises(StorageError):
        shard_name(-1)


def test_read_uri_bytes_local_memory_and_missing(tmp_path):
    f = tmp_path / "w.pt"
    f.write_bytes(b"weights")
    assert read_uri_bytes(str(f)) == b"weights"
    assert read_uri_bytes(f"file://{f}") == b"weights"
    mem = Store(_memory_root())
    mem.write_bytes("t.pt", b"mem-weights")
    assert read_uri_bytes(mem.uri("t.pt")) == b"mem-weights"
    missing = str(tmp_path / "nope.pt")
    with pytest.raises(StorageError) as err:
        read_uri_bytes(missing)
    assert str(err.value) == f"file not found: '{missing}'"
    with pytest.raises(StorageError, match="unsupported scheme 'ftp' in file"):
        read_uri_bytes("ftp://host/w.pt")


# --- Store ------------------------------------------------------------------


def test_store_round_trip(store):
    assert not store.root.endswith("/")
    assert store.uri("a/b.txt") == store.root + "/a/b.txt"
    assert not store.exists("a/b.txt")
    store.write_bytes("a/deep/x.bin", b"\x00\xffdata")
    store.write_text("a/b.txt", "héllo")
    assert store.read_bytes("a/deep/x.bin") == b"\x00\xffdata"
    assert store.read_text("a/b.txt") == "héllo"
    assert store.exists("a/b.txt")
    store.write_text("a/b.txt", "short")  # plain overwrite, shorter than before
    assert store.read_text("a/b.txt") == "short"
    assert store.list("a") == ["b.txt", "deep/x.bin"]
    assert store.list("") == ["a/b.txt", "a/deep/x.bin"]
    assert store.list("absent") == []
    store.delete("a/b.txt")
    store.delete("a/b.txt")  # missing is fine
    assert not store.exists("a/b.txt")
    with pytest.raises(FileNotFoundError):
        store.read_bytes("a/b.txt")
    assert store.list("a") == ["deep/x.bin"]


def test_store_local_writes_under_root(tmp_path):
    store = Store(f"file://{tmp_path}/run")
    store.write_bytes("s/x.bin", b"1")
    assert (tmp_path / "run" / "s" / "x.bin").read_bytes() == b"1"


def test_store_rejects_parent_escape(tmp_path):
    store = Store(str(tmp_path / "run"))
    with pytest.raises(StorageError, match=r"\.\."):
        store.write_bytes("../outside.bin", b"x")
    assert not (tmp_path / "outside.bin").exists()


def test_memory_stores_are_separate_by_root():
    a, b = Store(_memory_root()), Store(_memory_root())
    a.write_bytes("x", b"1")
    assert not b.exists("x")


@pytest.mark.parametrize("kind", ["path", "memory"])
def test_create_exclusive(kind, tmp_path):
    store = Store(str(tmp_path / "run")) if kind == "path" else Store(_memory_root())
    assert store.create_exclusive("locks/owner", b"first") is True
    assert store.create_exclusive("locks/owner", b"second") is False
    assert store.read_bytes("locks/owner") == b"first"


def test_pyarrow_fs_local_is_usable(tmp_path):
    store = Store(str(tmp_path / "run"))
    store.write_bytes("keep", b"")
    fs, path = store.pyarrow_fs()
    assert os.path.isabs(path) and path == str(tmp_path / "run")
    fs.create_dir(f"{path}/train")
    with fs.open_output_stream(f"{path}/train/ckpt.bin") as out:
        out.write(b"from-arrow")
    assert store.read_bytes("train/ckpt.bin") == b"from-arrow"


def test_pyarrow_fs_memory_wraps_fsspec():
    import pyarrow.fs as pafs

    store = Store(_memory_root())
    fs, path = store.pyarrow_fs()
    assert isinstance(fs, pafs.PyFileSystem)
    assert "://" not in path
    fs.create_dir(f"{path}/train")
    with fs.open_output_stream(f"{path}/train/x.bin") as out:
        out.write(b"arrow")
    assert store.read_bytes("train/x.bin") == b"arrow"


# --- manifests and shards ------------------------------------------------------


def test_manifest_json_round_trip():
    m = Manifest(stage="labels", shard="global", objects=(ObjectEntry("p.parquet", 3, "a" * 64),),
                 seed=5, schema_version=MANIFEST_SCHEMA_VERSION, meta={"k": 1})
    doc = json.loads(m.to_json())
    assert set(doc) == {"schema_version", "stage", "shard", "seed", "meta", "objects"}
    assert Manifest.from_json(m.to_json()) == m


@pytest.mark.parametrize(
    "text, problem",
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "JSON object"),
        ('{"stage": "s", "shard": "x"}', "missing field"),
        ('{"schema_version": 99, "stage": "s", "shard": "x", "seed": 1, "meta": {}, "objects": []}',
         "schema_version 99"),
        ('{"schema_version": 1, "stage": "s", "shard": "x", "seed": "1", "meta": {}, "objects": []}', "'seed'"),
    ],
)
def test_manifest_from_json_errors(text, problem):
    with pytest.raises(StorageError, match=problem):
        Manifest.from_json(text)


def test_shard_writer_then_verify(store):
    written = _write_shard(store)
    raw = json.loads(store.read_text(f"images/shard-00003/{MANIFEST_NAME}"))
    assert raw["seed"] == 7 and raw["meta"] == {"classes": [3, 4]} and raw["schema_version"] == 1
    assert [o["name"] for o in raw["objects"]] == ["a.bin", "sub/b.bin"]
    assert raw["objects"][0]["sha256"] == hashlib.sha256(b"alpha" * 100).hexdigest()
    assert raw["objects"][0]["size"] == 500
    assert verify_shard(store, "images", "shard-00003") == written
    assert read_manifest(store, "images", "shard-00003") == written
    assert read_object(store, "images", "shard-00003", "sub/b.bin", written) == b"\x00\x01\x02beta"


def _corrupt_truncate(store, rel):
    store.write_bytes(rel, store.read_bytes(rel)[:-1])


def _corrupt_flip(store, rel):
    data = bytearray(store.read_bytes(rel))
    data[10] ^= 0x01
    store.write_bytes(rel, bytes(data))


@pytest.mark.parametrize(
    "corrupt, said",
    [
        (_corrupt_truncate, "size 499 != 500"),
        (_corrupt_flip, "sha256 mismatch"),
        (lambda s, rel: s.delete(rel), "missing"),
    ],
)
def test_verify_detects_bad_object(store, caplog, corrupt, said):
    _write_shard(store)
    rel = "images/shard-00003/a.bin"
    corrupt(store, rel)
    with caplog.at_level(logging.WARNING, logger="lpld_ray.store.manifest"):
        assert verify_shard(store, "images", "shard-00003") is None
    assert said in caplog.text and store.uri(rel) in caplog.text


def test_verify_rejects_invalid_json_manifest(store, caplog):
    _write_shard(store)
    rel = f"images/shard-00003/{MANIFEST_NAME}"
    store.write_text(rel, '{"schema_version": 1, "stage": "ima')  # torn write
    with caplog.at_level(logging.WARNING, logger="lpld_ray.store.manifest"):
        assert read_manifest(store, "images", "shard-00003") is None
        assert verify_shard(store, "images", "shard-00003") is None
    assert store.uri(rel) in caplog.text


def test_partial_shard_without_manifest_is_absent(store):
    writer = ShardWriter(store, "images", "shard-00009")
    writer.put("a.bin", b"data")
    assert store.exists("images/shard-00009/a.bin")
    assert read_manifest(store, "images", "shard-00009") is None
    assert verify_shard(store, "images", "shard-00009") is None
    assert list_shards(store, "images") == []


def test_verify_rejects_manifest_of_other_shard(store):
    _write_shard(store, shard="shard-00001")
    text = store.read_text(f"images/shard-00001/{MANIFEST_NAME}")
    store.write_text(f"images/shard-00002/{MANIFEST_NAME}", text)
    store.write_bytes("images/shard-00002/a.bin", store.read_bytes("images/shard-00001/a.bin"))
    store.write_bytes("images/shard-00002/sub/b.bin", store.read_bytes("images/shard-00001/sub/b.bin"))
    assert verify_shard(store, "images", "shard-00001") is not None
    assert verify_shard(store, "images", "shard-00002") is None


def test_writer_removes_stale_manifest_first(store):
    _write_shard(store)
    writer = ShardWriter(store, "images", "shard-00003")
    assert not store.exists(f"images/shard-00003/{MANIFEST_NAME}")
    assert verify_shard(store, "images", "shard-00003") is None
    writer.put("a.bin", b"new")
    new = writer.commit(seed=8)
    assert verify_shard(store, "images", "shard-00003") == new
    assert [o.name for o in new.objects] == ["a.bin"] and new.seed == 8


def test_writer_refuses_put_after_commit_and_bad_names(store):
    writer = ShardWriter(store, "images", "shard-00001")
    with pytest.raises(StorageError, match=MANIFEST_NAME):
        writer.put(MANIFEST_NAME, b"x")
    writer.commit(seed=1)
    with pytest.raises(StorageError, match="already committed"):
        writer.put("late.bin", b"x")
    with pytest.raises(StorageError, match="bad shard name"):
        ShardWriter(store, "images", "a/b")


def test_read_object_detects_corruption(store):
    manifest = _write_shard(store)
    _corrupt_flip(store, "images/shard-00003/a.bin")
    with pytest.raises(StorageError) as err:
        read_object(store, "images", "shard-00003", "a.bin", manifest)
    assert store.uri("images/shard-00003/a.bin") in str(err.value)
    _corrupt_truncate(store, "images/shard-00003/a.bin")
    with pytest.raises(StorageError, match="size 499"):
        read_object(store, "images", "shard-00003", "a.bin", manifest)
    with pytest.raises(StorageError, match="not listed"):
        read_object(store, "images", "shard-00003", "other.bin", manifest)


def test_list_shards(store):
    _write_shard(store, shard=shard_name(2))
    _write_shard(store, shard=shard_name(1))
    _write_shard(store, stage="labels", shard="global")
    partial = ShardWriter(store, "images", shard_name(3))
    partial.put("a.bin", b"x")
    store.write_text(f"images/shard-00004/nested/{MANIFEST_NAME}", "{}")  # not directly under the shard
    assert list_shards(store, "images") == ["shard-00001", "shard-00002"]
    assert list_shards(store, "labels") == ["global"]
    assert list_shards(store, "absent") == []


def test_s3_round_trip_with_moto():
    import boto3
    import moto.server as server_mod
    server = server_mod.ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    try:
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        bucket = f"b-{uuid.uuid4().hex[:12]}"
        boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="k", aws_secret_access_key="s",
                     region_name="us-east-1").create_bucket(Bucket=bucket)
        opts = {"key": "k", "secret": "s", "client_kwargs": {"endpoint_url": endpoint, "region_name": "us-east-1"}}
        store = Store(f"s3://{bucket}/run/", opts)
        manifest = _write_shard(store)
        assert verify_shard(store, "images", "shard-00003") == manifest
        assert list_shards(store, "images") == ["shard-00003"]
        assert store.create_exclusive("lock", b"1") is True
        assert store.create_exclusive("lock", b"2") is False
        assert read_uri_bytes(store.uri("lock"), opts) == b"1"
        _corrupt_truncate(store, "images/shard-00003/a.bin")
        assert verify_shard(store, "images", "shard-00003") is None
        assert store.list("images/shard-00003") == [MANIFEST_NAME, "a.bin", "sub/b.bin"]  # fills s3fs's listing cache
        # another process (its own s3fs instance) redoes the shard after this one listed it
        other = Store(store.root, dict(opts, skip_instance_cache=True))
        redone = _write_shard(other)
        assert verify_shard(store, "images", "shard-00003") == redone
        assert "shard-00003/c.bin" not in store.list("images")  # a listing of the parent caches the shard's too
        other.write_bytes("images/shard-00003/c.bin", b"late")
        assert "shard-00003/c.bin" in store.list("images")
        assert store.read_bytes("images/shard-00003/c.bin") == b"late"
        fs, path = store.pyarrow_fs()
        assert path == f"{bucket}/run"
        with fs.open_output_stream(f"{path}/train/x.bin") as out:
            out.write(b"arrow")
        assert store.read_bytes("train/x.bin") == b"arrow"
    finally:
        server.stop()


def test_copy_stage_keeps_shards_verifiable(tmp_path):
    from lpld_ray.store.manifest import copy_stage

    src, dst = Store(str(tmp_path / "a")), Store(str(tmp_path / "b"))
    writer = ShardWriter(src, "images", "shard-00000")
    writer.put("00000_0000.png", b"x" * 10)
    writer.put("00000_0001.png", b"y" * 7)
    writer.commit(seed=3)
    assert copy_stage(src, dst, "images") == 3
    manifest = verify_shard(dst, "images", "shard-00000")
    assert manifest is not None and manifest.seed == 3
    assert dst.read_bytes("images/shard-00000/00000_0001.png") == b"y" * 7


# --- pickling, equality, recursive delete -------------------------------------


def test_store_pickles_without_its_filesystem_and_reads_the_same_bytes(store):
    import pickle

    store.write_bytes("images/a.bin", b"payload")
    data = pickle.dumps(store)
    copy = pickle.loads(data)
    assert copy._opened is None and copy == store and hash(copy) == hash(store)
    assert copy.read_bytes("images/a.bin") == b"payload" and copy.list("images") == ["a.bin"]
    assert copy._opened is not None and repr(copy) == repr(store) == f"Store({store.root!r})"


def test_store_reopens_its_filesystem_in_a_forked_child(tmp_path):
    import multiprocessing

    store = Store(str(tmp_path / "run"))
    store.write_bytes("a.bin", b"parent")
    parent_fs = store._fs
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_child_reads, args=(store, queue))
    child.start()
    child.join(60)
    assert child.exitcode == 0 and queue.get(timeout=5) == (b"parent", True)
    assert store._fs is parent_fs  # the parent keeps its own


def _child_reads(store: Store, queue) -> None:
    before = store._opened
    data = store.read_bytes("a.bin")
    queue.put((data, store._opened is not before and store._opened[0] == os.getpid()))


def test_store_equality_is_root_and_options(tmp_path):
    a = Store(str(tmp_path / "run"))
    assert a == Store(str(tmp_path / "run")) and a != Store(str(tmp_path / "other"))
    assert Store("s3://b/run", {"key": "k"}) != Store("s3://b/run", {"key": "other"})
    assert Store("s3://b/run", {"key": "k"}) == Store("s3://b/run/", {"key": "k"})
    assert len({a, Store(str(tmp_path / "run"))}) == 1 and a != "run"


def test_delete_tree_is_one_recursive_rm(store, monkeypatch):
    for name in ("images/s0/a.bin", "images/s0/b.bin", "images/s1/c.bin", "labels/x.bin"):
        store.write_bytes(name, b"x")
    fs = store._fs
    calls = []
    real_rm = fs.rm
    monkeypatch.setattr(fs, "rm", lambda path, recursive=False, **kw: calls.append((path, recursive)) or
                        real_rm(path, recursive=recursive, **kw))
    monkeypatch.setattr(store, "delete", lambda rel: pytest.fail(f"one delete per object: {rel}"))
    assert store.delete_tree("images") == 3
    assert calls == [(store._path("images"), True)]
    assert store.list("images") == [] and store.list("labels") == ["x.bin"] and not store.exists("images/s0/a.bin")
    assert store.delete_tree("images") == 0 and store.delete_tree("never-there") == 0 and len(calls) == 1
    with pytest.raises(StorageError, match="delete_tree of the run root"):
        store.delete_tree("/")
    assert store.list("labels") == ["x.bin"]


def test_an_object_store_without_its_fsspec_package_names_the_extra(monkeypatch):
    import lpld_ray.store.storage as storage

    def missing(*_args, **_kwargs):
        raise ImportError("Install s3fs to access S3")

    monkeypatch.setattr(storage, "url_to_fs", missing)
    with pytest.raises(StorageError, match=r"needs the s3 extra of lpld-ray, which is not installed: pip install "
                                           r"'lpld-ray\[s3\]'"):
        storage.Store("s3://bucket/run")


def test_remembered_manifests_are_read_once_until_written_deleted_or_forgotten(tmp_path):
    """The driver's manifest memory within one job: later reads answer from memory; its own writes and deletes replace
    what it remembers; forget() drops what other processes may have written; other names (the lease) are always
    read; a pickled copy (an actor's) remembers nothing."""
    import pickle

    store, other = Store(str(tmp_path)), Store(str(tmp_path))  # other: another process's view of the same run
    other.write_text("images/s0/_MANIFEST.json", "v1")
    other.write_text("_lease/gen-1.json", "a")
    store.remember_texts("_MANIFEST.json")
    assert store.read_text("images/s0/_MANIFEST.json") == "v1" and store.read_text("_lease/gen-1.json") == "a"
    other.write_text("images/s0/_MANIFEST.json", "v2")
    other.write_text("_lease/gen-1.json", "b")
    assert store.read_text("images/s0/_MANIFEST.json") == "v1"  # remembered
    assert store.read_text("_lease/gen-1.json") == "b"  # not a manifest: read every time
    assert pickle.loads(pickle.dumps(store)).read_text("images/s0/_MANIFEST.json") == "v2"
    store.forget("images")
    assert store.read_text("images/s0/_MANIFEST.json") == "v2"
    store.write_text("images/s0/_MANIFEST.json", "v3")
    assert store.read_text("images/s0/_MANIFEST.json") == "v3"
    store.delete("images/s0/_MANIFEST.json")
    with pytest.raises(FileNotFoundError):
        store.read_text("images/s0/_MANIFEST.json")
    other.write_text("images/s0/_MANIFEST.json", "v4")
    assert store.read_text("images/s0/_MANIFEST.json") == "v4"  # an absent object is not remembered
    store.remember_texts(None)
    other.write_text("images/s0/_MANIFEST.json", "v5")
    assert store.read_text("images/s0/_MANIFEST.json") == "v5"
