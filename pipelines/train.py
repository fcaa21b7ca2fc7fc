"""`matting train`: data-parallel training on Ray Train, tracked and registered in MLflow.

The driver checks everything it can before any worker starts (dataset, clip sizes, tracking
store, run identity), opens or resumes the MLflow run, then runs `TorchTrainer` over
`_train_worker`. Each worker reads its own clips straight from the dataset by id (a seeded order
that depends only on (seed, step, rank), so a restart from a checkpoint continues the same
sequence) and computes the prior as inference does; no Ray Data stage competes with the workers
for CPUs (STACK.md: the 2-core hang). Rank 0 logs to MLflow and, at the end, logs the final
checkpoint and registers it with alias `candidate`.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import sys
import tempfile
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from pipelines.config import NonNegativeFloat, NonNegativeInt, PositiveFloat, PositiveInt, option

log = logging.getLogger(__name__)

CHECKPOINT_FILE = "model.pt"
SUMMARY_FILE = "summary.json"
RUN_FILE = "mlflow_run.json"


@dataclass(frozen=True)
class TrainConfig:
    """Settings of one `matting train` run (defaults < preset < YAML file < flags)."""

    data: str = option("", "clip dataset URI (OUT of `matting generate`)", metavar="URI")
    val_data: str | None = option(None, "validation clip dataset URI (default: clips of held-out photos)",
                                  metavar="URI")
    preset: str = option("cpu-small", "recipe preset (cpu-small, gpu)", metavar="NAME")
    # Keys of RecipeConfig over the preset, from YAML only (nested: `recipe: {optim: {lr: 1e-4}}`).
    recipe: dict[str, Any] = field(default_factory=dict, metadata={"cli": False})
    steps: PositiveInt | None = option(None, "training steps (default: the preset's)")
    backbone_weights: str | None = option(None, "encoder initialisation: imagenet, none or a PATH "
                                                "(default: the preset's)", metavar="W")
    workers: PositiveInt = option(2, "Ray Train workers (DDP processes)")
    cpus_per_worker: PositiveFloat = option(1.0, "CPUs each worker reserves")
    gpus_per_worker: NonNegativeFloat = option(0.0, "GPUs each worker reserves (0: train on CPUs with gloo)")
    storage: str = option("./runs", "where checkpoints go: <storage>/<run name>/ (a path or s3://...)",
                          metavar="URI")
    experiment: str = option("matting", "MLflow experiment", metavar="NAME")
    run_name: str | None = option(None, "run name (default: <experiment>-<hash of the resolved config>)",
                                  metavar="NAME")
    register_as: str = option("matting", "registered model name (the final model gets alias candidate)",
                              metavar="NAME")
    overwrite: bool = option(False, "start the run again instead of resuming or reporting it")
    tracking_uri: str | None = option(None, "MLflow store (default: MLFLOW_TRACKING_URI, else ./mlflow.db)",
                                      metavar="URI")
    max_failures: NonNegativeInt = option(2, "worker failures a run survives (each restarts from the last checkpoint)")


@dataclass(frozen=True)
class TrainJob:
    """Where a training run reads, writes and reports (everything but the recipe)."""

    data: str
    val_data: str | None
    workers: int
    cpus_per_worker: float
    gpus_per_worker: float
    storage: str
    run_name: str
    experiment: str
    register_as: str
    tracking_uri: str
    max_failures: int


@dataclass
class TrainSummary:
    """What a run did: steps, final and best validation metrics, the registered version, where checkpoints are."""

    run_name: str
    run_id: str
    steps: int
    checkpoint_dir: str
    metrics: dict[str, float] = field(default_factory=dict)
    best: dict[str, float] = field(default_factory=dict)
    registered: str | None = None
    skipped_clips: int = 0
    seconds: float = 0.0
    resumed: bool = False


def config_hash(resolved: dict[str, Any]) -> str:
    """Short hash of a resolved config (the default run name's suffix)."""
    return hashlib.sha256(json.dumps(resolved, sort_keys=True, default=str).encode()).hexdigest()[:8]


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """`{"a": {"b": 1}}` -> `{"a.b": "1"}`: nested config as MLflow params."""
    out: dict[str, str] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, name + "."))
        else:
            out[name] = json.dumps(value, default=str) if not isinstance(value, str) else value
    return out


# ---------------------------------------------------------------------------------------------
# The clip order: global sample g = (step * world + rank) * batch + i; epoch = g // N visits a
# seeded permutation of the N training clips. Depends only on (seed, step, rank), so a resumed run
# (same world size) draws exactly the clips it would have drawn.

def clips_for_step(ids: list[int], seed: int, step: int, rank: int, world: int, batch: int) -> list[int]:
    """The clip ids rank `rank` trains on at `step`."""
    import numpy as np

    n = len(ids)
    out = []
    for i in range(batch):
        g = (step * world + rank) * batch + i
        perm = np.random.default_rng([int(seed), 7, g // n]).permutation(n)
        out.append(ids[int(perm[g % n])])
    return out


# ---------------------------------------------------------------------------------------------
# Worker side

def _train_worker(config: dict[str, Any]) -> None:
    """Ray Train's train_loop_per_worker: resume or calibrate, train, validate, checkpoint, log (rank 0), register."""
    import itertools

    import ray.train
    import ray.train.torch

    from matting_core.data.clip_index import ClipIndex
    from matting_core.runtime import set_cpu_threads
    from matting_core.training.batches import RECORD_COLUMNS, collate, draw_window, make_sample, sample_rng
    from matting_core.training.engine import (build_model, build_optimizer, build_prior_stream, calibrate_batch_norm,
                                              evaluate, prepare_batch_norm, restore_training_checkpoint,
                                              set_fitted_output, train_step)

    job: TrainJob = config["job"]
    recipe = config["recipe"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    if device.type == "cpu":
        set_cpu_threads(max(1, int(job.cpus_per_worker)))

    train_index = ClipIndex(job.data)
    val_index = ClipIndex(job.val_data) if job.val_data else train_index
    train_ids, val_ids = config["train_ids"], config["val_ids"]
    # Two prior streams: training batches are made in a helper thread (below) while rank 0 may
    # be validating, and a stream carries per-clip smoothing state.
    prior_stream, val_prior_stream = build_prior_stream(recipe, device), build_prior_stream(recipe, device)
    skipped = 0

    def batch_at(s: int, draw: int = 0):
        """Rank `rank`'s batch of step `s`; a clip that cannot be decoded is skipped and counted."""
        nonlocal skipped
        samples = []
        ids = clips_for_step(train_ids, recipe.seed + draw, s, rank, world, recipe.batch_size)
        for i, clip_id in enumerate(ids):
            rng = sample_rng(recipe.seed, s, rank, i)
            # Only the sample's window is decoded: half of an 8-frame clip at 4 frames per sample.
            start = draw_window(rng, train_index.entries[clip_id].num_frames, recipe.frames)
            try:
                record = train_index.read(clip_id, RECORD_COLUMNS, frames=slice(start, start + recipe.frames))
                # inside the try: bgr is decoded only when the sample draws a pause, here
                samples.append(make_sample(record, recipe, rng, prior_stream, window_drawn=True,
                                           empty_prior=recipe.prior_is_off(s, rank, i)))
            except Exception as exc:  # a corrupt row costs itself, not the run
                skipped += 1
                log.warning("clip %d skipped: %s", clip_id, exc)
                continue
        return collate(samples) if samples else batch_at(s, draw + 1)

    def val_batches(native_size: bool = False):
        return validation_batches(val_index, val_ids, recipe, val_prior_stream, native_size)

    model = build_model(recipe).to(device)
    optimizer, scheduler = build_optimizer(model, recipe)
    step, best = 0, {}
    resume = ray.train.get_checkpoint()
    if resume is not None:
        with resume.as_directory() as folder:
            extra = restore_training_checkpoint(os.path.join(folder, CHECKPOINT_FILE), model, optimizer,
                                                scheduler, recipe)
        step, skipped, best = int(extra["step"]), int(extra.get("skipped_clips", 0)), dict(extra.get("best", {}))
    else:
        # Frozen batch norms need statistics of this data before the first step: draws past the
        # schedule's last step, so calibration reads clips no step depends on.
        calibrate_batch_norm(model, (batch_at(recipe.steps + k) for k in range(recipe.bn_calibration_batches)),
                             recipe, device)
    ddp = ray.train.torch.prepare_model(prepare_batch_norm(model, recipe))  # DistributedDataParallel when world > 1
    tracker = _Tracker(job, config["run_id"], recipe) if rank == 0 else None

    # The next step's batch (decoding, augmentation, the prior) is made in a helper thread while
    # this one computes: OpenCV, numpy and LiteRT release the GIL. data_s is the time the step
    # then still waits for it.
    loader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="matting-batches")
    upcoming = loader.submit(batch_at, step) if step < recipe.steps else None
    since_log = StepMeans()
    start_time, start_step = time.perf_counter(), step
    while step < recipe.steps:
        t0 = time.perf_counter()
        batch = upcoming.result()
        if step + 1 < recipe.steps:
            upcoming = loader.submit(batch_at, step + 1)
        t1 = time.perf_counter()
        metrics = train_step(ddp, batch, optimizer, scheduler, recipe, device)
        metrics.update(data_s=t1 - t0, step_s=time.perf_counter() - t1)
        step += 1
        metrics["frames_per_s"] = ((step - start_step) * world * recipe.batch_size * recipe.frames
                                   / max(time.perf_counter() - start_time, 1e-9))
        metrics["skipped_clips"] = skipped
        since_log.add(metrics)
        last = step == recipe.steps
        if tracker is not None and (step % recipe.log_every == 0 or last):
            tracker.train(step, since_log.take(), time.perf_counter() - start_time, step - start_step)
        validate = bool(val_ids) and (last or (recipe.val_every and step % recipe.val_every == 0))
        keep = last or bool(recipe.checkpoint_every and step % recipe.checkpoint_every == 0)
        val: dict[str, float] = {}
        if validate and rank == 0:  # the unwrapped model: DDP's forward would wait for the other ranks
            val = evaluate(model, itertools.islice(val_batches(), _val_batches(recipe)), recipe, device)
            best = {k: min(v, best.get(k, v)) for k, v in val.items()}
            if last and recipe.fit_output:  # before the last checkpoint and the registered model
                val.update(set_fitted_output(model, itertools.islice(val_batches(native_size=True),
                                                                     _val_batches(recipe)), recipe, device))
            tracker.val(step, val, model, next(val_batches()), device)
        if validate or keep:  # a barrier: every rank reports at the same steps
            _report(model, optimizer, scheduler, recipe, step, config, rank, keep,
                    {"skipped_clips": skipped, "best": best}, _prefixed(metrics, val))
    loader.shutdown()
    if tracker is not None:
        tracker.finish(model, step, skipped)


class StepMeans:
    """Means of the per-step training metrics since the last `take` (the state ones, `lr`, `frames_per_s`
    and `skipped_clips`, as of the last step): one step's loss is noise, the curve is their mean."""

    LAST = ("lr", "frames_per_s", "skipped_clips")

    def __init__(self):
        self._reset()

    def _reset(self) -> None:
        self._sums: dict[str, float] = {}
        self._last: dict[str, float] = {}
        self._steps = 0

    def add(self, metrics: dict[str, float]) -> None:
        """Count one step's metrics."""
        for k, v in metrics.items():
            self._sums[k] = self._sums.get(k, 0.0) + float(v)
        self._last = dict(metrics)
        self._steps += 1

    def take(self) -> dict[str, float]:
        """The means (and last values) of the steps added since the last call; starts a new window."""
        out = {k: (self._last[k] if k in self.LAST else v / self._steps) for k, v in self._sums.items()}
        self._reset()
        return out


def validation_batches(index, ids: list[int], recipe, prior_stream, native_size: bool = False):
    """Batches of the validation clips `ids`, whole and unaugmented (scaled to the training size, or at their
    own with `native_size`), with the prior as inference computes it."""
    from matting_core.training.batches import RECORD_COLUMNS, iter_batches

    records = (index.read(c, RECORD_COLUMNS, frames=slice(0, recipe.frames)) for c in ids)  # the samples' window
    return iter_batches(records, recipe, prior_stream, augment=False, drop_last=False, native_size=native_size)


def _val_batches(recipe) -> int:
    return max(1, -(-recipe.val_clips // recipe.batch_size))


def _prefixed(train: dict[str, float], val: dict[str, float]) -> dict[str, float]:
    return {**{f"train/{k}": v for k, v in train.items()}, **{f"val/{k}": v for k, v in val.items()}}


def _report(model, optimizer, scheduler, recipe, step: int, config: dict, rank: int, keep: bool,
            state: dict[str, Any], metrics: dict[str, float]) -> None:
    """Report `metrics` from every rank; with `keep`, rank 0 attaches the training checkpoint (weights,
    optimiser, schedule, step, data position, MLflow run id, resolved config)."""
    import ray.train

    from matting_core.training.engine import save_training_checkpoint

    payload = {"step": step, **metrics}
    if rank != 0 or not keep:
        ray.train.report(payload)
        return
    with tempfile.TemporaryDirectory(prefix="matting-ckpt-") as folder:
        save_training_checkpoint(model, os.path.join(folder, CHECKPOINT_FILE), optimizer, scheduler, recipe, step,
                                 mlflow_run_id=config["run_id"], config=config["resolved"],
                                 data_position={"step": step, "order": "(seed, step, rank)"}, **state)
        ray.train.report(payload, checkpoint=ray.train.Checkpoint.from_directory(folder))


class _Tracker:
    """Rank 0's MLflow logging and progress lines: metrics per step, validation previews, the final model."""

    def __init__(self, job: TrainJob, run_id: str, recipe):
        from mlflow.tracking import MlflowClient

        self.job, self.run_id, self.recipe = job, run_id, recipe
        self.client = MlflowClient(job.tracking_uri, registry_uri=job.tracking_uri)

    def train(self, step: int, metrics: dict[str, float], elapsed: float, done: int) -> None:
        """Log `train/<term>` and `train/loss` (means over the steps since the last log) at `step`; print
        step, loss, frames/s and the time left."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        rows = [Metric(f"train/{k}", float(v), now, step) for k, v in metrics.items()]
        rows.append(Metric("train/loss", float(metrics["total"]), now, step))
        self.client.log_batch(self.run_id, metrics=rows)
        eta = (self.recipe.steps - step) * elapsed / max(done, 1)
        print(f"step {step}/{self.recipe.steps}  loss {metrics['total']:.4f}  lr {metrics['lr']:.2e}  "
              f"{metrics['frames_per_s']:.1f} frames/s  eta {eta / 60:.1f} min", flush=True)

    def val(self, step: int, metrics: dict[str, float], model, batch, device) -> None:
        """Log `val/*` and a preview (composite | predicted alpha | true alpha) of a few validation clips."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(f"val/{k}", float(v), now, step)
                                                    for k, v in metrics.items()])
        self.client.log_image(self.run_id, _preview(model, batch, device), f"previews/step-{step:06d}.png")
        print(f"step {step} validation  " + "  ".join(f"{k} {v:.4g}" for k, v in metrics.items()), flush=True)

    def finish(self, model, step: int, skipped: int) -> None:
        """Log the final checkpoint, its outputs on a fixed input and the loss curve; register it as `candidate`."""
        import numpy as np

        from matting_core.model import save_checkpoint

        with tempfile.TemporaryDirectory(prefix="matting-final-") as folder:
            path = os.path.join(folder, CHECKPOINT_FILE)
            save_checkpoint(model, path, extra={"step": step, "mlflow_run_id": self.run_id})
            self.client.log_artifact(self.run_id, path, "model")
            probe = os.path.join(folder, "probe.npz")
            np.savez(probe, **probe_outputs(model))
            self.client.log_artifact(self.run_id, probe, "probe")
        curves = {k: [(m.step, m.value) for m in self.client.get_metric_history(self.run_id, k)]
                  for k in ("train/loss", "val/loss")}
        self.client.log_image(self.run_id, _loss_curve(curves), "loss_curve.png")
        self.client.log_metric(self.run_id, "train/skipped_clips", skipped, step=step)
        name = self.job.register_as
        try:
            self.client.get_registered_model(name)
        except Exception:  # not registered yet
            self.client.create_registered_model(name)
        source = f"{self.client.get_run(self.run_id).info.artifact_uri}/model"
        version = self.client.create_model_version(name, source, run_id=self.run_id)
        self.client.set_registered_model_alias(name, "candidate", version.version)
        self.client.set_tag(self.run_id, "registered_version", str(version.version))


def probe_outputs(model) -> dict:
    """The model's outputs on a fixed seeded input (3 frames of 64x96), so a loaded copy can be checked against the run."""
    import torch

    gen = torch.Generator().manual_seed(1234)
    src, prior = torch.rand(1, 3, 3, 64, 96, generator=gen), torch.rand(1, 3, 1, 64, 96, generator=gen)
    was = model.training
    model.eval()
    first = next(model.parameters())
    with torch.no_grad():
        pha, fgr, _ = model(src.to(first.device), prior.to(first.device))
    model.train(was)
    return {"pha": pha.float().cpu().numpy(), "fgr": fgr.float().cpu().numpy()}


def _preview(model, batch, device):
    """uint8 [rows*H, 3*W, 3]: composite | predicted alpha | true alpha for the first frame of a few clips."""
    import numpy as np
    import torch

    was = model.training
    model.eval()
    with torch.no_grad():
        src, prior = batch.src[:3].to(device), batch.prior[:3].to(device)
        pha, _, _ = model(src, prior)
    model.train(was)
    rows = []
    for b in range(src.shape[0]):
        t = src.shape[1] - 1  # the last frame: the recurrent state has seen the clip
        com = src[b, t].permute(1, 2, 0).float().cpu().numpy()
        grey = lambda a: np.repeat(a[0].float().cpu().numpy()[..., None], 3, axis=2)  # noqa: E731
        rows.append(np.concatenate([com, grey(pha[b, t]), grey(batch.pha[b, t])], axis=1))
    return (np.clip(np.concatenate(rows, axis=0), 0, 1) * 255).astype(np.uint8)


def _loss_curve(curves: dict[str, list[tuple[int, float]]]):
    """uint8 [H,W,3]: each named curve (step, value) over steps, log scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    for name, points in curves.items():
        if points:
            ax.plot(*zip(*sorted(points)), "o-" if name.startswith("val") else "-", label=name, markersize=3)
    ax.set_xlabel("step")
    ax.set_yscale("log")
    ax.legend()
    fig.tight_layout()
    fig.canvas.draw()
    image = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
    plt.close(fig)
    return image


# ---------------------------------------------------------------------------------------------
# Driver side

class TrainRefused(ValueError):
    """A request that cannot train, found before any worker starts (message names the input)."""


def check_tracking(uri: str, timeout: float = 5.0) -> None:
    """Fail fast, naming the address, when a tracking server does not answer (MLflow's client retries for minutes)."""
    import urllib.error
    import urllib.request

    if not uri.startswith(("http://", "https://")):
        return
    from matting_core.redaction import redact

    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout) as reply:
            if reply.status != 200:
                raise TrainRefused(f"tracking server {redact(uri)} answered /health with {reply.status}")
    except (urllib.error.URLError, OSError) as exc:
        raise TrainRefused(redact(f"tracking server {uri} is unreachable ({exc}); start it or unset "
                                  f"MLFLOW_TRACKING_URI to use the local store")) from exc


def absolute_tracking_uri(uri: str) -> str:
    """`uri` with a relative sqlite path made absolute (Ray Train workers change directory)."""
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri.startswith(prefix + "/"):
        return prefix + os.path.abspath(uri[len(prefix):])
    return uri


def check_sizes(index, crop: tuple[int, int]) -> None:
    """Every clip must be at least the training crop (W,H); mixed sizes are fine when they all are."""
    small = sorted(s for s in index.sizes() if s[0] < crop[0] or s[1] < crop[1])
    if small:
        listed = ", ".join(f"{w}x{h}" for w, h in small[:5])
        raise TrainRefused(f"{index.uri}: clips of {listed} are smaller than the training crop "
                           f"{crop[0]}x{crop[1]}; set recipe.augment.size no larger than the smallest clip")


def storage_target(uri: str):
    """(storage_path, pyarrow filesystem or None) for Ray Train's RunConfig: local paths absolute, s3:// through pyarrow.

    The S3 filesystem takes the same request limits as every other storage call
    (`MATTING_STORAGE_CONNECT_TIMEOUT`, `_READ_TIMEOUT`, `_RETRIES`: `storage.storage_limits`).
    """
    if uri.startswith("s3://"):
        from pyarrow import fs as pafs

        from matting_core.storage import storage_limits

        limits = storage_limits()
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        kwargs: dict[str, Any] = {
            "connect_timeout": limits["connect_timeout"], "request_timeout": limits["read_timeout"],
            "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=limits["retries"] + 1)}
        if endpoint:
            scheme, _, host = endpoint.partition("://")
            kwargs.update(endpoint_override=host, scheme=scheme)
        region = os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION")
        if region:
            kwargs["region"] = region
        return uri[len("s3://"):].rstrip("/"), pafs.S3FileSystem(**kwargs)
    return os.path.abspath(uri), None


def resolve_recipe(preset: str, overrides: dict[str, Any] | None, steps: int | None,
                   backbone_weights: str | None):
    """The preset's RecipeConfig with the job's overrides (a nested mapping), `--steps` and `--backbone-weights`."""
    from matting_core.training.config import PRESETS, RecipeConfig
    from pipelines.config import from_dict, to_dict

    if preset not in PRESETS:
        raise TrainRefused(f"unknown preset {preset!r}; choose one of {', '.join(sorted(PRESETS))}")
    values = to_dict(PRESETS[preset])
    _deep_update(values, overrides or {})
    if steps is not None:
        values["steps"] = int(steps)
    if backbone_weights is not None:
        values["backbone_weights"] = backbone_weights
    return from_dict(RecipeConfig, values)


def _deep_update(dst: dict, src: dict) -> None:
    for key, value in src.items():
        if isinstance(value, dict) and isinstance(dst.get(key), dict):
            _deep_update(dst[key], value)
        else:
            dst[key] = value


def _absolute(uri: str) -> str:
    """A local path made absolute (Ray workers run in a directory of their own); other URIs as they are."""
    return uri if "://" in uri else os.path.abspath(uri)


def run_train(cfg, out=None) -> TrainSummary:
    """Train as `cfg` (a TrainConfig) says on the Ray cluster (a local one by default); returns the summary.

    The summary is printed to `out` (default: standard error).
    """
    out = out or sys.stderr
    from matting_core import storage
    from matting_core.data.clip_index import ClipIndex
    from matting_core.training.engine import split_by_photo
    from matting_core.redaction import redact_config
    from pipelines.config import to_dict
    from pipelines.model_ref import tracking_uri

    recipe = resolve_recipe(cfg.preset, cfg.recipe, cfg.steps, cfg.backbone_weights)
    index = ClipIndex(cfg.data)
    check_sizes(index, tuple(recipe.augment.size))
    if cfg.val_data:
        val_index = ClipIndex(cfg.val_data)
        check_sizes(val_index, tuple(recipe.augment.size))
        train_ids, val_ids = index.ids, val_index.ids
    else:
        try:
            train_ids, val_ids = split_by_photo([(i, index.photo_key(i)) for i in index.ids], recipe.val_share,
                                                recipe.seed)
        except ValueError as exc:
            raise TrainRefused(f"{cfg.data}: {exc}") from exc
    val_ids = val_ids[:recipe.val_clips]
    uri = absolute_tracking_uri(cfg.tracking_uri or tracking_uri())
    check_tracking(uri)

    resolved = redact_config({"recipe": to_dict(recipe), "data": cfg.data, "val_data": cfg.val_data,
                              "preset": cfg.preset})
    run_name = cfg.run_name or f"{cfg.experiment}-{config_hash(resolved)}"
    storage_root = _absolute(cfg.storage)
    run_dir = storage.join(storage_root, run_name)
    if cfg.overwrite and storage.exists(run_dir):
        storage.remove(run_dir, recursive=True)
    summary_uri = storage.join(run_dir, SUMMARY_FILE)
    if storage.exists(summary_uri):
        summary = TrainSummary(**json.loads(storage.read_bytes(summary_uri)))
        print(f"{run_name}: finished earlier (pass --overwrite to train again)", file=out)
        print_summary(summary, out)
        return summary

    job = TrainJob(data=_absolute(cfg.data), val_data=cfg.val_data and _absolute(cfg.val_data),
                   workers=cfg.workers,
                   cpus_per_worker=cfg.cpus_per_worker, gpus_per_worker=cfg.gpus_per_worker,
                   storage=storage_root, run_name=run_name, experiment=cfg.experiment,
                   register_as=cfg.register_as, tracking_uri=uri, max_failures=cfg.max_failures)
    run_id, resumed = _mlflow_run(job, run_dir, resolved, cfg.data)
    start = time.perf_counter()
    result = _fit(job, recipe, run_id, resolved, train_ids, val_ids)
    summary = _summarise(job, run_id, result, recipe, time.perf_counter() - start, resumed)
    storage.write_bytes_atomic(summary_uri, json.dumps(dataclasses.asdict(summary), indent=1).encode())
    print_summary(summary, out)
    return summary


def _mlflow_run(job: TrainJob, run_dir: str, resolved: dict, data: str) -> tuple[str, bool]:
    """The MLflow run of this run name: the one recorded in `run_dir` (resumed), else a new one with params and input."""
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.entities import DatasetInput, InputTag, Param
    from mlflow.tracking import MlflowClient

    from matting_core import storage
    from matting_core.redaction import redact

    client = MlflowClient(job.tracking_uri, registry_uri=job.tracking_uri)
    record = storage.join(run_dir, RUN_FILE)
    if storage.exists(record):
        run_id = json.loads(storage.read_bytes(record))["run_id"]
        try:
            client.get_run(run_id)
            client.update_run(run_id, status="RUNNING")
            return run_id, True
        except Exception:  # the store was reset: start a new run under the same name
            pass
    experiment = client.get_experiment_by_name(job.experiment)
    if experiment is None:
        location = None
        if job.tracking_uri.startswith("sqlite:"):  # else ./mlruns of whichever process logs first
            location = "file://" + os.path.abspath(os.path.join(os.path.dirname(job.tracking_uri[len("sqlite:///"):]),
                                                                 "mlartifacts"))
        experiment_id = client.create_experiment(job.experiment, artifact_location=location)
    else:
        experiment_id = experiment.experiment_id
    run = client.create_run(experiment_id, run_name=job.run_name)
    params = flatten(resolved)
    items = [Param(k[:250], v[:6000]) for k, v in params.items()]
    for i in range(0, len(items), 100):
        client.log_batch(run.info.run_id, params=items[i:i + 100])
    manifest = storage.join(data, "manifest.json")
    digest = hashlib.sha256(storage.read_bytes(manifest)).hexdigest()[:16] if storage.exists(manifest) else None
    with warnings.catch_warnings():
        # MLflow registers LocalArtifactDatasetSource twice and warns that a local path matches
        # both; the one it then picks is the one meant
        warnings.filterwarnings("ignore", message="The specified dataset source can be interpreted in multiple ways")
        source = resolve_dataset_source(redact(data))
    dataset = MetaDataset(source=source, name="clips", digest=digest)
    client.log_inputs(run.info.run_id, datasets=[DatasetInput(dataset._to_mlflow_entity(),
                                                              tags=[InputTag("mlflow.data.context", "training")])])
    if storage.exists(manifest):
        with tempfile.TemporaryDirectory() as tmp:
            local = os.path.join(tmp, "manifest.json")
            with open(local, "wb") as f:
                f.write(storage.read_bytes(manifest))
            client.log_artifact(run.info.run_id, local, "dataset")
    storage.write_bytes_atomic(record, json.dumps({"run_id": run.info.run_id}).encode())
    return run.info.run_id, False


def _fit(job: TrainJob, recipe, run_id: str, resolved: dict, train_ids: list[int], val_ids: list[int]):
    """Run the TorchTrainer; a worker that dies costs one restart from the latest checkpoint."""
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from pipelines.ray_runtime import ensure_ray

    ensure_ray()
    use_gpu = job.gpus_per_worker > 0
    _check_resources(ray.cluster_resources(), job, use_gpu)
    resources = {"CPU": job.cpus_per_worker, **({"GPU": job.gpus_per_worker} if use_gpu else {})}
    path, filesystem = storage_target(job.storage)
    trainer = TorchTrainer(
        _train_worker,
        train_loop_config={"job": job, "recipe": recipe, "run_id": run_id, "resolved": resolved,
                           "train_ids": train_ids, "val_ids": val_ids},
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=job.workers, use_gpu=use_gpu, resources_per_worker=resources),
        run_config=RunConfig(
            name=job.run_name, storage_path=path, storage_filesystem=filesystem,
            # Finite controller retries: a worker group the cluster can never place fails with
            # Ray's message instead of waiting forever (STACK.md).
            failure_config=FailureConfig(max_failures=job.max_failures, controller_failure_limit=1),
            checkpoint_config=CheckpointConfig(num_to_keep=2)))
    return trainer.fit()


def _check_resources(available: dict[str, float], job: TrainJob, use_gpu: bool) -> None:
    """On a fixed cluster, a request larger than the whole cluster is refused before any worker starts."""
    if os.environ.get("RAY_ADDRESS"):
        return  # an autoscaling cluster may grow to fit
    need_cpu = job.workers * job.cpus_per_worker
    if need_cpu > available.get("CPU", 0) + 1e-9:
        raise TrainRefused(f"{job.workers} worker(s) x {job.cpus_per_worker} CPU need {need_cpu:g} CPUs; this "
                           f"Ray runtime has {available.get('CPU', 0):g} (lower --workers or --cpus-per-worker)")
    if use_gpu and job.workers * job.gpus_per_worker > available.get("GPU", 0) + 1e-9:
        raise TrainRefused(f"{job.workers} worker(s) x {job.gpus_per_worker} GPU need more GPUs than the "
                           f"{available.get('GPU', 0):g} this Ray runtime has")


def _summarise(job: TrainJob, run_id: str, result, recipe, seconds: float, resumed: bool) -> TrainSummary:
    from mlflow.tracking import MlflowClient

    if result.error is not None:
        raise RuntimeError(f"training failed: {result.error}") from result.error
    metrics = {k: float(v) for k, v in (result.metrics or {}).items() if isinstance(v, (int, float))}
    client = MlflowClient(job.tracking_uri, registry_uri=job.tracking_uri)
    run = client.get_run(run_id)
    client.set_terminated(run_id, "FINISHED")
    version = run.data.tags.get("registered_version")
    best = {k[len("val/"):]: min(m.value for m in client.get_metric_history(run_id, k))
            for k in ("val/mad", "val/dtssd", "val/loss") if k in run.data.metrics}
    ckpt_dir = result.checkpoint.path if result.checkpoint is not None else ""
    return TrainSummary(run_name=job.run_name, run_id=run_id, steps=int(metrics.get("step", recipe.steps)),
                        checkpoint_dir=ckpt_dir, metrics={k: v for k, v in metrics.items() if k.startswith("val/")},
                        best=best, registered=f"models:/{job.register_as}/{version}" if version else None,
                        skipped_clips=int(metrics.get("train/skipped_clips", 0)), seconds=round(seconds, 1),
                        resumed=resumed)


def print_summary(summary: TrainSummary, out=None) -> None:
    """The one-screen end-of-run summary (to `out`, default standard error)."""
    out = out or sys.stderr
    print(f"run          {summary.run_name} (MLflow run {summary.run_id}){' resumed' if summary.resumed else ''}",
          file=out)
    print(f"steps        {summary.steps} in {summary.seconds:.0f} s; {summary.skipped_clips} clip(s) skipped", file=out)
    if summary.metrics:
        print("validation   " + "  ".join(f"{k[4:]} {v:.4g}" for k, v in sorted(summary.metrics.items())), file=out)
    if summary.best:
        print("best         " + "  ".join(f"{k} {v:.4g}" for k, v in sorted(summary.best.items())), file=out)
    print(f"registered   {summary.registered or '-'} (alias candidate)", file=out)
    print(f"checkpoints  {summary.checkpoint_dir}", file=out)


# ---------------------------------------------------------------------------------------------
# The command line

EPILOG = """\
examples:
  matting train --data clips/ --steps 300                                   # local Ray, ./runs, ./mlflow.db
  matting train --data s3://bucket/clips --val-data s3://bucket/val --preset gpu \\
      --workers 8 --gpus-per-worker 1 --storage s3://bucket/runs --register-as matting
  matting train --config jobs/train.yaml --steps 50 --run-name try
  matting promote matting 3 --alias champion

Rerunning the same command resumes the run from its latest checkpoint (same MLflow run); a
finished run prints its summary; --overwrite starts it again.

exit status: 0 trained (or already finished), 2 usage error or a refused input, 1 training failed.
"""


def add_parser(subparsers):
    """Register `matting train`."""
    from pipelines.config import add_command

    return add_command(subparsers, "train", TrainConfig, run, help="train the matting network (Ray Train DDP, MLflow)",
                       description="Data-parallel training of the matting network on fake-motion clips, "
                                   "tracked in MLflow; the final model is registered with alias candidate.",
                       epilog=EPILOG)


def run(args) -> int:
    """`matting train`; returns the exit status."""
    from matting_core.errors import InputError
    from pipelines.cli import EXIT_FAILED, EXIT_OK, UsageError
    from pipelines.config import ConfigError, from_args, require

    cfg = from_args(TrainConfig, args)
    require(cfg, {"--data": "data"})
    try:
        run_train(cfg)
    except (TrainRefused, ConfigError) as exc:
        raise UsageError(str(exc)) from exc
    except InputError as exc:
        print(f"matting train: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except RuntimeError as exc:
        print(f"matting train: {exc}", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK
