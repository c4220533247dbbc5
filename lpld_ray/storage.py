"""Run storage over fsspec: str URIs, a run-root Store, and shard manifests (data first, manifest last)."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import fsspec
from fsspec.core import url_to_fs
from fsspec.implementations.local import LocalFileSystem

from lpld_ray.errors import StorageError

if TYPE_CHECKING:
    import pyarrow.fs

log = logging.getLogger(__name__)

SUPPORTED_SCHEMES: tuple[str, ...] = ("file", "memory", "s3", "gs", "gcs")
MANIFEST_NAME = "_MANIFEST.json"
MANIFEST_SCHEMA_VERSION = 1
_ALLOWED = "use a local path, file://, memory://, s3:// or gs://"
_CHUNK = 8 << 20


def _scheme(uri: str) -> str | None:
    """The scheme before '://', lower-cased; None for a plain path."""
    return uri.split("://", 1)[0].lower() if "://" in uri else None


def check_uri(uri: str, what: str = "run directory") -> None:
    """Raise StorageError unless ``uri`` is a non-empty local path or a supported URI."""
    if not isinstance(uri, str) or not uri.strip():
        raise StorageError(f"empty {what} {uri!r}: {_ALLOWED}")
    scheme = _scheme(uri)
    if scheme is not None and scheme not in SUPPORTED_SCHEMES:
        raise StorageError(f"unsupported scheme '{scheme}' in {what} '{uri}': {_ALLOWED}")


def join_uri(root: str, *parts: str) -> str:
    """Join ``parts`` under ``root`` with single '/' separators ('s3://b/p', '/tmp/x', 'memory://')."""
    segs = [s for p in parts for s in p.split("/") if s]
    head = root
    while head.endswith("/") and not head.endswith("://") and head != "/":
        head = head[:-1]
    sep = "" if not segs or not head or head.endswith("/") else "/"
    return head + sep + "/".join(segs)


def _local_path(uri: str) -> str:
    path = uri[len("file://"):] if uri.lower().startswith("file://") else uri
    return os.path.abspath(os.path.expanduser(path))


def _resolve(uri: str, storage_options: dict | None) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, path inside it) for a checked URI."""
    if _scheme(uri) in (None, "file"):
        return LocalFileSystem(), _local_path(uri)
    return url_to_fs(uri, **(storage_options or {}))


def read_uri_bytes(uri: str, storage_options: dict | None = None) -> bytes:
    """Read one user-given file (e.g. teacher weights) from a path or URI."""
    check_uri(uri, what="file")
    fs, path = _resolve(uri, storage_options)
    try:
        return fs.cat_file(path)
    except FileNotFoundError:
        raise StorageError(f"file not found: '{uri}'") from None


def shard_name(index: int | str) -> str:
    """42 -> 'shard-00042'; a str (e.g. 'global') is returned as is."""
    if isinstance(index, str):
        return index
    if isinstance(index, bool) or not isinstance(index, int) or index < 0:
        raise StorageError(f"bad shard index {index!r}: expected an int >= 0 or a name")
    return f"shard-{index:05d}"


class Store:
    """A run root: relative object names under one URI."""

    def __init__(self, root: str, storage_options: dict | None = None) -> None:
        check_uri(root)
        self.root: str = join_uri(root)
        self.storage_options: dict = dict(storage_options or {})
        self._local = _scheme(self.root) in (None, "file")
        self._fs, self._base = _resolve(self.root, self.storage_options)

    def _path(self, rel: str) -> str:
        if ".." in rel.split("/"):
            raise StorageError(f"object name '{rel}' contains '..': names must stay inside the run root")
        return join_uri(self._base, rel)

    def _fresh(self, rel: str) -> str:
        """Path of ``rel`` with listing caches dropped: other processes write the same store."""
        path = self._path(rel)
        if not self._local:
            self._fs.invalidate_cache(path)
        return path

    def _mkparent(self, path: str) -> None:
        if self._local:
            os.makedirs(os.path.dirname(path), exist_ok=True)

    def uri(self, rel: str) -> str:
        return join_uri(self.root, rel)

    def write_bytes(self, rel: str, data: bytes) -> None:
        path = self._path(rel)
        self._mkparent(path)
        self._fs.pipe_file(path, bytes(data))

    def read_bytes(self, rel: str) -> bytes:
        return self._fs.cat_file(self._path(rel))

    def write_text(self, rel: str, text: str) -> None:
        self.write_bytes(rel, text.encode("utf-8"))

    def read_text(self, rel: str) -> str:
        return self.read_bytes(rel).decode("utf-8")

    def exists(self, rel: str) -> bool:
        return self._fs.exists(self._fresh(rel))

    def size(self, rel: str) -> int:
        return int(self._fs.size(self._fresh(rel)))

    def open_read(self, rel: str) -> Any:
        """A binary file object for streaming reads."""
        return self._fs.open(self._fresh(rel), "rb")

    def delete(self, rel: str) -> None:
        try:
            self._fs.rm_file(self._path(rel))
        except FileNotFoundError:
            pass

    def list(self, rel_prefix: str) -> list[str]:
        prefix = self._fresh(rel_prefix).rstrip("/") + "/"
        found = self._fs.find(prefix.rstrip("/") or "/")
        return sorted(p[len(prefix):] for p in found if p.startswith(prefix) and not p.endswith("/"))

    def create_exclusive(self, rel: str, data: bytes) -> bool:
        """Write ``data`` only if ``rel`` is absent; False when it already existed."""
        path = self._path(rel)
        self._mkparent(path)
        opener = open if self._local else self._fs.open
        try:
            with opener(path, "xb") as f:
                f.write(bytes(data))
            return True
        except FileExistsError:
            return False
        except (ValueError, NotImplementedError):
            log.debug("%s has no exclusive create; falling back to exists-then-write", type(self._fs).__name__)
        if self._fs.exists(path):
            return False
        self._fs.pipe_file(path, bytes(data))
        return True

    def pyarrow_fs(self) -> tuple["pyarrow.fs.FileSystem", str]:
        """(filesystem, root path inside it), e.g. for Ray Train's storage_filesystem/storage_path."""
        import pyarrow.fs as pafs

        if self._local:
            return pafs.LocalFileSystem(), self._base
        return pafs.PyFileSystem(pafs.FSSpecHandler(self._fs)), self._base


@dataclass(frozen=True)
class ObjectEntry:
    name: str
    size: int
    sha256: str


_FIELDS = ("schema_version", "stage", "shard", "seed", "meta", "objects")


@dataclass(frozen=True)
class Manifest:
    stage: str
    shard: str
    objects: tuple[ObjectEntry, ...]
    seed: int
    schema_version: int = MANIFEST_SCHEMA_VERSION
    meta: dict = field(default_factory=dict)

    def to_json(self) -> str:
        doc = {k: getattr(self, k) for k in _FIELDS[:-1]}
        doc["objects"] = [{"name": o.name, "size": o.size, "sha256": o.sha256} for o in self.objects]
        try:
            return json.dumps(doc, indent=1)
        except (TypeError, ValueError) as err:
            raise StorageError(f"manifest meta of {self.stage}/{self.shard} is not JSON: {err}") from None

    @classmethod
    def from_json(cls, text: str) -> "Manifest":
        try:
            doc = json.loads(text)
        except (ValueError, TypeError) as err:
            raise StorageError(f"manifest is not valid JSON: {err}") from None
        if not isinstance(doc, dict):
            raise StorageError(f"manifest must be a JSON object, got {type(doc).__name__}")
        missing = [k for k in _FIELDS if k not in doc]
        if missing:
            raise StorageError(f"manifest is missing field(s) {', '.join(missing)}")
        version = _typed(doc, "schema_version", int)
        if version != MANIFEST_SCHEMA_VERSION:
            raise StorageError(f"manifest schema_version {version} is not supported: use {MANIFEST_SCHEMA_VERSION}")
        if not isinstance(doc["objects"], list):
            raise StorageError("manifest field 'objects' must be a list")
        return cls(stage=_typed(doc, "stage", str), shard=_typed(doc, "shard", str),
                   objects=tuple(_entry(o) for o in doc["objects"]), seed=_typed(doc, "seed", int),
                   schema_version=version, meta=_typed(doc, "meta", dict))


def _typed(doc: dict, key: str, kind: type) -> Any:
    value = doc.get(key)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise StorageError(f"manifest field '{key}' must be {kind.__name__}, got {value!r}")
    return value


def _entry(obj: Any) -> ObjectEntry:
    if not isinstance(obj, dict):
        raise StorageError(f"manifest object entry must be a JSON object, got {obj!r}")
    name, size, sha = _typed(obj, "name", str), _typed(obj, "size", int), _typed(obj, "sha256", str)
    if size < 0 or len(sha) != 64:
        raise StorageError(f"manifest entry '{name}' has bad size {size} or sha256 {sha!r}")
    return ObjectEntry(name=name, size=size, sha256=sha)


def _check_part(kind: str, value: str) -> None:
    if not isinstance(value, str) or not value or "/" in value or value in (".", ".."):
        raise StorageError(f"bad {kind} name {value!r}: expected a non-empty name without '/'")


def _manifest_rel(stage: str, shard: str) -> str:
    return f"{stage}/{shard}/{MANIFEST_NAME}"


class ShardWriter:
    """Writes one shard of one stage: data objects first, manifest last (no rename)."""

    def __init__(self, store: Store, stage: str, shard: str) -> None:
        _check_part("stage", stage)
        _check_part("shard", shard)
        self.store, self.stage, self.shard = store, stage, shard
        self._entries: dict[str, ObjectEntry] = {}
        self._committed = False
        store.delete(_manifest_rel(stage, shard))

    def put(self, name: str, data: bytes) -> None:
        if self._committed:
            raise StorageError(f"shard {self.stage}/{self.shard} is already committed: cannot put '{name}'")
        if not name or name.startswith("/") or name == MANIFEST_NAME:
            raise StorageError(f"bad object name {name!r}: expected a relative name other than {MANIFEST_NAME}")
        data = bytes(data)
        self.store.write_bytes(f"{self.stage}/{self.shard}/{name}", data)
        self._entries[name] = ObjectEntry(name, len(data), hashlib.sha256(data).hexdigest())

    def commit(self, seed: int, meta: dict | None = None) -> Manifest:
        if self._committed:
            raise StorageError(f"shard {self.stage}/{self.shard} is already committed")
        manifest = Manifest(stage=self.stage, shard=self.shard, objects=tuple(self._entries.values()),
                            seed=int(seed), meta=dict(meta or {}))
        self.store.write_text(_manifest_rel(self.stage, self.shard), manifest.to_json())
        self._committed = True
        log.debug("committed %s (%d objects)", self.store.uri(f"{self.stage}/{self.shard}"), len(self._entries))
        return manifest


def read_manifest(store: Store, stage: str, shard: str) -> Manifest | None:
    """The shard's manifest, or None when absent or unreadable (logged)."""
    rel = _manifest_rel(stage, shard)
    try:
        text = store.read_text(rel)
    except FileNotFoundError:
        return None
    try:
        return Manifest.from_json(text)
    except (StorageError, UnicodeDecodeError) as err:
        log.warning("ignoring manifest %s: %s", store.uri(rel), err)
        return None


def _sha256(store: Store, rel: str) -> str:
    digest = hashlib.sha256()
    with store.open_read(rel) as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _object_problem(store: Store, rel: str, entry: ObjectEntry) -> str | None:
    """What is wrong with one object on storage, or None when it matches its entry."""
    try:
        size = store.size(rel)
    except FileNotFoundError:
        return "missing"
    if size != entry.size:
        return f"size {size} != {entry.size}"
    if _sha256(store, rel) != entry.sha256:
        return "sha256 mismatch"
    return None


def verify_shard(store: Store, stage: str, shard: str) -> Manifest | None:
    """The manifest when it and every object it lists check out; otherwise None (logged)."""
    manifest = read_manifest(store, stage, shard)
    if manifest is None:
        return None
    if (manifest.stage, manifest.shard) != (stage, shard):
        log.warning("shard %s: manifest names %s/%s", store.uri(f"{stage}/{shard}"), manifest.stage, manifest.shard)
        return None
    for entry in manifest.objects:
        rel = f"{stage}/{shard}/{entry.name}"
        problem = _object_problem(store, rel, entry)
        if problem is not None:
            log.warning("shard %s/%s is not valid: %s: %s", stage, shard, store.uri(rel), problem)
            return None
    return manifest


def read_object(store: Store, stage: str, shard: str, name: str, manifest: Manifest) -> bytes:
    """Read one object of a shard and check it against its manifest entry."""
    rel = f"{stage}/{shard}/{name}"
    entry = next((o for o in manifest.objects if o.name == name), None)
    if entry is None:
        raise StorageError(f"object '{name}' is not listed in the manifest of {store.uri(f'{stage}/{shard}')}")
    try:
        data = store.read_bytes(rel)
    except FileNotFoundError:
        raise StorageError(f"object missing: '{store.uri(rel)}'") from None
    if len(data) != entry.size:
        raise StorageError(f"object '{store.uri(rel)}' has size {len(data)}, manifest says {entry.size}")
    if hashlib.sha256(data).hexdigest() != entry.sha256:
        raise StorageError(f"object '{store.uri(rel)}' does not match its manifest sha256")
    return data


def list_shards(store: Store, stage: str) -> list[str]:
    """Shard folder names under ``<stage>/`` that have a manifest file (not verified)."""
    names = (n.split("/") for n in store.list(stage))
    return sorted(p[0] for p in names if len(p) == 2 and p[1] == MANIFEST_NAME)


def copy_stage(src: Store, dst: Store, stage: str) -> int:
    """Copy every object of ``stage`` from one run to another, each shard's manifest after its data."""
    names = src.list(stage)
    ordered = [n for n in names if not n.endswith(MANIFEST_NAME)] + [n for n in names if n.endswith(MANIFEST_NAME)]
    for name in ordered:
        dst.write_bytes(f"{stage}/{name}", src.read_bytes(f"{stage}/{name}"))
    return len(ordered)
