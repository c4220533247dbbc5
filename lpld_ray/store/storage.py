"""Run storage over fsspec: str URIs, store options from the storage: section, and a run-root Store."""

from __future__ import annotations

import copy
import hashlib
import logging
import os
import pickle
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, Iterator

import fsspec
from fsspec.core import url_to_fs
from fsspec.implementations.local import LocalFileSystem

from lpld_ray.errors import StorageError
from lpld_ray.store.uris import check_uri, join_uri, scheme_of

if TYPE_CHECKING:
    import pyarrow.fs

    from lpld_ray.config import StorageConfig
import pyarrow.fs as pafs

log = logging.getLogger(__name__)

_CHUNK = 8 << 20
# Schemes whose fsspec filesystem keeps a listing cache (s3fs, gcsfs): switched off in _resolve.
_LISTING_CACHED = frozenset({"s3", "gs", "gcs"})
# Exception class names (anywhere in the MRO) that mean the store could not be reached at all.
_UNREACHABLE = frozenset({
    "EndpointConnectionError", "ConnectTimeoutError", "ConnectionClosedError", "ReadTimeoutError", "HTTPClientError",
    "ConnectionError", "ClientConnectorError", "ServerDisconnectedError", "FSTimeoutError", "TimeoutError",
})


def _local_path(uri: str) -> str:
    path = uri[len("file://"):] if uri.lower().startswith("file://") else uri
    return os.path.abspath(os.path.expanduser(path))


def storage_options(cfg: "StorageConfig", uri: str) -> dict[str, Any]:
    """fsspec options for ``uri`` from the storage: section; credentials only when configured there
    (otherwise s3fs/botocore read AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL, ...)."""
    if scheme_of(uri) != "s3":
        return {}
    options: dict[str, Any] = {
        "config_kwargs": {"connect_timeout": cfg.connect_timeout_s, "read_timeout": cfg.read_timeout_s,
                          "retries": {"max_attempts": cfg.retries, "mode": "standard"}},
    }
    client = {k: v for k, v in (("endpoint_url", cfg.endpoint_url), ("region_name", cfg.region)) if v}
    if client:
        options["client_kwargs"] = client
    for name, value in (("key", cfg.access_key_id), ("secret", cfg.secret_access_key), ("token", cfg.session_token)):
        if value is not None:
            options[name] = value
    return options


def _endpoint(uri: str, options: dict | None) -> str:
    """Where an object-store URI's requests go, for error messages (never credentials)."""
    explicit = (options or {}).get("client_kwargs", {}).get("endpoint_url")
    if explicit:
        return explicit
    if scheme_of(uri) == "s3":
        return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or "AWS S3"
    return scheme_of(uri) or "local files"


def _resolve(uri: str, options: dict | None) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, path inside it) for a checked URI. Object stores get fsspec's listing cache switched off
    (``use_listings_cache=False``): other processes write the same store, so every ls/find/exists/info asks it."""
    if scheme_of(uri) in (None, "file"):
        return LocalFileSystem(), _local_path(uri)
    options = copy.deepcopy(options or {})  # botocore edits nested dicts
    if scheme_of(uri) in _LISTING_CACHED:
        options["use_listings_cache"] = False
    try:
        return url_to_fs(uri, **options)
    except ImportError:
        extra = {"s3": "s3", "gs": "gcs", "gcs": "gcs"}.get(scheme_of(uri) or "", scheme_of(uri))
        raise StorageError(f"'{uri}' needs the {extra} extra of lpld-ray, which is not installed: "
                           f"pip install 'lpld-ray[{extra}]'") from None


@contextmanager
def storage_errors(uri: str, action: str, options: dict | None = None) -> Iterator[None]:
    """Turn an unreachable store or refused credentials into a one-line StorageError naming the URI."""
    try:
        yield
    except (FileNotFoundError, FileExistsError, StorageError):
        raise
    except PermissionError:
        raise StorageError(f"access denied while {action} '{uri}': check the credentials (AWS_* environment "
                           "variables or the storage: section) and the bucket's permissions") from None
    except Exception as err:
        names = {c.__name__ for c in type(err).__mro__}
        if names & {"NoCredentialsError", "PartialCredentialsError"}:
            raise StorageError(f"no credentials for '{uri}': set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or the "
                               "storage: section") from None
        if not names & _UNREACHABLE:
            raise
        retries = (options or {}).get("config_kwargs", {}).get("retries", {}).get("max_attempts", "several")
        raise StorageError(f"object store unreachable while {action} '{uri}' (endpoint {_endpoint(uri, options)}, "
                           f"{retries} retries): {type(err).__name__}; re-run the same command once it is back") from None


def _write_temp(path: str, data: bytes) -> str:
    """``data`` in a new temporary file beside ``path``; returns its name."""
    temp = f"{path}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    with open(temp, "xb") as f:
        f.write(data)
    return temp


def read_uri_bytes(uri: str, options: dict | None = None) -> bytes:
    """Read one user-given file (e.g. teacher weights) from a path or URI."""
    check_uri(uri, what="file")
    fs, path = _resolve(uri, options)
    try:
        with storage_errors(uri, "reading", options):
            return fs.cat_file(path)
    except FileNotFoundError:
        raise StorageError(f"file not found: '{uri}'") from None


def _mask(data: bytes, pad: bytes) -> bytes:
    return (int.from_bytes(data, "big") ^ int.from_bytes(pad, "big")).to_bytes(len(data), "big")


def _seal_options(options: dict) -> tuple[bytes, bytes]:
    """(pad, masked) of pickled ``options``: a pickled Store never holds a credential verbatim (Ray spill files,
    dumps, logs of bytes). Masking, not encryption: whoever holds the pickle can undo it."""
    plain = pickle.dumps(options)
    pad = os.urandom(len(plain))
    return pad, _mask(plain, pad)


def _unseal_options(sealed: tuple[bytes, bytes]) -> dict:
    pad, masked = sealed
    return pickle.loads(_mask(masked, pad))


class Store:
    """A run root: relative object names under one URI. Picklable and fork-safe: the fsspec filesystem is not
    pickled but opened again, lazily, once in each process that uses the Store."""

    def __init__(self, root: str, options: dict | None = None) -> None:
        check_uri(root)
        self.root: str = join_uri(root)
        self.storage_options: dict = dict(options or {})  # may hold credentials: never in a repr or a message
        self._scheme = scheme_of(self.root)
        self._local = self._scheme in (None, "file")
        fs, self._base = _resolve(self.root, self.storage_options)  # bad options fail here, not in a later process
        self._opened: tuple[int, fsspec.AbstractFileSystem] | None = (os.getpid(), fs)
        self._remembered: tuple[str, dict[str, str]] | None = None  # see remember_texts

    def remember_texts(self, suffix: str | None) -> None:
        """From now on (None: no longer) read_text answers a name ending in ``suffix`` that it read before from this
        process's memory. Writes and deletes through this Store replace what it remembers; what other processes may
        have written is dropped with forget()."""
        self._remembered = None if suffix is None else (suffix, {})

    def forget(self, rel_prefix: str) -> None:
        """Drop the remembered texts under ``rel_prefix/`` (another process may have written there)."""
        if self._remembered is not None:
            head = rel_prefix.rstrip("/") + "/"
            for rel in [r for r in self._remembered[1] if r.startswith(head)]:
                self._remembered[1].pop(rel, None)

    def _changed(self, rel: str) -> None:
        if self._remembered is not None:
            self._remembered[1].pop(rel, None)

    @property
    def _fs(self) -> fsspec.AbstractFileSystem:
        """This process's filesystem: opened again after unpickling or in a forked child (fsspec clients and their
        event loops do not survive a fork)."""
        opened = self._opened
        if opened is None or opened[0] != os.getpid():
            opened = (os.getpid(), _resolve(self.root, self.storage_options)[0])
            self._opened = opened  # one attribute: threads racing here each get a working filesystem
        return opened[1]

    def __getstate__(self) -> dict:
        state = {**self.__dict__, "_opened": None, "_remembered": None}  # what one process remembers stays there
        state["storage_options"] = _seal_options(self.storage_options)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, storage_options=_unseal_options(state["storage_options"]))

    def __repr__(self) -> str:
        return f"Store({self.root!r})"  # never the options: they may hold credentials

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Store):
            return NotImplemented
        return self.root == other.root and self.storage_options == other.storage_options

    def __hash__(self) -> int:
        return hash(self.root)

    def _path(self, rel: str) -> str:
        if ".." in rel.split("/"):
            raise StorageError(f"object name '{rel}' contains '..': names must stay inside the run root")
        return join_uri(self._base, rel)

    def _mkparent(self, path: str) -> None:
        if self._local:
            os.makedirs(os.path.dirname(path), exist_ok=True)

    def _errors(self, action: str, rel: str):
        return storage_errors(self.uri(rel), action, self.storage_options)

    def uri(self, rel: str) -> str:
        return join_uri(self.root, rel)

    def check_reachable(self) -> None:
        """Fail early, writing nothing, when the bucket is missing, the credentials are refused or the store is down."""
        if self._local:
            self._check_local_root()
            return
        if scheme_of(self.root) == "memory":
            return
        bucket = self._base.split("/", 1)[0]
        try:
            with self._errors("listing the bucket of", ""):
                self._fs.ls(bucket, detail=False)  # unlike exists(), this raises PermissionError for refused credentials
        except FileNotFoundError:
            raise StorageError(f"bucket '{bucket}' of run directory '{self.root}' does not exist: create it, or fix --run-dir") from None

    def _check_local_root(self) -> None:
        """A local run directory is a folder (or not there yet) that this process may write."""
        existing = Path(self._base)
        while not existing.exists() and existing != existing.parent:
            existing = existing.parent
        if not existing.is_dir():
            raise StorageError(f"run directory '{self.root}': '{existing}' is a file, not a folder: give another --run-dir")
        if not os.access(existing, os.W_OK | os.X_OK):
            raise StorageError(f"run directory '{self.root}': '{existing}' is not writable: give a folder you may write")

    def write_bytes(self, rel: str, data: bytes) -> None:
        """Write one object; a reader sees the old bytes or the new ones, never a partial file (an S3 PUT is
        atomic; locally the bytes go to a temporary file first)."""
        path = self._path(rel)
        self._mkparent(path)
        self._changed(rel)
        with self._errors("writing", rel):
            if self._local:
                os.replace(_write_temp(path, bytes(data)), path)
            else:
                self._fs.pipe_file(path, bytes(data))

    def read_bytes(self, rel: str, size: int | None = None) -> bytes:
        """One object's bytes. On S3 one GET: s3fs would first HEAD the object to size a concurrent download,
        which only pays for objects known (``size``) to be larger than one chunk."""
        with self._errors("reading", rel):
            if self._scheme == "s3" and (size is None or size <= _CHUNK):
                return self._fs.cat_file(self._path(rel), max_concurrency=1)
            return self._fs.cat_file(self._path(rel))

    @contextmanager
    def open(self, rel: str) -> Iterator[BinaryIO]:
        """A seekable binary reader of one object, for range reads (Parquet row groups)."""
        with self._errors("reading", rel):
            with self._fs.open(self._path(rel), "rb") as handle:
                yield handle

    def write_text(self, rel: str, text: str) -> None:
        self.write_bytes(rel, text.encode("utf-8"))

    def read_text(self, rel: str) -> str:
        remembered = self._remembered
        if remembered is None or not rel.endswith(remembered[0]):
            return self.read_bytes(rel).decode("utf-8")
        if rel not in remembered[1]:
            remembered[1][rel] = self.read_bytes(rel).decode("utf-8")  # absent objects raise and are not remembered
        return remembered[1][rel]

    def exists(self, rel: str) -> bool:
        with self._errors("checking", rel):
            return self._fs.exists(self._path(rel))

    def size(self, rel: str) -> int:
        with self._errors("checking", rel):
            return int(self._fs.size(self._path(rel)))

    def sha256(self, rel: str) -> str:
        """Hex sha256 of one object, streamed."""
        digest = hashlib.sha256()
        with self._errors("reading", rel), self._fs.open(self._path(rel), "rb") as f:
            while chunk := f.read(_CHUNK):
                digest.update(chunk)
        return digest.hexdigest()

    def delete(self, rel: str) -> None:
        self._changed(rel)
        try:
            with self._errors("deleting", rel):
                self._fs.rm_file(self._path(rel))
        except FileNotFoundError:
            pass

    def delete_tree(self, rel_prefix: str) -> int:
        """Delete every object under ``rel_prefix/`` with one recursive rm (batched deletes on S3); returns how
        many there were, 0 when there is nothing there."""
        if not rel_prefix.strip("/"):
            raise StorageError(f"delete_tree of the run root '{self.root}' itself: name a folder under it")
        names = self.list(rel_prefix)
        self.forget(rel_prefix)
        if names:
            try:
                with self._errors("deleting", rel_prefix):
                    self._fs.rm(self._path(rel_prefix), recursive=True)
            except FileNotFoundError:  # removed meanwhile by another process
                pass
        return len(names)

    def list(self, rel_prefix: str) -> list[str]:
        prefix = self._path(rel_prefix).rstrip("/") + "/"
        with self._errors("listing", rel_prefix):
            found = self._fs.find(prefix.rstrip("/") or "/")
        return sorted(p[len(prefix):] for p in found if p.startswith(prefix) and not p.endswith("/"))

    def folders(self, rel_prefix: str) -> list[str]:
        """Names of the folders directly under ``rel_prefix`` (common prefixes on object stores);
        FileNotFoundError when there is nothing there."""
        path = self._path(rel_prefix).rstrip("/")
        with self._errors("listing", rel_prefix):
            entries = self._fs.ls(path, detail=True)
        return sorted(e["name"].rstrip("/").rsplit("/", 1)[-1] for e in entries if e["type"] == "directory")

    def create_exclusive(self, rel: str, data: bytes) -> bool:
        """Write ``data`` only if ``rel`` is absent (S3 If-None-Match, local 'xb'); False when it already existed."""
        self._changed(rel)
        path = self._path(rel)
        self._mkparent(path)
        if self._local:  # complete bytes appear at once: a hard link fails if the name exists
            temp = _write_temp(path, bytes(data))
            try:
                os.link(temp, path)
                return True
            except FileExistsError:
                return False
            finally:
                os.unlink(temp)
        try:
            with self._errors("creating", rel), self._fs.open(path, "xb") as f:
                f.write(bytes(data))
            return True
        except FileExistsError:
            return False
        except (ValueError, NotImplementedError):
            log.debug("%s has no exclusive create; falling back to exists-then-write", type(self._fs).__name__)
        if self.exists(rel):
            return False
        self.write_bytes(rel, data)
        return True

    def pyarrow_fs(self) -> tuple["pyarrow.fs.FileSystem", str]:
        """(filesystem, root path inside it), e.g. for Ray Train's storage_filesystem/storage_path."""
        if self._local:
            return pafs.LocalFileSystem(), self._base
        return pafs.PyFileSystem(pafs.FSSpecHandler(self._fs)), self._base
