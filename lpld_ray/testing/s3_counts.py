"""moto's S3 server on 127.0.0.1 in a thread of this process, counting requests by kind, bytes and keys."""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable
from urllib.parse import parse_qs, unquote

log = logging.getLogger(__name__)

KINDS: tuple[str, ...] = ("GET", "PUT", "LIST", "HEAD", "DELETE", "OTHER")
_LIST_PARAMS = frozenset({"list-type", "prefix", "delimiter", "continuation-token", "marker", "max-keys",
                          "start-after", "encoding-type"})


def request_kind(method: str, path: str, query: str) -> tuple[str, str]:
    """(kind, key) of one path-style S3 request: GET object reads, PUT object writes (multipart parts too), LIST
    (ListObjects[V2]), HEAD, DELETE (DeleteObject and DeleteObjects), OTHER (bucket calls, multipart create/complete,
    ...). The key is 'bucket/key', or 'bucket/prefix' for a LIST."""
    bucket, _, key = unquote(path).lstrip("/").partition("/")
    params = parse_qs(query, keep_blank_values=True)
    method = method.upper()
    if method == "GET":
        if key:
            return ("OTHER" if params.keys() & {"tagging", "acl", "uploadId"} else "GET"), f"{bucket}/{key}"
        if not params or params.keys() & _LIST_PARAMS:
            return "LIST", f"{bucket}/{params.get('prefix', [''])[0]}"
        return "OTHER", bucket
    if method == "PUT":
        return ("PUT" if key else "OTHER"), f"{bucket}/{key}"
    if method == "HEAD":
        return "HEAD", f"{bucket}/{key}"
    if method == "DELETE":
        return ("OTHER" if "uploadId" in params else "DELETE"), f"{bucket}/{key}"
    if method == "POST" and "delete" in params:
        return "DELETE", bucket
    return "OTHER", f"{bucket}/{key}"


@dataclass
class RequestCounts:
    """Requests by kind, bytes in (request bodies) and out (response bodies) by kind, server seconds by kind, and
    how often each (kind, key) was asked."""

    requests: Counter = field(default_factory=Counter)
    bytes_in: Counter = field(default_factory=Counter)
    bytes_out: Counter = field(default_factory=Counter)
    server_seconds: Counter = field(default_factory=Counter)
    keys: Counter = field(default_factory=Counter)  # (kind, 'bucket/key') -> count
    put_sizes: dict[str, int] = field(default_factory=dict)  # 'bucket/key' -> bytes of its last PUT

    def copy(self) -> RequestCounts:
        return RequestCounts(Counter(self.requests), Counter(self.bytes_in), Counter(self.bytes_out),
                             Counter(self.server_seconds), Counter(self.keys), dict(self.put_sizes))

    def written(self, prefix: str = "") -> tuple[int, int]:
        """(objects, bytes) PUT under ``prefix`` (an object written twice counts once, with its last size)."""
        sizes = [n for k, n in self.put_sizes.items() if k.startswith(prefix)]
        return len(sizes), sum(sizes)

    def summary(self, prefix: str = "") -> dict[str, Any]:
        """A JSON-able digest: requests and bytes by kind, the objects and bytes written under ``prefix``."""
        objects, written = self.written(prefix)
        return {"requests": {k: self.requests.get(k, 0) for k in KINDS},
                "total_requests": sum(self.requests.values()),
                "bytes_in": sum(self.bytes_in.values()), "bytes_out": sum(self.bytes_out.values()),
                "get_bytes": self.bytes_out.get("GET", 0),
                "server_seconds": round(sum(self.server_seconds.values()), 2),
                "objects_written": objects, "bytes_written": written}


class _Counter:
    """The shared, locked RequestCounts that the WSGI wrapper adds to."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts = RequestCounts()

    def add(self, kind: str, key: str, bytes_in: int, bytes_out: int, seconds: float) -> None:
        with self._lock:
            c = self._counts
            c.requests[kind] += 1
            c.bytes_in[kind] += bytes_in
            c.bytes_out[kind] += bytes_out
            c.server_seconds[kind] += seconds
            c.keys[(kind, key)] += 1
            if kind == "PUT":
                c.put_sizes[key] = bytes_in

    def matching(self, kind: str, prefix: str, suffix: str) -> int:
        """How many distinct keys were asked with ``kind`` that start with ``prefix`` and end with ``suffix``."""
        with self._lock:
            return sum(1 for (kd, k) in self._counts.keys if kd == kind and k.startswith(prefix) and k.endswith(suffix))

    def read(self, reset: bool = False) -> RequestCounts:
        with self._lock:
            counts = self._counts.copy()
            if reset:
                self._counts = RequestCounts()
            return counts


class CountingApp:
    """WSGI middleware: every request is classified and counted after its response body has been sent."""

    def __init__(self, app: Callable, counter: _Counter) -> None:
        self.app, self.counter = app, counter

    def __call__(self, environ: dict, start_response: Callable) -> Iterable[bytes]:
        path, query = environ.get("PATH_INFO", "/"), environ.get("QUERY_STRING", "")
        return self._counted(environ, start_response, *request_kind(environ.get("REQUEST_METHOD", "GET"), path, query))

    def _counted(self, environ: dict, start_response: Callable, kind: str, key: str) -> Iterable[bytes]:
        started = time.perf_counter()
        bytes_in = int(environ.get("CONTENT_LENGTH") or 0)
        sent = 0
        try:
            for chunk in self.app(environ, start_response):
                sent += len(chunk)
                yield chunk
        finally:
            self.counter.add(kind, key, bytes_in, sent, time.perf_counter() - started)


class CountingS3:
    """moto's S3 on 127.0.0.1 (port 0: any free one) in a daemon thread; ``counts()`` reads the requests since the
    last reset. Buckets live in this process's memory (moto's backend) until it exits."""

    def __init__(self, port: int = 0, access_key: str = "AKIASCALETEST", secret_key: str = "scale-secret") -> None:
        self.access_key, self.secret_key = access_key, secret_key
        self._counter = _Counter()
        self._port = port
        self._server: Any = None
        self._thread: threading.Thread | None = None

    def start(self) -> CountingS3:
        from moto.moto_server.werkzeug_app import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
        from werkzeug.serving import make_server

        logging.getLogger("werkzeug").setLevel(logging.WARNING)  # a line per request otherwise
        app = CountingApp(DomainDispatcherApplication(create_backend_app), self._counter)
        self._server = make_server("127.0.0.1", self._port, app, True, request_handler=MotoRequestHandler)
        self._port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, name="counting-s3", daemon=True)
        self._thread.start()
        log.info("counting S3 (moto) at %s", self.endpoint)
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(10)
        self._server = self._thread = None

    def __enter__(self) -> CountingS3:
        return self.start()

    def __exit__(self, *_exc: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        return self._port

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self._port}"

    def counts(self, reset: bool = False) -> RequestCounts:
        return self._counter.read(reset)

    def reset(self) -> None:
        self._counter.read(reset=True)

    def matching(self, kind: str, prefix: str = "", suffix: str = "") -> int:
        """Distinct keys asked with ``kind`` since the last reset, by prefix ('bucket/key...') and suffix; cheap."""
        return self._counter.matching(kind, prefix, suffix)

    def storage_section(self, **extra: Any) -> dict[str, Any]:
        """The config's storage: section that reaches this server."""
        return {"endpoint_url": self.endpoint, "region": "us-east-1", "access_key_id": self.access_key,
                "secret_access_key": self.secret_key, **extra}

    def options(self) -> dict:
        """fsspec options of a Store on this server."""
        from lpld_ray.config import StorageConfig
        from lpld_ray.store.storage import storage_options

        return storage_options(StorageConfig(**self.storage_section()), "s3://x")

    def make_bucket(self, name: str) -> str:
        import boto3

        boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=self.access_key,
                     aws_secret_access_key=self.secret_key, region_name="us-east-1").create_bucket(Bucket=name)
        return name
