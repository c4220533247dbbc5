"""Run-directory URIs without any filesystem: the scheme, the supported ones, joining names, shard folder names."""

from __future__ import annotations

from lpld_ray.errors import StorageError

SUPPORTED_SCHEMES: tuple[str, ...] = ("file", "memory", "s3", "gs", "gcs")
ALLOWED = "use a local path, file://, memory://, s3:// or gs://"


def scheme_of(uri: str) -> str | None:
    """The scheme before '://', lower-cased; None for a plain path."""
    return uri.split("://", 1)[0].lower() if "://" in uri else None


def check_uri(uri: str, what: str = "run directory") -> None:
    """Raise StorageError unless ``uri`` is a non-empty local path or a supported URI."""
    if not isinstance(uri, str) or not uri.strip():
        raise StorageError(f"empty {what} {uri!r}: {ALLOWED}")
    scheme = scheme_of(uri)
    if scheme is not None and scheme not in SUPPORTED_SCHEMES:
        raise StorageError(f"unsupported scheme '{scheme}' in {what} '{uri}': {ALLOWED}")


def join_uri(root: str, *parts: str) -> str:
    """Join ``parts`` under ``root`` with single '/' separators ('s3://b/p', '/tmp/x', 'memory://')."""
    segs = [s for p in parts for s in p.split("/") if s]
    head = root
    while head.endswith("/") and not head.endswith("://") and head != "/":
        head = head[:-1]
    sep = "" if not segs or not head or head.endswith("/") else "/"
    return head + sep + "/".join(segs)


def shard_name(index: int | str) -> str:
    """42 -> 'shard-00042'; a str (e.g. 'global') is returned as is."""
    if isinstance(index, str):
        return index
    if isinstance(index, bool) or not isinstance(index, int) or index < 0:
        raise StorageError(f"bad shard index {index!r}: expected an int >= 0 or a name")
    return f"shard-{index:05d}"
