"""The commit protocol of DESIGN section 4: shard manifests written last, verified on read, and input digests."""

from __future__ import annotations

import hashlib
import json
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Iterable

from lpld_ray.errors import StorageError
from lpld_ray.store.storage import Store

log = logging.getLogger(__name__)

MANIFEST_NAME = "_MANIFEST.json"
MANIFEST_SCHEMA_VERSION = 1
READ_THREADS = 32  # manifests read at once (object stores answer each GET in ~10-100 ms)


class CorruptShard(StorageError):
    """An object of a committed shard is missing, truncated or altered: found by the reader that consumes it. The
    shard must be redone (by its producing stage) before anything uses it."""

    def __init__(self, stage: str, shard: str, problem: str) -> None:
        super().__init__(problem)
        self.stage, self.shard = stage, shard

    def __reduce__(self):  # raised in Ray workers, re-raised in the driver as itself
        return CorruptShard, (self.stage, self.shard, str(self))


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
        for name in store.list(f"{stage}/{shard}"):
            if ".tmp-" in name:  # a local write cut short by a kill
                store.delete(f"{stage}/{shard}/{name}")

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


def committed_manifest(store: Store, stage: str, shard: str, producer: str) -> Manifest:
    """The shard's manifest, which its reader needs before reading (and checking) its objects; one line when absent."""
    manifest = read_manifest(store, stage, shard)
    if manifest is None:
        raise StorageError(f"{store.uri(f'{stage}/{shard}')} has no valid manifest: run the {producer} stage")
    return manifest


def _object_problem(store: Store, rel: str, entry: ObjectEntry) -> str | None:
    """What is wrong with one object on storage, or None when it matches its entry."""
    try:
        size = store.size(rel)
    except FileNotFoundError:
        return "missing"
    if size != entry.size:
        return f"size {size} != {entry.size}"
    if store.sha256(rel) != entry.sha256:
        return "sha256 mismatch"
    return None


def shard_problem(store: Store, stage: str, shard: str) -> tuple[Manifest | None, str | None]:
    """(manifest, None) when the shard and every object it lists check out, else (None, what is wrong)."""
    manifest = read_manifest(store, stage, shard)
    if manifest is None:
        return None, f"{store.uri(f'{stage}/{shard}')} has no valid manifest"
    if (manifest.stage, manifest.shard) != (stage, shard):
        return None, f"the manifest of {store.uri(f'{stage}/{shard}')} names {manifest.stage}/{manifest.shard}"
    for entry in manifest.objects:
        rel = f"{stage}/{shard}/{entry.name}"
        problem = _object_problem(store, rel, entry)
        if problem is not None:
            return None, f"{store.uri(rel)}: {problem}"
    return manifest, None


def verify_shard(store: Store, stage: str, shard: str) -> Manifest | None:
    """The manifest when it and every object it lists check out; otherwise None (logged, naming the object)."""
    manifest, problem = shard_problem(store, stage, shard)
    if problem is not None and read_manifest(store, stage, shard) is not None:
        log.warning("shard %s/%s is not valid: %s", stage, shard, problem)
    return manifest


def listed_entry(store: Store, manifest: Manifest, name: str) -> ObjectEntry:
    """The manifest's entry of object ``name``; one line when the manifest does not list it."""
    entry = next((o for o in manifest.objects if o.name == name), None)
    if entry is None:
        raise StorageError(f"object '{name}' is not listed in the manifest of "
                           f"{store.uri(f'{manifest.stage}/{manifest.shard}')}")
    return entry


def read_object(store: Store, stage: str, shard: str, name: str, manifest: Manifest) -> bytes:
    """Read one object of a shard and check it against its manifest entry (size and sha256): the one check of its
    bytes, made by whoever consumes them. A mismatch raises CorruptShard."""
    rel, entry = f"{stage}/{shard}/{name}", listed_entry(store, manifest, name)
    try:
        data = store.read_bytes(rel, size=entry.size)
    except FileNotFoundError:
        raise CorruptShard(stage, shard, f"object missing: '{store.uri(rel)}'") from None
    if len(data) != entry.size:
        raise CorruptShard(stage, shard, f"{store.uri(rel)}: size {len(data)} != {entry.size}")
    if hashlib.sha256(data).hexdigest() != entry.sha256:
        raise CorruptShard(stage, shard, f"{store.uri(rel)}: sha256 mismatch")
    return data


def check_object(store: Store, stage: str, shard: str, name: str, manifest: Manifest) -> None:
    """Stream one object of a shard through sha256 against its manifest entry (for readers that then read it by
    range, as the student reads label shards); a mismatch raises CorruptShard."""
    problem = _object_problem(store, f"{stage}/{shard}/{name}", listed_entry(store, manifest, name))
    if problem is not None:
        raise CorruptShard(stage, shard, f"{store.uri(f'{stage}/{shard}/{name}')}: {problem}")


def list_shards(store: Store, stage: str) -> list[str]:
    """Shard folder names under ``<stage>/`` that have a manifest file (not verified)."""
    names = (n.split("/") for n in store.list(stage))
    return sorted(p[0] for p in names if len(p) == 2 and p[1] == MANIFEST_NAME)


def shard_folders(store: Store, stage: str) -> list[str]:
    """Shard folder names under ``<stage>/``, committed or not: one listing of the folder level (a page per 1,000
    shards on object storage, where :func:`list_shards` pages through every object of the stage)."""
    try:
        return store.folders(stage)
    except FileNotFoundError:
        return []


def copy_stage(src: Store, dst: Store, stage: str) -> int:
    """Copy every object of ``stage`` from one run to another, each shard's manifest after its data."""
    names = src.list(stage)
    ordered = [n for n in names if not n.endswith(MANIFEST_NAME)] + [n for n in names if n.endswith(MANIFEST_NAME)]
    for name in ordered:
        dst.write_bytes(f"{stage}/{name}", src.read_bytes(f"{stage}/{name}"))
    return len(ordered)


def content_digest(manifests: list[Manifest]) -> str:
    """sha256 over the (stage, shard, object name, object sha256) of ``manifests``: what a later stage was made from.
    Timings and other meta are left out, so a shard redone with the same bytes keeps the same digest."""
    digest = hashlib.sha256()
    for m in sorted(manifests, key=lambda m: (m.stage, m.shard)):
        for o in sorted(m.objects, key=lambda o: o.name):
            digest.update(f"{m.stage}/{m.shard}/{o.name}:{o.sha256}\n".encode())
    return digest.hexdigest()


def inputs_digest(store: Store, stages: tuple[str, ...], shards: list[str]) -> str:
    """content_digest of the named shards of ``stages`` (manifests read in parallel, not re-verified); a missing one
    raises."""
    return content_digest([m for stage in stages for m in required_manifests(store, stage, shards).values()])


def required_manifests(store: Store, stage: str, shards: list[str]) -> dict[str, Manifest]:
    """The manifests of the named shards, read in parallel; one line naming the first missing one."""
    manifests = read_manifests(store, stage, shards)
    missing = [shard for shard, manifest in manifests.items() if manifest is None]
    if missing:
        raise StorageError(f"{store.uri(f'{stage}/{missing[0]}')} has no valid manifest: its stage must run first")
    return manifests


def read_manifests(store: Store, stage: str, shards: Iterable[str]) -> dict[str, Manifest | None]:
    """read_manifest of many shards, READ_THREADS at a time (object storage answers each in tens of ms)."""
    names = list(shards)
    if len(names) <= 1:
        return {n: read_manifest(store, stage, n) for n in names}
    with ThreadPoolExecutor(min(READ_THREADS, len(names))) as pool:
        return dict(zip(names, pool.map(lambda n: read_manifest(store, stage, n), names)))


def _is_current(stage: str, shard: str, manifest: Manifest | None, inputs: str) -> Manifest | None:
    if manifest is None or (manifest.stage, manifest.shard) != (stage, shard):
        return None
    if manifest.meta.get("inputs", "") != inputs:
        log.warning("shard %s/%s was made from other inputs than the run now holds; redoing it", stage, shard)
        return None
    return manifest


def current_shards(store: Store, stage: str, inputs: dict[str, str], verify: bool = False) -> dict[str, Manifest | None]:
    """For each shard of ``inputs`` (shard name -> inputs digest): its manifest when the shard is done for these
    inputs, else None (redo it). Decided from the manifests alone, read in parallel: the bytes are checked by the
    reader that consumes them. ``verify`` (--verify) also checks every listed object's size and sha256 now."""
    manifests = read_manifests(store, stage, inputs)
    done = {name: _is_current(stage, name, m, inputs[name]) for name, m in manifests.items()}
    if verify:
        checked = [name for name, m in done.items() if m is not None]
        with ThreadPoolExecutor(max(1, min(READ_THREADS, len(checked)))) as pool:
            for name, ok in zip(checked, pool.map(lambda n: verify_shard(store, stage, n), checked)):
                done[name] = ok
    return done


def current_shard(store: Store, stage: str, shard: str, inputs: str, verify: bool = False) -> Manifest | None:
    """The shard's manifest when it is done for ``inputs`` (see current_shards); None means: redo it."""
    return current_shards(store, stage, {shard: inputs}, verify)[shard]
