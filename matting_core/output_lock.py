"""An exclusive lock on an output folder (local or object store), with its owner and a heartbeat.

The lock is the file `OUT/_lock.json`, created atomically: a hard link that fails if the name exists
(the guarantee of `O_CREAT | O_EXCL`, with the record complete when it appears) locally, a
conditional PUT (`If-None-Match: *`) on S3 (SeaweedFS and AWS both honour it). It names its owner
(host, pid, run id, start and heartbeat times, a random token). A thread rewrites the heartbeat
while the lock is held. A lock is stale when its heartbeat is older than `stale_after_s`, or when
its owner ran on this host and that process is gone (a SIGKILLed run); a stale lock is taken over
with a warning: locally by renaming it aside (atomic, so two runs cannot both take it), on S3 by a
PUT conditional on the stale lock's ETag (`If-Match`).
"""
from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass

from fsspec.implementations.local import LocalFileSystem

from matting_core import storage

__all__ = ["LOCK_NAME", "OutputLock", "OutputLocked", "owner_description"]

LOCK_NAME = "_lock.json"
log = logging.getLogger("matting.lock")


class OutputLocked(RuntimeError):
    """Another live run holds the output's lock; `owner` is its lock record."""

    def __init__(self, out: str, owner: dict, stale_after_s: float):
        self.out, self.owner = out, owner
        super().__init__(f"{out} is in use by another run ({owner_description(owner)}); wait for it to end or "
                         f"use another output. A lock whose heartbeat is older than {stale_after_s:.0f} s, or "
                         f"whose process on this host is gone, is taken over automatically")


def owner_description(owner: dict) -> str:
    """One line naming a lock's owner: host, pid, run id, start and heartbeat age."""
    beat = owner.get("heartbeat")
    age = f"{time.time() - beat:.0f} s ago" if isinstance(beat, (int, float)) else "unknown"
    return (f"host {owner.get('host', '?')}, pid {owner.get('pid', '?')}, run {owner.get('run_id', '?')}, "
            f"started {owner.get('started_iso', '?')}, last heartbeat {age}")


@dataclass
class _Held:
    """What we last wrote: our record and, on object stores, the ETag that names that version."""

    record: dict
    etag: str | None = None


class OutputLock:
    """Exclusive lock on `out` (`OUT/_lock.json`). Use as a context manager or acquire()/release().

    Args:
        out: the output folder's URI.
        stale_after_s: a lock whose heartbeat is older than this is abandoned and taken over.
        heartbeat_s: how often the holder refreshes its heartbeat (default: a quarter of stale_after_s).
        run_id: recorded in the lock to name the run (default: a random id).
    """

    def __init__(self, out: str, stale_after_s: float = 180.0, heartbeat_s: float | None = None,
                 run_id: str | None = None):
        self.out, self.uri = out, storage.join(out, LOCK_NAME)
        self.stale_after_s = float(stale_after_s)
        self.heartbeat_s = float(heartbeat_s) if heartbeat_s else max(0.05, self.stale_after_s / 4)
        self.run_id = run_id or uuid.uuid4().hex[:12]
        self.token = uuid.uuid4().hex
        self.fs, self.path = storage.filesystem(self.uri)
        self.local = isinstance(self.fs, LocalFileSystem)
        self.lost = False  # set when the heartbeat finds the lock no longer ours
        self._held: _Held | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # --- public ----------------------------------------------------------------------------------

    def acquire(self) -> "OutputLock":
        """Take the lock, or take over a stale one; raises OutputLocked when a live run holds it."""
        with storage.faults(self.uri, self.fs):  # access denied, no answer: a StorageError naming the lock
            return self._acquire()

    def _acquire(self) -> "OutputLock":
        started = time.time()
        record = {"host": socket.gethostname(), "pid": os.getpid(), "run_id": self.run_id, "token": self.token,
                  "started": started, "started_iso": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
                  "heartbeat": started}
        for _ in range(5):  # a lock released or taken over while we look: look again
            held = self._create(record)
            if held:
                return self._start(held)
            current = self._read()
            if current is None:
                continue
            owner, version = current
            if not self._is_stale(owner, version):
                raise OutputLocked(self.out, owner, self.stale_after_s)
            log.warning("taking over the abandoned lock on %s (%s)", self.out, owner_description(owner))
            held = self._take_over(owner, version, record)
            if held:
                return self._start(held)
        current = self._read()
        raise OutputLocked(self.out, current[0] if current else {}, self.stale_after_s)

    def release(self) -> None:
        """Stop the heartbeat and remove the lock if it is still ours."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._held is None:
            return
        self._held = None
        current = self._read()
        if current is not None and current[0].get("token") == self.token:
            try:
                self.fs.rm(self.path)
            except FileNotFoundError:
                pass

    def __enter__(self) -> "OutputLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    # --- staleness -------------------------------------------------------------------------------

    def _is_stale(self, owner: dict, version) -> bool:
        beat = owner.get("heartbeat")
        if not isinstance(beat, (int, float)):
            # unreadable record (being written, or garbage): judge by the file's age
            beat = version[1] if self.local and version else time.time()
        if time.time() - beat > self.stale_after_s:
            return True
        if owner.get("host") == socket.gethostname() and isinstance(owner.get("pid"), int):
            return not _pid_alive(owner["pid"])
        return False

    # --- storage -----------------------------------------------------------------------------------

    def _create(self, record: dict) -> _Held | None:
        """Create the lock file if absent (atomic); None when it exists."""
        data = json.dumps(record, indent=1).encode()
        if self.local:
            # Written under a private name, then hard-linked into place: link() fails when the
            # name exists (as O_CREAT|O_EXCL does) and a reader never sees a half-written record.
            os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
            tmp = f"{self.path}.{self.token}.new"
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            try:
                os.link(tmp, self.path)
            except FileExistsError:
                return None
            except OSError:  # a filesystem without hard links
                return self._create_exclusive(record, data)
            finally:
                os.remove(tmp)
            return _Held(record)
        try:
            out = self.fs.pipe_file(self.path, data, mode="create")
        except (OSError, FileExistsError):
            if self.fs.exists(self.path):
                return None
            raise
        return _Held(record, _etag(out) or self._etag())

    def _create_exclusive(self, record: dict, data: bytes) -> _Held | None:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return None
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        return _Held(record)

    def _read(self) -> tuple[dict, object] | None:
        """(the lock's record, its version: (inode, mtime) locally, the ETag on S3), or None when absent."""
        try:
            if self.local:
                st = os.stat(self.path)
                with open(self.path, "rb") as f:
                    raw = f.read()
                version = (st.st_ino, st.st_mtime)
            else:
                self.fs.invalidate_cache(self.path)
                version = self._etag()  # before the content: a newer content fails our If-Match later
                raw = self.fs.cat_file(self.path)
        except FileNotFoundError:
            return None
        try:
            record = json.loads(raw)
        except ValueError:
            record = {}
        return (record if isinstance(record, dict) else {}), version

    def _etag(self) -> str | None:
        self.fs.invalidate_cache(self.path)
        return self.fs.info(self.path).get("ETag")

    def _take_over(self, owner: dict, version, record: dict) -> _Held | None:
        """Replace the stale lock `owner` with `record`, only if it is still that lock."""
        data = json.dumps(record, indent=1).encode()
        if not self.local:
            if not version:  # a store that names no version: the lock cannot be replaced safely
                return None
            try:
                out = self.fs.pipe_file(self.path, data, IfMatch=version)
            except (OSError, FileNotFoundError):
                return None  # changed since we read it: someone else took it, or it was released
            return _Held(record, _etag(out) or self._etag())
        # Rename aside (atomic: of two runs taking over, one gets the file), check that we moved
        # the stale lock and not a fresh one, then create ours exclusively.
        aside = f"{self.path}.{self.token}.stale"
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return None
        try:
            with open(aside, "rb") as f:
                moved = json.loads(f.read() or b"{}")
        except ValueError:
            moved = {}
        if moved.get("token") != owner.get("token"):
            try:
                os.link(aside, self.path)  # put the other run's fresh lock back (unless yet another exists)
            except FileExistsError:
                pass
            os.remove(aside)
            return None
        os.remove(aside)
        return self._create(record)

    def _beat(self) -> bool:
        """Refresh the heartbeat; False when the lock is no longer ours."""
        held = self._held
        record = {**held.record, "heartbeat": time.time()}
        data = json.dumps(record, indent=1).encode()
        if self.local:
            current = self._read()
            if current is None or current[0].get("token") != self.token:
                return False
            tmp = f"{self.path}.{self.token}.beat"
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, self.path)
            self._held = _Held(record)
            return True
        if not held.etag:
            held = _Held(held.record, self._etag())
        try:
            out = self.fs.pipe_file(self.path, data, IfMatch=held.etag)
        except (OSError, FileNotFoundError):
            return False
        self._held = _Held(record, _etag(out) or self._etag())
        return True

    def _start(self, held: _Held) -> "OutputLock":
        self._held, self.lost = held, False
        self._stop.clear()
        self._thread = threading.Thread(target=self._heartbeat_loop, name="output-lock-heartbeat", daemon=True)
        self._thread.start()
        return self

    def _heartbeat_loop(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                ok = self._beat()
            except OSError as exc:  # storage hiccup: try again at the next beat, the timeout is generous
                log.warning("could not refresh the lock on %s: %s", self.out, exc)
                continue
            if not ok:
                self.lost = True
                log.error("the lock on %s was taken over by another run; this run's output may be mixed",
                          self.out)
                return


def _etag(put_result) -> str | None:
    return put_result.get("ETag") if isinstance(put_result, dict) else None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True
