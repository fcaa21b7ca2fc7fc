"""Storage by URI through fsspec: local paths, file://, s3://; atomic publication of outputs.

S3 endpoints come from `AWS_ENDPOINT_URL_S3` / `AWS_ENDPOINT_URL` (the standard variables) or an
explicit `endpoint_url`; keys only from the environment or credential files, never from here.
"""
from __future__ import annotations

import os
import posixpath
import uuid
from contextlib import contextmanager
from typing import IO, Iterator

import fsspec
from fsspec.implementations.local import LocalFileSystem

__all__ = ["filesystem", "join", "exists", "list_files", "read_bytes", "write_bytes_atomic",
           "open_atomic", "local_path", "storage_options", "remove"]


def storage_options(uri: str, endpoint_url: str | None = None) -> dict:
    """fsspec options for `uri`: the S3 endpoint from the argument or the AWS_* environment."""
    if uri.startswith(("s3://", "s3a://")):
        endpoint = endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        return {"client_kwargs": {"endpoint_url": endpoint}} if endpoint else {}
    return {}


def filesystem(uri: str, endpoint_url: str | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, path inside it) for a URI or local path."""
    fs, path = fsspec.core.url_to_fs(uri, **storage_options(uri, endpoint_url))
    return fs, path


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
    return fs.exists(path)


def list_files(uri: str, recursive: bool = True) -> list[str]:
    """Sorted URIs of the files under `uri` (or `uri` itself when it is a file)."""
    fs, path = filesystem(uri)
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
    with fs.open(path, "rb") as f:
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
        f = fs.open(path, mode)
        try:
            yield f
        except BaseException:
            if hasattr(f, "discard"):
                f.discard()
            else:
                f.close()
            raise
        f.close()


def write_bytes_atomic(uri: str, data: bytes) -> None:
    """Write `data` to `uri` atomically (see `open_atomic`)."""
    with open_atomic(uri, "wb") as f:
        f.write(data)


def remove(uri: str, recursive: bool = False) -> None:
    """Delete a file (or a folder with recursive=True); missing paths are ignored."""
    fs, path = filesystem(uri)
    if fs.exists(path):
        fs.rm(path, recursive=recursive)


def redact_uri(uri: str) -> str:
    """`uri` with any password in its user-info replaced by `***` (`http://user:***@host/...`)."""
    import re

    return re.sub(r"^([A-Za-z][A-Za-z0-9+.-]*://[^/@:]*):[^/@]*@", r"\1:***@", str(uri))
