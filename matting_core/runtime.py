"""Process tuning and device selection for the CLI and job entry points (never library constructors).

Everything here changes process-wide state or reads the hardware; library objects (`Matter`,
priors, evaluation) never call the setters themselves, so a training process that validates
through them keeps its own settings. Importing this module does not import torch: `tune_openmp`
must run before torch loads.
"""
from __future__ import annotations

import os
import sys
import threading
from typing import Any

__all__ = ["GLIBC_TUNABLES", "GOMP_SPINCOUNT", "HELPER_NICENESS", "tune_malloc", "tune_openmp",
           "set_cpu_threads", "lower_thread_priority", "resolve_device", "available_cpus"]

# glibc returns large buffers to the OS and faults them back on every frame; keeping them
# mapped steadies CPU throughput (STACK.md). Worker processes read it at start.
GLIBC_TUNABLES = "glibc.malloc.mmap_threshold=33554432:glibc.malloc.trim_threshold=17179869184"
# libgomp's busy-wait before an idle OpenMP thread sleeps (its default is 300,000 spins). Short, so
# that torch's second thread frees its core between operators for the decoder and encoder threads.
GOMP_SPINCOUNT = "1000"
# Measured at 512x288 on 2 cores (120 frames, 3 runs each): decoding and encoding added 8-9% to
# Matter's time at niceness 10 against 8-12% at 0, and end to end went from 16.6-17.8 to 17.6-18.4 fps.
HELPER_NICENESS = 10


def available_cpus() -> int:
    """CPU cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def tune_malloc() -> bool:
    """Apply GLIBC_TUNABLES' malloc settings to this running process (glibc only).

    The same effect as starting with GLIBC_TUNABLES set: big buffers stay mapped instead of being
    returned to the OS and faulted back in on every frame (end-to-end matting at 512x288 went
    from 14.1 to 16.1-16.9 frames/s here). Returns False where mallopt is not available.
    """
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        libc = ctypes.CDLL(name)
        m_trim_threshold, m_mmap_threshold = -1, -3  # glibc's malloc.h
        # mallopt takes an int: 2 GiB stands in for the tunable's 16 GiB "never trim".
        return bool(libc.mallopt(m_mmap_threshold, 32 << 20)) and bool(libc.mallopt(m_trim_threshold, 2**31 - 1))
    except (OSError, AttributeError):
        return False


def tune_openmp() -> bool:
    """Shorten OpenMP's busy-wait (GOMP_SPINCOUNT, unless already set) for this process.

    torch's OpenMP threads spin after every operator; on a CPU shared with decoding and encoding
    threads that spinning takes the cores those threads need (decode + encode went from 15-17% to
    9-10% of `Matter`'s time at 512x288 here). libgomp reads the variable when it is loaded, so this
    works only before torch is imported (returns False after).
    """
    os.environ.setdefault("GOMP_SPINCOUNT", GOMP_SPINCOUNT)
    return "torch" not in sys.modules


def set_cpu_threads(threads: int = 0) -> int:
    """Give torch `threads` intra-op threads (0: every available core) and OpenCV one; returns torch's count.

    OpenCV's worker pool (resizes, DIS flow) keeps spinning after each call and steals the cores
    torch's threads need: single-threaded OpenCV made a 512x288 frame 8% faster (53.7 -> 49.4 ms).
    """
    import cv2
    import torch

    threads = int(threads) or available_cpus()
    torch.set_num_threads(threads)
    cv2.setNumThreads(1)
    return threads


def lower_thread_priority(niceness: int = HELPER_NICENESS) -> bool:
    """Give the calling thread a lower CPU priority (Linux; elsewhere nothing); returns whether it did.

    torch's intra-op threads meet at a barrier after every operator, so a helper thread that
    preempts one of them stalls all of them; queued decoding and encoding can wait instead, and
    run in the gaps between operators. The thread still runs whenever a core is free.
    """
    if not hasattr(os, "setpriority") or not hasattr(threading, "get_native_id"):
        return False
    try:
        tid = threading.get_native_id()
        # On Linux a thread is a task with its own niceness: PRIO_PROCESS with its id sets only it.
        os.setpriority(os.PRIO_PROCESS, tid, max(os.getpriority(os.PRIO_PROCESS, tid), niceness))
        return True
    except OSError:
        return False


def resolve_device(device: Any = "auto"):
    """`auto` -> CUDA when available, else CPU; `cpu`; `cuda[:N]` (a clear error without a GPU)."""
    import torch

    if isinstance(device, torch.device):
        return device
    if device in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but no CUDA GPU is available (use --device cpu or auto)")
    if str(device).split(":")[0] not in ("cpu", "cuda"):
        raise ValueError(f"unknown device {device!r}; use auto, cpu or cuda")
    return torch.device(device)
