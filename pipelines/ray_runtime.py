"""Process runtime: starting or joining Ray (a cluster when RAY_ADDRESS is set, else local), malloc
and OpenMP tuning."""
from __future__ import annotations

import logging
import os
import sys

log = logging.getLogger(__name__)

# glibc returns large buffers to the OS and faults them back on every frame; keeping them
# mapped steadies CPU throughput (STACK.md). Workers read it at process start.
GLIBC_TUNABLES = "glibc.malloc.mmap_threshold=33554432:glibc.malloc.trim_threshold=17179869184"
# libgomp's busy-wait before an idle OpenMP thread sleeps (its default is 300,000 spins). Short, so
# that torch's second thread frees its core between operators for the decoder and encoder threads.
GOMP_SPINCOUNT = "1000"
# Non-secret variables a worker needs to reach the same storage as the driver; keys are
# inherited from the environment (locally) or the cluster's own configuration, never passed here.
_FORWARDED = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_DEFAULT_REGION", "AWS_REGION",
              "MATTING_MODEL_CACHE", "MLFLOW_TRACKING_URI")


def ensure_ray(num_cpus: int | None = None) -> None:
    """Initialise Ray once per process: join RAY_ADDRESS if set, else start a local runtime."""
    import ray
    from ray.data import DataContext

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    if not ray.is_initialized():
        env = {k: os.environ[k] for k in _FORWARDED if k in os.environ}
        env.setdefault("GLIBC_TUNABLES", os.environ.get("GLIBC_TUNABLES", GLIBC_TUNABLES))
        kwargs = dict(runtime_env={"env_vars": env}, log_to_driver=True, logging_level=logging.WARNING)
        if os.environ.get("RAY_ADDRESS"):
            ray.init(address=os.environ["RAY_ADDRESS"], **kwargs)
        else:
            ray.init(num_cpus=num_cpus, include_dashboard=False, **kwargs)
    logging.getLogger("ray.data").setLevel(logging.WARNING)  # per-dataset INFO lines drown the summary
    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False  # the job draws one bar of its own
    ctx.enable_operator_progress_bars = False
    ctx.print_on_execution_start = False


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
    threads that spinning takes the cores those threads need. Measured end to end at 512x288 on 2
    cores (120 frames, 3 runs each): 16.7-17.7 frames/s with decoding and encoding adding 9-10% to
    `Matter` alone, against 14.9-16.7 frames/s and 15-17% with the default. libgomp reads the
    variable when it is loaded, so this works only before torch is imported (returns False after).
    """
    os.environ.setdefault("GOMP_SPINCOUNT", GOMP_SPINCOUNT)
    return "torch" not in sys.modules
