"""Starting or joining Ray: a cluster when RAY_ADDRESS is set, else a local runtime."""
from __future__ import annotations

import logging
import os
import signal
import threading

from matting_core.runtime import GLIBC_TUNABLES

log = logging.getLogger(__name__)

# Non-secret variables a worker needs to reach the same storage as the driver; keys are
# inherited from the environment (locally) or the cluster's own configuration, never passed here.
_FORWARDED = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_DEFAULT_REGION", "AWS_REGION",
              "MATTING_MODEL_CACHE", "MLFLOW_TRACKING_URI", "MATTING_STORAGE_CONNECT_TIMEOUT",
              "MATTING_STORAGE_READ_TIMEOUT", "MATTING_STORAGE_RETRIES")


# Ray Train's placement-group cleaner asks the dashboard's state API once a second whether the
# controller lives and warns whenever it cannot: with no dashboard (the local runtime starts none)
# that is a warning a second for the whole run. Unanswered, it leaves the group alone, as it should.
_NOISY_LOGGERS = ("ray.train.v2._internal.execution.controller.placement_group_cleaner",)
# Ray Train logs every report of every worker at INFO, metrics and all (two long lines per
# validation step), with a logger named by its module's file: this file, under ray's folder.
_REPORTS_LOGGER_FILE = ("train", "v2", "_internal", "execution", "context.py")


def quiet_worker_logs() -> None:
    """Ray's worker_process_setup_hook: silence Ray's own warnings that repeat every second and its per-report lines."""
    import ray  # already imported in a Ray worker; ray.train is not, and importing it costs seconds

    for name in _NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    logging.getLogger(os.path.join(os.path.dirname(ray.__file__), *_REPORTS_LOGGER_FILE)).setLevel(logging.WARNING)


def ensure_ray(num_cpus: int | None = None) -> None:
    """Initialise Ray once per process: join RAY_ADDRESS if set, else start a local runtime."""
    import ray
    from ray.data import DataContext

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    if not ray.is_initialized():
        env = {k: os.environ[k] for k in _FORWARDED if k in os.environ}
        env.setdefault("GLIBC_TUNABLES", os.environ.get("GLIBC_TUNABLES", GLIBC_TUNABLES))
        # Ray Train tees a worker's print to its logger's console handler too: each line twice.
        env.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
        runtime_env = {"env_vars": env, "worker_process_setup_hook": "pipelines.ray_runtime.quiet_worker_logs"}
        kwargs = dict(runtime_env=runtime_env, log_to_driver=True, logging_level=logging.WARNING)
        sigterm = signal.getsignal(signal.SIGTERM)
        if os.environ.get("RAY_ADDRESS"):
            ray.init(address=os.environ["RAY_ADDRESS"], **kwargs)
        else:
            ray.init(num_cpus=num_cpus, include_dashboard=False, **kwargs)
        if callable(sigterm) and threading.current_thread() is threading.main_thread():
            # ray.init replaces SIGTERM's handler with sys.exit; keep the CLI's (it runs the Ctrl-C cleanup)
            signal.signal(signal.SIGTERM, sigterm)
    logging.getLogger("ray.data").setLevel(logging.WARNING)  # per-dataset INFO lines drown the summary
    ctx = DataContext.get_current()
    # A failed task raises the job's own exception (a StorageError, say), not a UserCodeException
    # whose cause is lost between processes, so the CLI can still say what went wrong in one line.
    ctx.raise_original_map_exception = True
    ctx.enable_progress_bars = False  # the job draws one bar of its own
    ctx.enable_operator_progress_bars = False
    ctx.print_on_execution_start = False
