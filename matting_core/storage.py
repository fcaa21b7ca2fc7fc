"""Storage by URI through fsspec: local paths, file://, s3://; atomic publication of outputs.

S3 endpoints come from `AWS_ENDPOINT_URL_S3` / `AWS_ENDPOINT_URL` (the standard variables) or an
explicit `endpoint_url`; keys only from the environment or credential files, never from here.

Every S3 access is bounded, so an endpoint that accepts connections but never answers fails
instead of hanging. The limits are environment variables (so Ray workers, which inherit the
driver's environment, get the same ones):

    MATTING_STORAGE_CONNECT_TIMEOUT  seconds to open a connection (default 10)
    MATTING_STORAGE_READ_TIMEOUT     seconds without a byte from the server, per read (default 15)
    MATTING_STORAGE_RETRIES          retries of one request after its first attempt (default 2)

A silent endpoint thus fails one request after about (1 + retries) x read timeout: 45 s at the
defaults, so a command that meets one gives up within 2 minutes even when its first step makes
two requests (`matting generate` against a silent endpoint: about 95 s). The limits are options of the filesystem, so file objects from `fs.open` (PyAV's
reads of S3 videos) have them too. Failures of S3 itself (access denied, timeouts, refused
connections) are raised by this module's functions as `StorageError`, naming the URI and the
endpoint; "not found" stays `FileNotFoundError`.
"""
from __future__ import annotations

import asyncio
import functools
import os
import posixpath
import socket
import sys
import uuid
from contextlib import contextmanager
from typing import IO, Iterator

import fsspec
from fsspec.implementations.local import LocalFileSystem

__all__ = ["StorageError", "faults", "as_storage_error", "storage_limits", "filesystem", "join", "exists", "list_files", "read_bytes", "write_bytes_atomic",
           "open_atomic", "local_path", "storage_options", "remove"]

# variable -> default of the limits on every S3 request (see the module docstring)
LIMITS = {"MATTING_STORAGE_CONNECT_TIMEOUT": 10.0, "MATTING_STORAGE_READ_TIMEOUT": 15.0,
          "MATTING_STORAGE_RETRIES": 2}
# a 403 from S3 means the keys, almost always: say which variables to check
_KEYS_HINT = "check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY"
# errors that already say what they mean, with the path: left as they are
_PLAIN = (FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError)


class StorageError(OSError):
    """A storage access that failed: `uri` accessed, `endpoint` asked (S3 URL or None) and `reason`."""

    def __init__(self, uri: str, endpoint: str | None, reason: str):
        super().__init__(f"{uri}: {reason}")
        self.uri, self.endpoint, self.reason = uri, endpoint, reason

    def __reduce__(self):  # Ray ships exceptions between processes by pickle
        return type(self), (self.uri, self.endpoint, self.reason)

    def __str__(self) -> str:
        return f"{self.uri}: {self.reason}"


def _limit(name: str) -> float:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return LIMITS[name]
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r}: not a number") from None
    low = 0 if name == "MATTING_STORAGE_RETRIES" else 1e-3
    if value < low or value != value:
        raise ValueError(f"{name}={raw!r}: must be {'at least 0' if low == 0 else 'positive'}")
    return value


def storage_limits() -> dict:
    """The S3 request limits now in force: connect_timeout, read_timeout (s) and retries."""
    return {"connect_timeout": _limit("MATTING_STORAGE_CONNECT_TIMEOUT"),
            "read_timeout": _limit("MATTING_STORAGE_READ_TIMEOUT"),
            "retries": int(_limit("MATTING_STORAGE_RETRIES"))}


def _endpoint(endpoint_url: str | None = None) -> str | None:
    return endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")


@functools.cache  # one class, so fsspec's cache of filesystems sees the same options each time
def _bounded_session_cls() -> type:
    """aiobotocore's HTTP session without `Expect: 100-continue` on uploads.

    aiohttp waits for the interim `100 Continue` with no timeout at all (the read timeout is not
    armed yet), so a silent endpoint hangs every PUT forever. Sending the body straight away
    puts the wait under the read timeout; the cost is a wasted upload when S3 refuses it.
    """
    from aiobotocore.httpsession import AIOHTTPSession

    class BoundedAIOHTTPSession(AIOHTTPSession):
        async def send(self, request):
            request.headers.pop("Expect", None)
            return await super().send(request)

    return BoundedAIOHTTPSession


def storage_options(uri: str, endpoint_url: str | None = None) -> dict:
    """fsspec options for `uri`: the S3 endpoint (argument or AWS_* environment) and request limits."""
    if uri.startswith(("s3://", "s3a://")):
        limits = storage_limits()
        # botocore retries each request (standard mode: timeouts, refused connections, 5xx);
        # s3fs's own retry loop is turned off in filesystem(), so the budget is this one.
        opts: dict = {"config_kwargs": {"connect_timeout": limits["connect_timeout"],
                                        "read_timeout": limits["read_timeout"],
                                        "retries": {"total_max_attempts": 1 + limits["retries"],
                                                    "mode": "standard"},
                                        "http_session_cls": _bounded_session_cls()}}
        endpoint = _endpoint(endpoint_url)
        if endpoint:
            opts["client_kwargs"] = {"endpoint_url": endpoint}
        return opts
    return {}


def filesystem(uri: str, endpoint_url: str | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, path inside it) for a URI or local path."""
    fs, path = fsspec.core.url_to_fs(uri, **storage_options(uri, endpoint_url))
    if not isinstance(fs, LocalFileSystem) and hasattr(fs, "retries"):
        # s3fs would retry botocore's already retried request 5 more times (25 x the read timeout)
        fs.retries = 1
    return fs, path


def _reason(exc: BaseException, endpoint: str) -> str | None:
    """What went wrong with a remote access, in words naming `endpoint`; None when not a storage fault."""
    from botocore import exceptions as boto

    if isinstance(exc, PermissionError):
        return f"access denied by {endpoint} ({_KEYS_HINT})"
    if isinstance(exc, boto.NoCredentialsError):
        return f"no credentials for {endpoint} (set AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY)"
    limits = storage_limits()
    tries = f"{1 + limits['retries']} attempt(s)"
    if isinstance(exc, (boto.ReadTimeoutError, socket.timeout, asyncio.TimeoutError,
                        fsspec.exceptions.FSTimeoutError)):
        return (f"no answer from {endpoint} in {tries} of {limits['read_timeout']:g} s (if it is only slow, "
                f"raise MATTING_STORAGE_READ_TIMEOUT / MATTING_STORAGE_RETRIES)")
    if isinstance(exc, boto.ConnectTimeoutError):
        return (f"cannot connect to {endpoint}: no connection in {tries} of {limits['connect_timeout']:g} s "
                f"(MATTING_STORAGE_CONNECT_TIMEOUT)")
    if isinstance(exc, (boto.EndpointConnectionError, boto.ConnectionClosedError, ConnectionError)):
        return f"cannot connect to {endpoint} ({tries}): {exc}"
    if isinstance(exc, (boto.BotoCoreError, boto.ClientError, OSError)):
        return f"{endpoint} refused the request: {exc}"
    return None


@contextmanager
def faults(uri: str, fs: fsspec.AbstractFileSystem) -> Iterator[None]:
    """Raise the S3 faults of the block as StorageError naming `uri` and the endpoint.

    This module's functions use it; code that calls a remote filesystem directly can too.
    """
    if isinstance(fs, LocalFileSystem):
        yield
        return
    try:
        yield
    except (StorageError, *_PLAIN):
        raise
    except Exception as exc:  # noqa: BLE001 - translated when it is a storage fault, re-raised otherwise
        endpoint = (getattr(fs, "client_kwargs", None) or {}).get("endpoint_url") or _endpoint() or "AWS S3"
        reason = _reason(exc, endpoint)
        if reason is None:
            raise
        raise StorageError(uri, endpoint, reason) from exc


def as_storage_error(exc: BaseException) -> StorageError | None:
    """`exc` as a StorageError when it is an S3 fault raised outside `faults` (else None)."""
    if isinstance(exc, StorageError):
        return exc
    boto = sys.modules.get("botocore.exceptions")
    if boto is None:  # nothing talked to S3 in this process
        return None
    raw = isinstance(exc, (boto.BotoCoreError, boto.ClientError))
    translated = isinstance(exc, OSError) and isinstance(exc.__cause__, boto.ClientError)  # s3fs's PermissionError...
    if not (raw or translated):
        return None
    endpoint = _endpoint() or "AWS S3"
    url = str(getattr(exc, "kwargs", {}).get("endpoint_url") or "")
    if url.startswith(endpoint):
        uri = "s3://" + url[len(endpoint):].lstrip("/")
    else:
        uri = str(getattr(exc, "filename", None) or "an S3 request")
    reason = _reason(exc, endpoint)
    return StorageError(uri, endpoint, reason) if reason else None


def local_path(uri: str) -> str | None:
    """The local filesystem path of `uri`, or None when it is remote."""
    fs, path = filesystem(uri)
    return path if isinstance(fs, LocalFileSystem) else None


def join(uri: str, *parts: str) -> str:
    """Join path parts onto a URI with '/' (works for s3:// and local paths)."""
    if "://" in uri:
        scheme, rest = uri.split("://", 1)
        return f"{scheme}://" + posixpath.join(rest, *parts)
    return os.path.join(uri, *parts)


def exists(uri: str) -> bool:
    """Whether a file or folder exists at `uri`."""
    fs, path = filesystem(uri)
    with faults(uri, fs):
        return fs.exists(path)


def list_files(uri: str, recursive: bool = True) -> list[str]:
    """Sorted URIs of the files under `uri` (or `uri` itself when it is a file)."""
    fs, path = filesystem(uri)
    with faults(uri, fs):
        if fs.isfile(path):
            return [uri]
        if not fs.exists(path):
            raise FileNotFoundError(f"{uri}: no such file or folder")
        paths = fs.find(path) if recursive else [p for p in fs.ls(path, detail=False) if fs.isfile(p)]
    protocol = uri.split("://", 1)[0] + "://" if "://" in uri else ""
    if protocol == "file://":
        protocol = ""
    return sorted(protocol + p if protocol else p for p in paths)


def read_bytes(uri: str) -> bytes:
    """The whole content of the file at `uri`."""
    fs, path = filesystem(uri)
    with faults(uri, fs), fs.open(path, "rb") as f:
        return f.read()


@contextmanager
def open_atomic(uri: str, mode: str = "wb") -> Iterator[IO]:
    """Open `uri` for writing so that readers see either nothing or the finished file.

    Local files are written to a hidden temporary name and renamed into place; object stores
    publish on the single final PUT of close(), so a partial object is never visible.
    """
    fs, path = filesystem(uri)
    if isinstance(fs, LocalFileSystem):
        parent = os.path.dirname(path) or "."
        os.makedirs(parent, exist_ok=True)
        tmp = os.path.join(parent, f".{os.path.basename(path)}.{uuid.uuid4().hex[:8]}.tmp")
        try:
            with open(tmp, mode) as f:
                yield f
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
    else:
        # s3fs buffers and uploads on close; an exception inside aborts without publishing.
        with faults(uri, fs):
            f = fs.open(path, mode)
        try:
            yield f
        except BaseException:
            with faults(uri, fs):
                if hasattr(f, "discard"):
                    f.discard()
                else:
                    f.close()
            raise
        with faults(uri, fs):
            f.close()


def write_bytes_atomic(uri: str, data: bytes) -> None:
    """Write `data` to `uri` atomically (see `open_atomic`)."""
    with open_atomic(uri, "wb") as f:
        f.write(data)


def remove(uri: str, recursive: bool = False) -> None:
    """Delete a file (or a folder with recursive=True); missing paths are ignored."""
    fs, path = filesystem(uri)
    with faults(uri, fs):
        if fs.exists(path):
            fs.rm(path, recursive=recursive)
