"""The mattes of one video (DESIGN.md, Mattes layout), written frame by frame and published whole.

Everything is written into a hidden temporary folder beside the destination (`.<stem>.tmp-XXXX`)
and renamed to `<stem>` only once `result.json` is written, so a reader never sees a half-written
set as finished. For an object store the set is built in a local temporary folder and uploaded
file by file with `result.json` last: its presence marks the set as complete.

A local temporary folder holds an owner file (host, pid, start time) until it is published, so
that a later run into the same parent can remove the temporaries of runs killed outright
(SIGKILL, power loss) without ever touching those of a run still alive.
"""
from __future__ import annotations

import datetime
import errno
import json
import logging
import os
import queue
import re
import shutil
import socket
import tempfile
import threading
import time
import uuid
from fractions import Fraction
from typing import Sequence

import numpy as np

from matting_core import storage
from matting_core.runtime import lower_thread_priority
from matting_core.video.writers import (AlphaPngWriter, CompositeWriter, ForegroundPngWriter,
                                        quantize_alpha, rgba_mov_writer, rgba_webm_writer, to_rgba)

__all__ = ["FORMATS", "RESULT_FILE", "OWNER_FILE", "parse_formats", "check_stem", "default_encoder_threads",
           "remove_abandoned_temporaries", "make_temporary", "publish_temporary", "MatteOutputs"]

log = logging.getLogger(__name__)

FORMATS = ("pha", "fgr", "rgba.mov", "rgba.webm", "composite.mp4")
RESULT_FILE = "result.json"
OWNER_FILE = ".owner.json"
_TEMPORARY = re.compile(r"^\..+\.tmp-[0-9a-f]+$")
# A temporary without an owner file (a run of older code, or killed before writing it) is
# presumed abandoned only when nothing in it has changed for this long.
UNOWNED_MAX_AGE_S = 24 * 3600


def check_stem(stem: str) -> str:
    """`stem` when it names one entry inside the output folder; ValueError naming it otherwise."""
    if stem in ("", ".", "..") or "/" in stem or "\\" in stem or "\0" in stem:
        raise ValueError(f"output name {stem!r} is not a file name inside the output folder "
                         f"(empty, '.', '..' or containing a path separator)")
    return stem


def _owner() -> dict:
    started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    return {"host": socket.gethostname(), "pid": os.getpid(), "started": started}


def _pid_alive(pid: int) -> bool:
    """Whether process `pid` exists on this host and is not a zombie (a zombie is dead, only unreaped)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def _last_change(folder: str) -> float:
    """Latest modification time of `folder` and its direct entries."""
    times = [os.lstat(folder).st_mtime]
    with os.scandir(folder) as entries:
        times += [e.stat(follow_symlinks=False).st_mtime for e in entries]
    return max(times)


def _abandoned(folder: str, now: float) -> bool:
    """Whether the temporary `folder` provably belongs to no live run."""
    try:
        with open(os.path.join(folder, OWNER_FILE)) as f:
            owner = json.load(f)
        host, pid = owner["host"], int(owner["pid"])
    except (OSError, ValueError, KeyError, TypeError):  # no owner file, or an unreadable one
        return now - _last_change(folder) > UNOWNED_MAX_AGE_S
    # Another host's pid says nothing about its run (a shared folder): never provably abandoned.
    return host == socket.gethostname() and pid != os.getpid() and not _pid_alive(pid)


def remove_abandoned_temporaries(parent: str) -> list[str]:
    """Remove the `.<stem>.tmp-*` folders in local folder `parent` left by dead runs; returns their paths."""
    removed = []
    now = time.time()
    try:
        entries = [e for e in os.scandir(parent) if _TEMPORARY.match(e.name)]
    except OSError:
        return removed
    for entry in entries:
        try:
            if not entry.is_dir(follow_symlinks=False) or not _abandoned(entry.path, now):
                continue
        except OSError:  # removed meanwhile, or unreadable: not ours to judge
            continue
        shutil.rmtree(entry.path, ignore_errors=True)
        log.warning("removed %s: temporary outputs of a run that no longer exists", entry.path)
        removed.append(entry.path)
    return removed


def make_temporary(out_dir: str, stem: str) -> str:
    """A new local folder in which the set `out_dir/<stem>` is built before `publish_temporary`.

    Beside the destination for a local `out_dir` (so publication is a rename; abandoned
    temporaries of killed runs there are removed first), in the system's temporary folder for
    an object store.
    """
    check_stem(stem)
    local_parent = storage.local_path(out_dir)
    if local_parent is None:
        return tempfile.mkdtemp(prefix=f"matte-{stem}-")
    os.makedirs(local_parent, exist_ok=True)
    final = os.path.join(local_parent, stem)
    if os.path.lexists(final) and not os.path.isdir(final):
        # a set replaces an earlier set, never a file of the user's that happens to bear its name
        raise FileExistsError(errno.EEXIST, "exists and is not a folder of mattes", final)
    remove_abandoned_temporaries(local_parent)
    tmp = os.path.join(local_parent, f".{stem}.tmp-{uuid.uuid4().hex[:8]}")
    os.makedirs(tmp)
    with open(os.path.join(tmp, OWNER_FILE), "w") as f:
        json.dump(_owner(), f)
    return tmp


def publish_temporary(tmp: str, final_uri: str, result: dict, replace: bool = True) -> None:
    """Write `result` as result.json into `tmp` and publish the folder as `final_uri`, replacing what was there.

    Locally by renames (a reader sees the old set or the new one); on an object store by
    uploading every file, result.json last, whose presence marks the set as complete
    (`replace=False` keeps files already put under `final_uri` by the caller).
    """
    with open(os.path.join(tmp, RESULT_FILE), "w") as f:
        json.dump(result, f, indent=2, default=str)
    final = storage.local_path(final_uri)
    if final is None:
        _upload(tmp, final_uri, replace)
        return
    if os.path.exists(os.path.join(tmp, OWNER_FILE)):
        os.remove(os.path.join(tmp, OWNER_FILE))  # not part of the set
    old = None
    if os.path.lexists(final):
        # A rename cannot replace a non-empty folder: move the old set aside first.
        old = os.path.join(os.path.dirname(final), f".{os.path.basename(final)}.old-{uuid.uuid4().hex[:8]}")
        os.rename(final, old)
    os.rename(tmp, final)
    if old is not None:
        if os.path.isdir(old) and not os.path.islink(old):
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.remove(old)


def _upload(tmp: str, final_uri: str, replace: bool) -> None:
    fs, root = storage.filesystem(final_uri)
    if replace and fs.exists(root):
        fs.rm(root, recursive=True)
    files = []
    for folder, _, names in os.walk(tmp):
        files += [os.path.join(folder, n) for n in sorted(names)]
    last = os.path.join(tmp, RESULT_FILE)
    for path in sorted(f for f in files if f != last) + [last]:
        rel = os.path.relpath(path, tmp).replace(os.sep, "/")
        fs.put_file(path, f"{root.rstrip('/')}/{rel}")
    shutil.rmtree(tmp, ignore_errors=True)


def parse_formats(spec: str | Sequence[str]) -> tuple[str, ...]:
    """Validated, de-duplicated output formats from `pha,fgr,...` or a list; raises ValueError."""
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    out: list[str] = []
    for item in (s.strip() for s in items):
        if not item:
            continue
        if item not in FORMATS:
            raise ValueError(f"unknown output format {item!r}; choose from {', '.join(FORMATS)}")
        if item not in out:
            out.append(item)
    if not out:
        raise ValueError(f"no output format given; choose from {', '.join(FORMATS)}")
    return tuple(out)


def default_encoder_threads(size: tuple[int, int], matting_on_cpu: bool) -> int:
    """Threads per video encoder for frames of `size` (W,H): 1 for small frames matted on the CPU, else 0 (FFmpeg's choice).

    Measured on 2 cores: at 512x288 one VP9 thread leaves more of the cores to the network (7.8
    against 8.7 ms of CPU per frame); at 1920x1080 one thread takes 116 ms per frame, longer
    than matting it, against 57 ms with FFmpeg's threads.
    """
    return 1 if matting_on_cpu and size[0] * size[1] <= 640 * 480 else 0


class MatteOutputs:
    """Writers for the requested formats of one video, published atomically by `commit`.

    Args:
        out_dir: parent folder or URI; the set appears as `out_dir/<stem>/`. Abandoned
            temporaries of killed runs in a local `out_dir` are removed first.
        stem: the video's output name (`matting_core.video.video_stem`); one that is empty,
            `.`, `..` or holds a path separator is refused with ValueError before any work.
        formats: subset of FORMATS.
        fps: frame rate of the video outputs.
        size: (width, height) of the frames.
        alpha_bits: 8 or 16 for `pha/*.png`.
        composite_bg: colour, image or video for `composite.mp4`.
        background: encode in a writer thread (PNG and video encoders release the GIL), so
            encoding overlaps the next frame's matting; at most `queue_size` frames wait.
        encoder_threads: threads of each video encoder (0: FFmpeg's choice, one per core). When
            matting runs on the same CPU cores, 1 is faster: extra encoder threads only take
            turns with the network's (VP9 at 512x288 measured 8.7 ms of CPU per frame with
            FFmpeg's threads against 7.8 ms with one).
    """

    def __init__(self, out_dir: str, stem: str, formats: Sequence[str], fps: float | Fraction,
                 size: tuple[int, int], alpha_bits: int = 8, composite_bg: str = "green",
                 background: bool = False, queue_size: int = 4, encoder_threads: int = 0):
        self.formats = parse_formats(formats)
        self.out_dir, self.stem = out_dir, stem
        self.fps, self.background = fps, bool(background)
        self.final_uri = storage.join(out_dir, stem)
        self.tmp = make_temporary(out_dir, stem)
        self.frames = 0
        self._writers: dict[str, object] = {}
        self._queue: queue.Queue | None = None
        self._worker: threading.Thread | None = None
        self._error: BaseException | None = None
        self._discard = False
        try:
            if "pha" in self.formats:
                self._writers["pha"] = AlphaPngWriter(os.path.join(self.tmp, "pha"), bits=alpha_bits)
            if "fgr" in self.formats:
                self._writers["fgr"] = ForegroundPngWriter(os.path.join(self.tmp, "fgr"))
            threads = int(encoder_threads)
            if "rgba.mov" in self.formats:
                self._writers["rgba.mov"] = rgba_mov_writer(os.path.join(self.tmp, "rgba.mov"), fps, size,
                                                            threads=threads)
            if "rgba.webm" in self.formats:
                self._writers["rgba.webm"] = rgba_webm_writer(os.path.join(self.tmp, "rgba.webm"), fps, size,
                                                              threads=threads)
            if "composite.mp4" in self.formats:
                self._writers["composite.mp4"] = CompositeWriter(
                    os.path.join(self.tmp, "composite.mp4"), fps, size, composite_bg, threads=threads)
        except BaseException:
            self.abort()
            raise
        if background:
            self._queue = queue.Queue(maxsize=max(1, queue_size))
            self._worker = threading.Thread(target=self._drain, name=f"matte-writer-{stem}", daemon=True)
            self._worker.start()

    def write(self, index: int, pha: np.ndarray, fgr: np.ndarray) -> None:
        """Add frame `index`: alpha float32 [H,W] in [0,1], foreground uint8 [H,W,3] RGB.

        With a writer thread the arrays are encoded later: the caller must not modify them.
        """
        if self._queue is None:
            self._encode(index, pha, fgr)
        else:
            self._raise_pending()
            self._queue.put((index, pha, fgr))
        self.frames += 1

    def _drain(self) -> None:
        lower_thread_priority()  # encoding can wait; the network's threads cannot (matting_core.runtime)
        while True:
            item = self._queue.get()
            if item is None:
                return
            if self._error is None and not self._discard:
                try:
                    self._encode(*item)
                except BaseException as exc:  # handed to the caller at its next write or commit
                    self._error = exc

    def _raise_pending(self) -> None:
        if self._error is not None:
            raise self._error

    def _stop_worker(self) -> None:
        if self._worker is not None:
            self._queue.put(None)
            self._worker.join()
            self._worker = None

    def _encode(self, index: int, pha: np.ndarray, fgr: np.ndarray) -> None:
        pha8 = rgba = None  # alpha quantised, and RGBA assembled, once for every writer using them
        for name, writer in self._writers.items():
            if name == "fgr":
                writer.write(index, fgr)
            elif name == "composite.mp4":
                writer.write(pha, fgr)
            elif name == "pha" and writer.bits != 8:
                writer.write(index, pha)
            else:
                pha8 = quantize_alpha(pha, 8) if pha8 is None else pha8
                if name == "pha":
                    writer.write(index, pha8)
                elif name == "rgba.webm":
                    writer.write_rgb_alpha(fgr, pha8)
                else:
                    rgba = to_rgba(fgr, pha8) if rgba is None else rgba
                    writer.write(rgba)

    def _close_writers(self) -> None:
        writers, self._writers = self._writers, {}
        error = None
        for writer in writers.values():
            try:
                writer.close()
            except Exception as exc:  # close every writer, then report the first failure
                error = error or exc
        if error is not None:
            raise error

    def finish(self) -> None:
        """Encode what is queued and finish every file (raises the first encoding error)."""
        self._stop_worker()
        self._raise_pending()
        self._close_writers()

    def commit(self, result: dict) -> str:
        """Finish every file, write `result.json` and publish the set; returns its URI."""
        try:
            self.finish()
            publish_temporary(self.tmp, self.final_uri, result)
        except BaseException:
            self.abort()
            raise
        return self.final_uri

    def abort(self) -> None:
        """Drop everything written so far; nothing is published."""
        self._discard = True
        try:
            self._stop_worker()
        except Exception:
            pass
        try:
            self._close_writers()
        except Exception:  # the files are being discarded anyway
            pass
        shutil.rmtree(self.tmp, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            self.abort()
