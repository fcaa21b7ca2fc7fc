"""MatteOutputs: refusal of output names that escape the folder, and removal of abandoned temporaries."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from matting_core.inference.outputs import OWNER_FILE, MatteOutputs

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("stem", ["", ".", "..", "a/b", "../x", "a\\b", "/"])
def test_names_that_escape_the_output_folder_are_refused_before_any_work(tmp_path, stem):
    out = tmp_path / "out"
    with pytest.raises(ValueError) as exc:
        MatteOutputs(str(out), stem, ("pha",), 25, (8, 8))
    assert repr(stem) in str(exc.value)
    assert not out.exists()  # refused before anything was created


def _abandoned_by_sigkill(parent: Path) -> Path:
    """The temporary folder of a real `MatteOutputs` whose process was killed with SIGKILL."""
    code = ("import sys, time\n"
            "from matting_core.inference.outputs import MatteOutputs\n"
            "o = MatteOutputs(sys.argv[1], 'clip', ('pha',), 25, (8, 8))\n"
            "print(o.tmp, flush=True)\n"
            "time.sleep(60)\n")
    proc = subprocess.Popen([sys.executable, "-c", code, str(parent)], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        tmp = Path(proc.stdout.readline().strip())
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)  # reaped: its pid is no longer alive
    return tmp


def test_abandoned_temporaries_are_removed_and_live_ones_kept(tmp_path):
    parent = tmp_path / "out"
    killed = _abandoned_by_sigkill(parent)
    assert killed.is_dir() and killed.name.startswith(".clip.tmp-")
    owner = json.loads((killed / OWNER_FILE).read_text())
    assert owner["host"] == socket.gethostname() and isinstance(owner["pid"], int) and owner["started"]

    live = MatteOutputs(str(parent), "other", ("pha",), 25, (8, 8))  # owned by this (live) process
    old_unowned = parent / ".older.tmp-0000dead"
    old_unowned.mkdir()
    day_and_more = time.time() - 25 * 3600
    os.utime(old_unowned, (day_and_more, day_and_more))
    fresh_unowned = parent / ".fresh.tmp-0000beef"  # a run that has not written its owner file yet
    fresh_unowned.mkdir()
    elsewhere = parent / ".remote.tmp-00000001"  # another host's run: its pid means nothing here
    elsewhere.mkdir()
    (elsewhere / OWNER_FILE).write_text(json.dumps({"host": "not-" + socket.gethostname(), "pid": 1,
                                                    "started": "2020-01-01T00:00:00+00:00"}))
    published = parent / "clip"
    published.mkdir()
    aside = parent / ".clip.old-00000002"  # a previous set moved aside: not a temporary
    aside.mkdir()
    os.utime(aside, (day_and_more, day_and_more))

    new = MatteOutputs(str(parent), "clip", ("pha",), 25, (8, 8))
    assert not killed.exists() and not old_unowned.exists()
    for kept in (Path(live.tmp), fresh_unowned, elsewhere, published, aside, Path(new.tmp)):
        assert kept.is_dir(), kept
    new.write(0, np.zeros((8, 8), np.float32), np.zeros((8, 8, 3), np.uint8))
    where = new.commit({"status": "ok"})
    assert sorted(os.listdir(where)) == ["pha", "result.json"]  # the owner file is not published
    live.abort()
