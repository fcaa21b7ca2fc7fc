"""The inputs of an archive (`matting infer`): every video and frame folder under a URI, with its output key.

A video's key is its path relative to the archive without the extension; a frame folder's is its
path; a benchmark clip folder (one holding `com/`) is one input, its `com/` frames, keyed by the
clip's path, so `evaluate` pairs the results as it pairs `matte`'s. Keys that would land outside
the output (`..`, an absolute path) are refused; every other file is counted as ignored.
"""
from __future__ import annotations

import os
import posixpath
from dataclasses import dataclass, field

from matting_core import storage
from matting_core.video import VIDEO_EXTENSIONS, frame_number

__all__ = ["ArchiveInput", "Archive", "discover_archive"]

_SKIPPED_DIRS = ("_runs", "_segments")  # an archive matted into itself: never its own outputs


@dataclass(frozen=True)
class ArchiveInput:
    """One input: `uri` (a video file or a folder of numbered frames) and `key`, its output path under OUT."""

    uri: str
    key: str
    kind: str  # "video" or "frames"


@dataclass(frozen=True)
class Archive:
    """What `discover_archive` found: inputs sorted by key, refused inputs (uri, reason), ignored files."""

    inputs: tuple[ArchiveInput, ...]
    refused: tuple[tuple[str, str], ...] = ()
    ignored: tuple[str, ...] = field(default=(), repr=False)


def _safe_key(key: str) -> bool:
    parts = key.split("/")
    return bool(key) and not key.startswith("/") and all(p not in ("", ".", "..") for p in parts)


def discover_archive(root: str, extensions: tuple[str, ...] = VIDEO_EXTENSIONS) -> Archive:
    """Every video (by extension) and frame folder under `root` (recursively), or `root` itself when it is one."""
    exts = tuple(e.lower() if e.startswith(".") else "." + e.lower() for e in extensions)
    root = root.rstrip("/")
    files = storage.list_files(root)
    if files == [root]:  # a single video file
        name = posixpath.basename(root.replace("\\", "/"))
        stem, ext = posixpath.splitext(name)
        if ext.lower() in exts:
            return Archive((ArchiveInput(root, stem, "video"),))
        return Archive((), ignored=(root,))
    inputs: list[ArchiveInput] = []
    refused: list[tuple[str, str]] = []
    ignored: list[str] = []
    folders: dict[str, list[str]] = {}
    for uri in files:
        rel = _relative(root, uri)
        if any(part.startswith(".") or part in _SKIPPED_DIRS for part in rel.split("/")[:-1]):
            continue  # hidden folders (temporaries of running jobs) and a job's own bookkeeping
        stem, ext = posixpath.splitext(rel)
        if ext.lower() in exts:
            _add(inputs, refused, uri, stem, "video")
        elif frame_number(posixpath.basename(rel)) is not None:
            folders.setdefault(posixpath.dirname(rel), []).append(uri)
        else:
            ignored.append(uri)
    clips = {posixpath.dirname(f) for f in folders if posixpath.basename(f) == "com"}
    for folder, members in sorted(folders.items()):
        parent = posixpath.dirname(folder)
        if folder in ("",):
            _add(inputs, refused, root, posixpath.basename(root), "frames")
        elif posixpath.basename(folder) == "com" and parent in clips:
            _add(inputs, refused, storage.join(root, folder), parent or posixpath.basename(root), "frames")
        elif parent in clips:  # pha/, fgr/ of a benchmark clip: truth, not input
            ignored.extend(members)
        else:
            _add(inputs, refused, storage.join(root, folder), folder, "frames")
    return Archive(tuple(sorted(inputs, key=lambda i: i.key)), tuple(refused), tuple(ignored))


def _add(inputs: list, refused: list, uri: str, key: str, kind: str) -> None:
    if _safe_key(key):
        inputs.append(ArchiveInput(uri, key, kind))
    else:
        refused.append((uri, f"its output key {key!r} would land outside the output folder"))


def _relative(root: str, uri: str) -> str:
    """`uri`'s path below `root`, '/'-separated (local listings spell paths their own way)."""
    local = storage.local_path(root)
    if local is not None:
        return os.path.relpath(storage.local_path(uri), local).replace(os.sep, "/")
    return uri[len(root):].lstrip("/")
