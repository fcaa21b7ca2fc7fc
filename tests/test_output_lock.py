"""The output lock between real processes, on a local folder and on the real S3 server."""
from __future__ import annotations

import contextlib
import json
import logging
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Iterator

import pytest

from matting_core import storage
from matting_core.output_lock import LOCK_NAME, OutputLock, OutputLocked

REPO = Path(__file__).resolve().parents[1]

# A process that takes the lock (at an agreed time, to race others), holds it, then releases it.
_HOLDER = """
import sys, time
from matting_core.output_lock import OutputLock, OutputLocked
out, hold, stale, beat, start_at, run_id = sys.argv[1:7]
time.sleep(max(0.0, float(start_at) - time.time()))
try:
    lock = OutputLock(out, stale_after_s=float(stale), heartbeat_s=float(beat), run_id=run_id).acquire()
except OutputLocked as exc:
    print("refused", exc, flush=True)
    sys.exit(0)
print("held", flush=True)
time.sleep(float(hold))
lock.release()
print("released", flush=True)
"""


def holder(out: str, hold: float = 60.0, stale: float = 180.0, beat: float = 0.0, start_at: float = 0.0,
           run_id: str = "holder") -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", _HOLDER, out, str(hold), str(stale), str(beat), str(start_at),
                             run_id], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)


def wait_held(proc: subprocess.Popen) -> None:
    line = proc.stdout.readline()
    assert line.startswith("held"), (line, proc.stderr.read() if proc.poll() is not None else "")


@contextlib.contextmanager
def held_then_killed(out: str) -> Iterator[subprocess.Popen]:
    """Another process holds `out`'s lock inside the block; it is SIGKILLed at the end (its lock left behind)."""
    other = holder(out)
    try:
        wait_held(other)
        yield other
    finally:
        other.kill()
        other.wait()


@pytest.fixture(params=["local", pytest.param("s3", marks=pytest.mark.s3)])
def out(request, tmp_path) -> str:
    """An output folder: local, or a fresh prefix on the SeaweedFS S3 server."""
    if request.param == "local":
        return str(tmp_path / "out")
    request.getfixturevalue("s3_server")
    return f"s3://test/locks/{uuid.uuid4().hex[:8]}"


def lock_record(out: str) -> dict | None:
    try:
        return json.loads(storage.read_bytes(storage.join(out, LOCK_NAME)))
    except FileNotFoundError:
        return None


def test_of_racing_processes_exactly_one_gets_the_lock(out):
    start_at = time.time() + 2.0
    procs = [holder(out, hold=2.0, start_at=start_at, run_id=f"racer{i}") for i in range(3)]
    outputs = [p.communicate(timeout=60)[0] for p in procs]
    held = [o for o in outputs if o.startswith("held")]
    refused = [o for o in outputs if o.startswith("refused")]
    assert len(held) == 1 and len(refused) == 2, outputs
    winner = procs[outputs.index(held[0])]
    for message in refused:  # the refusal names the run that holds the output
        assert f"pid {winner.pid}" in message and "in use by another run" in message, message
    assert lock_record(out) is None  # released at the end


def test_a_live_holder_refuses_and_a_killed_one_is_taken_over(out, caplog):
    proc = holder(out)
    try:
        wait_held(proc)
        with pytest.raises(OutputLocked, match=f"pid {proc.pid}, run holder"):
            OutputLock(out).acquire()
    finally:
        proc.kill()
        proc.wait()
    assert lock_record(out)["pid"] == proc.pid  # SIGKILL left the lock behind
    with caplog.at_level(logging.WARNING, logger="matting.lock"):
        lock = OutputLock(out).acquire()  # its process is gone on this host: taken over at once
    try:
        assert "taking over the abandoned lock" in caplog.text and str(proc.pid) in caplog.text
        assert lock_record(out)["pid"] == os.getpid()
    finally:
        lock.release()
    assert lock_record(out) is None


def test_heartbeat_keeps_a_lock_fresh_and_a_silent_remote_owner_goes_stale(out, caplog):
    proc = holder(out, hold=3.0, stale=1.0, beat=0.2)
    wait_held(proc)
    time.sleep(1.6)  # past the stale timeout: only the heartbeat keeps the lock
    with pytest.raises(OutputLocked):
        OutputLock(out, stale_after_s=1.0).acquire()
    assert proc.communicate(timeout=30)[0].strip() == "released"

    fs, path = storage.filesystem(storage.join(out, LOCK_NAME))
    foreign = {"host": "elsewhere", "pid": 1, "run_id": "remote", "token": "t", "started_iso": "then"}
    fs.pipe_file(path, json.dumps({**foreign, "heartbeat": time.time()}).encode())
    with pytest.raises(OutputLocked, match="host elsewhere"):  # another host, fresh: alive as far as we know
        OutputLock(out).acquire()
    fs.pipe_file(path, json.dumps({**foreign, "heartbeat": time.time() - 1000}).encode())
    with caplog.at_level(logging.WARNING, logger="matting.lock"):
        with OutputLock(out, stale_after_s=300) as lock:
            assert "host elsewhere" in caplog.text and lock_record(out)["token"] == lock.token
    assert lock_record(out) is None
