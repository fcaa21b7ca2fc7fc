"""Process tuning for matting on shared CPU cores: OpenMP's spin count must be set before torch loads."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

_PROBE = """
import json, os, sys
from matting_core.runtime import GOMP_SPINCOUNT, tune_openmp
before = tune_openmp()
import torch
after = tune_openmp()
print(json.dumps({"before": before, "after": after, "env": os.environ.get("GOMP_SPINCOUNT"),
                  "default": GOMP_SPINCOUNT}))
"""


def _probe(env_extra: dict[str, str]) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "GOMP_SPINCOUNT"}
    env.update(env_extra)
    out = subprocess.run([sys.executable, "-c", _PROBE], cwd=ROOT, env=env, capture_output=True,
                         text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def test_tune_openmp_sets_spin_count_before_torch_only():
    r = _probe({})
    assert r["before"] is True and r["after"] is False  # effective only before torch is imported
    assert r["env"] == r["default"] == "1000"


def test_tune_openmp_keeps_a_users_setting():
    assert _probe({"GOMP_SPINCOUNT": "50000"})["env"] == "50000"


def test_helper_threads_run_at_lower_priority(tmp_path):
    """The decoder and writer threads lower their own priority, not the caller's."""
    import threading

    import numpy as np

    from matting_core.runtime import HELPER_NICENESS, lower_thread_priority
    from matting_core.inference.outputs import MatteOutputs
    from matting_core.video import prefetch

    main_nice = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    seen: dict[str, int] = {}

    def frames():
        seen["decoder"] = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
        yield np.zeros((8, 8, 3), np.uint8)

    assert [i for i, _ in prefetch(frames(), [0])] == [0]
    assert seen["decoder"] == max(main_nice, HELPER_NICENESS)

    outputs = MatteOutputs(str(tmp_path), "clip", ("pha",), 25, (8, 8), background=True)
    outputs.write(0, np.zeros((8, 8), np.float32), np.zeros((8, 8, 3), np.uint8))
    writer_tid = outputs._worker.native_id
    deadline = time.monotonic() + 10  # the thread sets its priority when it starts running
    while os.getpriority(os.PRIO_PROCESS, writer_tid) != max(main_nice, HELPER_NICENESS):
        assert time.monotonic() < deadline, "writer thread never lowered its priority"
        time.sleep(0.01)
    outputs.commit({"status": "ok"})
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == main_nice

    # Never raises priority: a thread already nicer than asked stays where it is.
    box: dict[str, int] = {}

    def nicer():
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 15)
        lower_thread_priority(5)
        box["nice"] = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    t = threading.Thread(target=nicer)
    t.start()
    t.join()
    assert box["nice"] == 15


def test_set_cpu_threads_is_the_entry_points_call_and_leaves_opencv_single_threaded():
    code = ("import cv2, json, torch\n"
            "from matting_core.runtime import available_cpus, set_cpu_threads\n"
            "cv2.setNumThreads(4)\n"
            "n = set_cpu_threads(1)\n"
            "a = [n, torch.get_num_threads(), cv2.getNumThreads()]\n"
            "print(json.dumps({'one': a, 'all': set_cpu_threads(), 'cpus': available_cpus()}))\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    got = json.loads(out.stdout)
    assert got["one"] == [1, 1, 1] and got["all"] == got["cpus"]
