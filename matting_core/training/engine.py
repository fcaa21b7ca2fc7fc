"""The training recipe: model, optimizer and schedule, one step, evaluation, and a Ray-free loop.

In the shape of torchvision's `references/`: `train_one_epoch`, `evaluate` and `main(cfg, data)`
are plain functions a notebook imports; `pipelines/train.py` runs the same functions on Ray Train
(each worker builds the model, calls `calibrate_batch_norm`, wraps it in DDP and calls
`train_step`; `train_step` calls `model(...)`, so a DistributedDataParallel wrapper works).

Batch norm under DDP (`RecipeConfig.bn`): **frozen statistics** by default. Before the first step
`calibrate_batch_norm` estimates every batch norm's statistics on a few training batches (a
random encoder has none worth keeping; ImageNet ones are re-estimated for RGB + prior input), then
training runs with the batch norms in eval mode while their affine parameters and everything else
learn. So the result does not depend on the per-worker batch size or the number of workers,
DDP needs no statistics synchronisation, inference uses exactly the normalisation training
used, and `optimize_for_inference` folds it unchanged. `bn="sync"` keeps batch norms in training
mode instead (`prepare_batch_norm` converts them to SyncBatchNorm when torch.distributed runs).
"""
from __future__ import annotations

import contextlib
import itertools
import math
import os
import time
from collections import defaultdict
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import torch
from torch import nn

from matting_core import storage
from matting_core.data.clips import ClipRecord, iter_clips
from matting_core.evaluation.metrics import SequenceMetrics
from matting_core.model import MattingNet, matting_net, read_checkpoint, save_checkpoint
from matting_core.model.net import output_curve
from matting_core.prior import PriorStream, prior_stream_from_spec, resolve_prior_spec
from matting_core.runtime import resolve_device
from matting_core.training.batches import RECORD_COLUMNS, Batch, iter_batches, shuffled
from matting_core.training.config import RecipeConfig, recipe_to_dict
from matting_core.training.losses import matting_losses

__all__ = ["unwrap", "build_model", "build_optimizer", "lr_factor", "set_train_mode", "prepare_batch_norm",
           "calibrate_batch_norm", "predict", "train_step", "evaluate", "fit_output", "set_fitted_output",
           "train_one_epoch", "split_by_photo", "build_prior_stream", "checkpoint_extra", "save_training_checkpoint",
           "restore_training_checkpoint", "latest_checkpoint", "main", "VAL_METRICS"]

VAL_METRICS = ("mad", "mse", "grad", "dtssd")
_ORDER_STREAM = 0x0D3E  # separates the clip-order stream from sample and split streams
_SPLIT_STREAM = 0x5B17
_BN = nn.modules.batchnorm._BatchNorm


def unwrap(model: nn.Module) -> MattingNet:
    """The MattingNet inside a DistributedDataParallel (or similar `.module`) wrapper."""
    return getattr(model, "module", model)


# ---------------------------------------------------------------- model, optimizer, schedule
def build_model(cfg: RecipeConfig) -> MattingNet:
    """A fresh MattingNet for `cfg`, its resolved prior recorded in `net.config["prior"]`.

    The net records the training frames' longer side (`work_side`, unless `cfg.model` sets it),
    the scale inference runs it at. Initialisation is seeded by `cfg.seed` without touching the global torch RNG. The first
    `cfg.optim.freeze_stages` encoder stages get `requires_grad=False`. With `cfg.head_init` > 0
    the last layer's weights (zero in MattingNet, which makes an untrained net return the prior
    exactly) are drawn with that standard deviation: the net still starts within about
    `head_init` of the prior, but every layer gets a gradient from the first step.
    """
    if "prior" in cfg.model:
        raise ValueError("RecipeConfig.model must not hold 'prior'; set RecipeConfig.prior")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(cfg.seed))
        options = {"work_side": max(cfg.augment.size), **cfg.model}
        net = matting_net(cfg.backbone_weights, prior=resolve_prior_spec(cfg.prior), **options)
        if cfg.head_init:
            with torch.no_grad():
                net.output_conv.weight.normal_(0.0, float(cfg.head_init))
    for stage in list(net.stages)[: cfg.optim.freeze_stages]:
        stage.requires_grad_(False)
    return net


def lr_factor(step: int, cfg: RecipeConfig) -> float:
    """Learning-rate multiplier at optimizer step `step` (0-based): linear warm-up, then cosine to min_lr_ratio."""
    o = cfg.optim
    if o.warmup_steps and step < o.warmup_steps:
        return (step + 1) / o.warmup_steps
    span = max(1, cfg.steps - o.warmup_steps - 1)
    progress = min(1.0, (step - o.warmup_steps) / span)
    return o.min_lr_ratio + (1.0 - o.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_optimizer(model: nn.Module, cfg: RecipeConfig
                    ) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """AdamW (encoder at `lr * encoder_lr_scale`, last layer at `lr * head_lr_scale`, the prior
    calibration at `lr * calibration_lr_scale`; no decay on biases, norms and the calibration table)
    and its LambdaLR schedule; groups are named (`encoder`, `decoder`, `head`, `calibration`, `*_no_decay`).

    Call `scheduler.step()` once per optimizer step (`train_step` does); the lr of step k is
    `lr * lr_factor(k, cfg)`.
    """
    net = unwrap(model)
    o = cfg.optim
    encoder = {id(p) for p in net.stages.parameters()}
    head = {id(p) for p in net.output_conv.parameters()}
    calibration = {id(p) for p in net.calibration.parameters()} if net.calibration is not None else set()
    groups: dict[str, list] = defaultdict(list)
    for name, p in net.named_parameters():
        if not p.requires_grad:
            continue
        part = ("encoder" if id(p) in encoder else "head" if id(p) in head
                else "calibration" if id(p) in calibration else "decoder")
        groups[part + ("" if p.ndim > 1 else "_no_decay")].append(p)
    scale = {"encoder": o.encoder_lr_scale, "decoder": 1.0, "head": o.head_lr_scale,
             "calibration": o.calibration_lr_scale}
    param_groups = []
    for name in ("encoder", "encoder_no_decay", "decoder", "decoder_no_decay", "head", "head_no_decay",
                 "calibration_no_decay"):
        if groups[name]:
            lr = o.lr * scale[name.split("_")[0]]
            param_groups.append({"params": groups[name], "lr": lr, "name": name,
                                 "weight_decay": 0.0 if name.endswith("no_decay") else o.weight_decay})
    optimizer = torch.optim.AdamW(param_groups, lr=o.lr, betas=tuple(o.betas), weight_decay=o.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, cfg))
    return optimizer, scheduler


# ---------------------------------------------------------------- batch norm
def set_train_mode(model: nn.Module, cfg: RecipeConfig) -> None:
    """Training mode; with `bn="frozen"` the batch norms stay in eval mode (fixed statistics)."""
    model.train()
    if cfg.bn == "frozen":
        for m in model.modules():
            if isinstance(m, _BN):
                m.eval()


def prepare_batch_norm(model: nn.Module, cfg: RecipeConfig) -> nn.Module:
    """With `bn="sync"` under an initialised torch.distributed, on GPUs: batch norms as SyncBatchNorm (before DDP).

    SyncBatchNorm runs only on GPU modules; on CPUs each worker keeps plain batch norms over its
    own batch (statistics per worker, as with one process). The state dict keeps its keys, so
    `save_checkpoint` and `load_checkpoint` work unchanged; fold (`optimize_for_inference`) a
    model loaded from a checkpoint, whose batch norms are plain again.
    """
    on_gpu = any(p.is_cuda for p in model.parameters())
    if cfg.bn == "sync" and on_gpu and torch.distributed.is_available() and torch.distributed.is_initialized():
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return model


@contextlib.contextmanager
def _eval_mode(model: nn.Module):
    """`model` in eval mode inside the block; every module's own mode restored after it."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, mode in modes:
            m.training = mode


def _amp(cfg: RecipeConfig, device: torch.device):
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16,
                          enabled=bool(cfg.amp) and device.type == "cuda")


@torch.no_grad()
def calibrate_batch_norm(model: nn.Module, batches: Iterable[Batch], cfg: RecipeConfig, device) -> int:
    """Estimate every batch norm's statistics on `batches` (cumulative average); returns the batches used.

    Only with `bn="frozen"` (otherwise a no-op returning 0). The model's modes are restored.
    """
    if cfg.bn != "frozen":
        return 0
    device = torch.device(device)
    bns = [m for m in model.modules() if isinstance(m, _BN)]
    modes = [(m, m.training) for m in model.modules()]
    momenta = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
    model.eval()
    for m in bns:
        m.train()
    used = 0
    try:
        for batch in batches:
            batch = batch.to(device)
            with _amp(cfg, device):
                model(batch.src, batch.prior)
            used += 1
    finally:
        for m, momentum in zip(bns, momenta):
            m.momentum = momentum
        for m, mode in modes:
            m.training = mode
    return used


# ---------------------------------------------------------------- one step
def predict(model: nn.Module, src: torch.Tensor, prior: torch.Tensor, state=None
            ) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """The network's alpha and foreground **before the clamp** (what the losses take), and the state."""
    return model(src, prior, state, 1.0, False)


def train_step(model: nn.Module, batch: Batch, optimizer: torch.optim.Optimizer,
               scheduler: torch.optim.lr_scheduler.LRScheduler, cfg: RecipeConfig, device) -> dict[str, float]:
    """One optimizer step on `batch`; returns the loss terms (clip means), `total`, `lr` and `grad_norm`.

    Truncated back-propagation through time: the clip runs in chunks of `cfg.tbptt` frames, the
    ConvLSTM state carried from chunk to chunk but detached, each chunk's loss back-propagated
    at once (memory of one chunk) and weighted by its share of frames, so the gradients add up to
    the clip's. The temporal terms of a chunk's first frame pair it with the previous chunk's last
    prediction, detached. Under DDP, gradients are all-reduced once, on the last chunk.
    Then gradient clipping (`optim.grad_clip`), the AdamW step and the schedule's step.
    """
    device = torch.device(device)
    set_train_mode(model, cfg)
    batch = batch.to(device, non_blocking=True)
    optimizer.zero_grad(set_to_none=True)
    T = batch.frames
    starts = list(range(0, T, max(1, int(cfg.tbptt))))
    state = None
    prev = None  # (pha, fgr) of the previous chunk's last frame, detached
    sums: dict[str, torch.Tensor] = {}
    for k, t0 in enumerate(starts):
        t1 = min(T, t0 + int(cfg.tbptt))
        last = k == len(starts) - 1
        sync = contextlib.nullcontext() if last or not hasattr(model, "no_sync") else model.no_sync()
        with sync:
            with _amp(cfg, device):
                pha, fgr, state = predict(model, batch.src[:, t0:t1], batch.prior[:, t0:t1], state)
            pha, fgr = pha.float(), fgr.float()
            if prev is None:
                terms = matting_losses(pha, fgr, batch.slice(t0, t1), cfg.loss)
            else:
                terms = matting_losses(torch.cat([prev[0], pha], 1), torch.cat([prev[1], fgr], 1),
                                       batch.slice(t0 - 1, t1), cfg.loss, context_frames=1)
            share = (t1 - t0) / T
            (terms["total"] * share).backward()
        for name, value in terms.items():
            sums[name] = sums.get(name, 0.0) + value.detach() * share
        state = [s.detach() for s in state]
        prev = (pha[:, -1:].detach(), fgr[:, -1:].detach())
    params = [p for g in optimizer.param_groups for p in g["params"]]
    if cfg.optim.grad_clip and cfg.optim.grad_clip > 0:
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.optim.grad_clip)
    else:
        grad_norm = torch.norm(torch.stack([p.grad.norm() for p in params if p.grad is not None]))
    lr = max(g["lr"] for g in optimizer.param_groups)
    optimizer.step()
    scheduler.step()
    out = {name: float(v) for name, v in sums.items()}
    out["lr"] = float(lr)
    out["grad_norm"] = float(grad_norm)
    return out


# ---------------------------------------------------------------- evaluation
@torch.no_grad()
def evaluate(model: nn.Module, batches: Iterable[Batch], cfg: RecipeConfig, device) -> dict[str, float]:
    """`{"loss", "mad", "mse", "grad", "dtssd", "clips"}` over `batches` (whole clips, the state from zero).

    The loss is the recipe's total on the unclamped outputs (mean over clips); the metrics are
    `matting_core.evaluation.metrics` on the clamped alpha (the model's output), per clip as
    `SequenceMetrics` averages them (dtssd counts frame 0 as 0), then averaged over clips.
    The model runs in eval mode; every module's mode is restored afterwards.
    """
    device = torch.device(device)
    loss_sum, clips = 0.0, 0
    metric_sums = dict.fromkeys(VAL_METRICS, 0.0)
    with _eval_mode(model):
        for batch in batches:
            batch = batch.to(device)
            B = batch.src.shape[0]
            with _amp(cfg, device):
                pha, fgr, _ = predict(model, batch.src, batch.prior)
            pha, fgr = pha.float(), fgr.float()
            for b in range(B):  # per clip, so the mean does not depend on how clips were batched
                loss_sum += float(matting_losses(pha[b:b + 1], fgr[b:b + 1], batch.clip(b), cfg.loss)["total"])
            pred = pha.clamp(0.0, 1.0).cpu().numpy()
            true = batch.pha.float().cpu().numpy()
            for b in range(B):
                seq = SequenceMetrics(metrics=VAL_METRICS)
                for t in range(pred.shape[1]):
                    seq.update(pred[b, t, 0], true[b, t, 0])
                for name, value in seq.summary().items():
                    metric_sums[name] += value
            clips += B
    if clips == 0:
        return {"loss": float("nan"), **{k: float("nan") for k in VAL_METRICS}, "clips": 0}
    return {"loss": loss_sum / clips, **{k: v / clips for k, v in metric_sums.items()}, "clips": clips}


CURVE_GAINS = (1.0, 1.25, 1.5, 1.75, 2.0, 2.5, 3.0, 4.0, 5.0)
# One centre: a curve symmetric about 0.5. Centres of 0.3-0.7 were fitted too; the one best on
# the validation clips moved from 0.3 to 0.7 with which people and scenes they held, while 0.5
# was the best on the held-out benchmark for every model tried (README, The demo).
CURVE_CENTRES = (0.5,)
REFINE_RADII = (1, 2, 3, 4, 6)


def fit_output(model: nn.Module, batches: Iterable[Batch], cfg: RecipeConfig, device,
               radii: Iterable[int] = REFINE_RADII, gains: Iterable[float] = CURVE_GAINS,
               centres: Iterable[float] = CURVE_CENTRES) -> dict[str, float]:
    """The refiner radius and output curve (gain, centre) of lowest MAD on `batches` among those
    that keep dtSSD no higher than the prior's (or the model's own settings', if higher), run as
    inference runs the model.

    `batches` hold whole clips at their own size (`iter_batches(..., native_size=True)`): the
    network sees them downsampled to the side it was trained at (`work_side`, as `Matter` does)
    and the guided refiner brings its alpha back to their size, so the fit sees the softness that
    upsampling adds. Frames no larger than the work side take no refiner: the radius is then the
    model's own. A steep curve lowers MAD on a soft alpha but makes an edge's small frame-to-frame
    changes jump: the bound lets the fit spend the model's temporal margin over the smoothed prior
    (the baseline the product must beat), never more. Returns `{"refine_radius", "gain",
    "centre", "mad", "mad_fit", "dtssd", "dtssd_fit", "prior_dtssd"}` (MAD x 1e3 and dtSSD as
    `metrics.dtssd` defines them, with the model's radius and no curve, with the fitted ones, and
    of the batches' prior); the model's own settings are always a candidate, so the fit never
    raises the MAD on these clips. The model is run as it is (any curve it already has is not
    applied) and is not changed.
    """
    from matting_core.inference.matter import auto_downsample_ratio

    device = torch.device(device)
    net = unwrap(model)
    own = int(net.refiner.filter.radius)
    candidates = sorted({own, *(int(r) for r in radii)})
    preds: dict[int, list[torch.Tensor]] = {r: [] for r in candidates}
    trues: list[torch.Tensor] = []
    priors: list[torch.Tensor] = []
    with _eval_mode(model), torch.no_grad():
        try:
            for batch in batches:
                batch = batch.to(device)
                H, W = batch.src.shape[-2:]
                ratio = auto_downsample_ratio(H, W, net.config.get("work_side") or max(H, W))
                # the same pixels of every frame (dtSSD compares frames), about a million per batch
                stride = 1 + math.isqrt(batch.pha.numel() // 1_000_000)
                trues.append(batch.pha.float()[..., 0, ::stride, ::stride].cpu())  # [B,T,h,w]
                priors.append(batch.prior.float()[..., 0, ::stride, ::stride].cpu())
                for radius in candidates if ratio < 1.0 else [own]:
                    net.refiner.filter.radius = radius
                    with _amp(cfg, device):
                        pha, _, _ = model(batch.src, batch.prior, None, ratio, False)
                    pha = pha.float().clamp(0.0, 1.0)[..., 0, ::stride, ::stride].cpu()
                    for r in [radius] if ratio < 1.0 else candidates:  # no refiner: one alpha for every radius
                        preds[r].append(pha)
        finally:
            net.refiner.filter.radius = own
    if not trues:
        raise ValueError("fit_output: no batches")
    curves = sorted({(1.0, 0.5), *((float(g), float(c)) for g in gains for c in centres)})  # the identity once
    scores = {(radius, g, c): _mad_dtssd(preds[radius], trues, lambda p, g=g, c=c: output_curve(p, g, c))
              for radius in candidates for g, c in curves}
    untouched = (own, 1.0, 0.5)
    prior_dtssd = _mad_dtssd(priors, trues, lambda p: p)[1]
    bound = max(prior_dtssd, scores[untouched][1]) + 1e-9
    admissible = [k for k, (_, dt) in scores.items() if dt <= bound]
    # a tie keeps the model as it is: its own radius first, then no curve
    best = min(admissible, key=lambda k: (scores[k][0], k[0] != own, k[1:] != untouched[1:]))
    radius, gain, centre = best
    return {"refine_radius": radius, "gain": gain, "centre": centre,
            "mad": scores[untouched][0] * 1e3, "mad_fit": scores[best][0] * 1e3,
            "dtssd": scores[untouched][1], "dtssd_fit": scores[best][1], "prior_dtssd": prior_dtssd}


def _mad_dtssd(preds: list[torch.Tensor], trues: list[torch.Tensor],
               curve: Callable[[torch.Tensor], torch.Tensor]) -> tuple[float, float]:
    """(MAD, dtSSD) of `curve(pred)` against the truth over clips `[B,T,h,w]`: MAD over all pixels,
    dtSSD per clip as `SequenceMetrics` averages it (frame 0 counts as 0), then over clips."""
    abs_sum, count, dt_sum, clips = 0.0, 0, 0.0, 0
    for pred, true in zip(preds, trues):
        pred = curve(pred)
        abs_sum += float((pred - true).abs().sum(dtype=torch.float64))
        count += pred.numel()
        if pred.shape[1] > 1:
            change = (pred[:, 1:] - pred[:, :-1]) - (true[:, 1:] - true[:, :-1])  # [B,T-1,h,w]
            per_frame = change.double().square().mean(dim=(2, 3)).sqrt() * 1e2
            dt_sum += float((per_frame.sum(dim=1) / pred.shape[1]).sum())
        clips += pred.shape[0]
    return abs_sum / count, dt_sum / clips


def set_fitted_output(model: nn.Module, batches: Iterable[Batch], cfg: RecipeConfig, device) -> dict[str, float]:
    """Fit the refiner radius and output curve on `batches` (`fit_output`) and set them on the (unwrapped) model;
    returns the `val/` metrics `refine_radius`, `curve_gain`, `curve_centre`, `full_mad`, `fitted_mad`,
    `full_dtssd`, `fitted_dtssd` and `prior_dtssd` (the bound's)."""
    fit = fit_output(model, batches, cfg, device)
    unwrap(model).set_refine_radius(fit["refine_radius"])
    unwrap(model).set_output_curve(fit["gain"], fit["centre"])
    return {"refine_radius": fit["refine_radius"], "curve_gain": fit["gain"], "curve_centre": fit["centre"],
            "full_mad": fit["mad"], "fitted_mad": fit["mad_fit"], "full_dtssd": fit["dtssd"],
            "fitted_dtssd": fit["dtssd_fit"], "prior_dtssd": fit["prior_dtssd"]}


def train_one_epoch(model: nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: torch.optim.lr_scheduler.LRScheduler, batches: Iterable[Batch], cfg: RecipeConfig,
                    device, step: int, on_step: Callable[[int, dict], Any] | None = None) -> int:
    """`train_step` over `batches` until they end or `cfg.steps` is reached; returns the new step.

    `on_step(step, metrics)` runs after each step with the step count reached (1-based); the
    metrics add `data_s` (seconds waiting for the batch: decoding, augmentation, the prior) and
    `step_s` (seconds of `train_step`).
    """
    it = iter(batches)
    while step < cfg.steps:
        t0 = time.perf_counter()
        batch = next(it, None)  # pulled only when a step will use it (the prior runs in data loading)
        if batch is None:
            break
        t1 = time.perf_counter()
        metrics = train_step(model, batch, optimizer, scheduler, cfg, device)
        metrics.update(data_s=t1 - t0, step_s=time.perf_counter() - t1)
        step += 1
        if on_step is not None:
            on_step(step, metrics)
    return step


# ---------------------------------------------------------------- data
def split_by_photo(records_or_photos: Iterable, val_share: float, seed: int) -> tuple[list[int], list[int]]:
    """(train ids, validation ids) with every photo on one side only.

    Items are `ClipRecord`s (anything with `.clip_id` and `.photo`), `(clip_id, photo)` pairs, or
    photo strings (ids are then their positions). `round(val_share * photos)` photos (at least 1,
    and at least one left for training) go to validation, drawn with `seed`.
    """
    pairs: list[tuple[int, str]] = []
    for i, item in enumerate(records_or_photos):
        if isinstance(item, str):
            pairs.append((i, item))
        elif hasattr(item, "clip_id"):
            pairs.append((int(item.clip_id), str(item.photo)))
        else:
            clip_id, photo = item
            pairs.append((int(clip_id), str(photo)))
    if val_share <= 0:
        return sorted(i for i, _ in pairs), []
    photos = sorted({p for _, p in pairs})
    if len(photos) < 2:
        raise ValueError(f"a validation split by photo needs at least 2 photos, the data has {len(photos)}; "
                         f"give separate validation data (val_data) or val_share=0")
    n_val = min(len(photos) - 1, max(1, round(val_share * len(photos))))
    order = np.random.default_rng([int(seed), _SPLIT_STREAM]).permutation(len(photos))
    held = {photos[i] for i in order[:n_val]}
    return sorted(i for i, p in pairs if p not in held), sorted(i for i, p in pairs if p in held)


def build_prior_stream(cfg: RecipeConfig, device: Any = "cpu") -> PriorStream:
    """The prior stream the recipe trains with (the spec `build_model` records), for data loading.

    When training on CPUs the selfie model runs on one thread: it runs in the loader thread beside
    the training step, whose threads own the cores.
    """
    spec = resolve_prior_spec(cfg.prior)
    prior_device = device if spec["prior"]["backend"] == "deeplabv3" else "cpu"
    threads = 1 if torch.device(device).type == "cpu" else None
    return prior_stream_from_spec(spec, device=prior_device, num_threads=threads)


def _records(uri: str, ids: set[int] | None) -> Iterator[ClipRecord]:
    for record in iter_clips(uri, columns=RECORD_COLUMNS):
        if ids is None or record.clip_id in ids:
            yield record


# ---------------------------------------------------------------- checkpoints
def checkpoint_extra(optimizer, scheduler, cfg: RecipeConfig, step: int, **more: Any) -> dict:
    """What a training checkpoint holds besides the model: optimizer, scheduler, scaler, step, recipe, `more`."""
    return {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "scaler": None,  # bf16 autocast needs no loss scaling
            "step": int(step), "recipe": recipe_to_dict(cfg), **more}


def save_training_checkpoint(model: nn.Module, path: str, optimizer, scheduler, cfg: RecipeConfig, step: int,
                             **more: Any) -> str:
    """`save_checkpoint` of the (unwrapped) model with `checkpoint_extra`; returns `path`."""
    save_checkpoint(unwrap(model), path, extra=checkpoint_extra(optimizer, scheduler, cfg, step, **more))
    return path


def restore_training_checkpoint(path: str, model: nn.Module, optimizer, scheduler, cfg: RecipeConfig) -> dict:
    """Load weights, optimizer and scheduler from `path` into the given objects; returns the checkpoint's extra.

    Refuses a checkpoint of another recipe (its schedule and data order would not continue this one's).
    """
    ckpt = read_checkpoint(path)
    extra = ckpt["extra"]
    if extra.get("recipe") != recipe_to_dict(cfg):
        raise ValueError(f"{path} was written by another recipe config; resume with that config "
                         f"or train into another folder")
    unwrap(model).load_state_dict(ckpt["state_dict"])
    # fitted at the end of a run (absent from checkpoints written before they were)
    unwrap(model).set_refine_radius(ckpt["config"].get("refine_radius", unwrap(model).refiner.filter.radius))
    unwrap(model).set_output_curve(*ckpt["config"].get("output_curve", (1.0, 0.5)))
    optimizer.load_state_dict(extra["optimizer"])
    scheduler.load_state_dict(extra["scheduler"])
    return extra


def latest_checkpoint(out_dir: str) -> str | None:
    """The checkpoint of the highest step in `out_dir` (`checkpoint-STEP.pt`), or None."""
    if not storage.exists(out_dir):
        return None
    found = [u for u in storage.list_files(out_dir, recursive=False)
             if os.path.basename(u).startswith("checkpoint-") and u.endswith(".pt")]
    return max(found, key=lambda u: int(os.path.basename(u)[len("checkpoint-"):-3]), default=None)


# ---------------------------------------------------------------- the loop
def _train_names(metrics: dict) -> dict:
    """DESIGN.md's metric names: `train/loss` for the total, `train/<term>` for the rest."""
    return {("train/loss" if k == "total" else f"train/{k}"): v for k, v in metrics.items()}


def main(cfg: RecipeConfig, data: str, val_data: str | None = None, out_dir: str | None = None,
         device: Any = "auto", log: Callable[[str], Any] | None = print) -> dict:
    """Train `cfg` on the clip dataset `data` in this process; returns the final metrics.

    Validation: `val_data`, or the clips of `cfg.val_share` of the photos of `data` (held out by
    photo, so no person is in both), at most `cfg.val_clips` clips, every `cfg.val_every` steps
    and at the end. Checkpoints (`checkpoint-STEP.pt` in `out_dir`, any fsspec URI): every
    `cfg.checkpoint_every` steps and at the end; a rerun into the same `out_dir` resumes from the
    latest one with the same schedule and the same data order. Returns `{"step", "train/loss",
    "train/<term>", "val/<metric>", "checkpoint", "history"}` (history: one dict per logged or
    validated step, step 0 being the untrained net, i.e. the prior).
    """
    device = resolve_device(device)
    say = log or (lambda _msg: None)

    # Data: which clips train and which validate, from the small columns only (no frames decoded).
    index = [(r.clip_id, r.photo) for r in iter_clips(data, columns=[])]
    if not index:
        raise ValueError(f"{data}: no clips (expected a dataset written by `matting generate`)")
    if val_data is None:
        train_ids, val_ids = split_by_photo(index, cfg.val_share, cfg.seed)
        val_uri = data
    else:
        train_ids, val_uri = [i for i, _ in index], val_data
        val_ids = [r.clip_id for r in iter_clips(val_data, columns=[])]
    val_ids = val_ids[: cfg.val_clips]
    if len(train_ids) < cfg.batch_size:
        raise ValueError(f"{data}: {len(train_ids)} training clips, fewer than one batch of {cfg.batch_size}")
    train_set, val_set = set(train_ids), set(val_ids)
    prior_stream = build_prior_stream(cfg, device)
    say(f"data: {len(train_ids)} training clips, {len(val_ids)} validation clips; prior {prior_stream.spec['prior']}")

    def epoch_batches(epoch: int, first_step: int, skip_batches: int = 0) -> Iterator[Batch]:
        # A fresh shuffle per epoch; batch k of the epoch is step first_step + k (its samples are
        # seeded by that step), so a resumed epoch skips the batches it had already trained on.
        rng = np.random.default_rng([cfg.seed, epoch, _ORDER_STREAM])
        records = shuffled(_records(data, train_set), cfg.shuffle_buffer, rng)
        for _ in range(skip_batches * cfg.batch_size):
            next(records, None)
        return iter_batches(records, cfg, prior_stream, first_step=first_step)

    def val_batches(native_size: bool = False) -> Iterator[Batch]:
        return iter_batches(_records(val_uri, val_set), cfg, prior_stream, augment=False, drop_last=False,
                            native_size=native_size)

    # Model, optimizer and schedule; resume from the latest checkpoint when there is one.
    model = build_model(cfg).to(device)
    optimizer, scheduler = build_optimizer(model, cfg)
    step, epoch, epoch_start = 0, 0, 0
    resume = latest_checkpoint(out_dir) if out_dir else None
    if resume:
        extra = restore_training_checkpoint(resume, model, optimizer, scheduler, cfg)
        step = int(extra["step"])
        epoch, epoch_start = int(extra["data_position"]["epoch"]), step - int(extra["data_position"]["batches"])
        say(f"resumed from {resume} at step {step}")
    elif cfg.bn == "frozen" and cfg.bn_calibration_batches:
        # Frozen batch norms need statistics of this data before the first step.
        calibrate_batch_norm(model, itertools.islice(epoch_batches(0, 0), cfg.bn_calibration_batches), cfg, device)

    history: list[dict] = []
    last_val: dict[str, float] = {}
    last_train: dict[str, float] = {}
    checkpoint_path: str | None = None
    t_start, step_start = time.perf_counter(), step

    def save(at_step: int) -> str:
        path = storage.join(out_dir, f"checkpoint-{at_step:06d}.pt")
        return save_training_checkpoint(model, path, optimizer, scheduler, cfg, at_step,
                                        data_position={"epoch": epoch, "batches": at_step - epoch_start},
                                        metrics={f"val/{k}": v for k, v in last_val.items()})

    def on_step(at_step: int, metrics: dict) -> None:
        nonlocal last_val, last_train, checkpoint_path
        last_train = metrics
        record: dict[str, Any] = {}
        # Log: the loss terms and the lr, with throughput and the time left.
        if cfg.log_every and (at_step % cfg.log_every == 0 or at_step == cfg.steps):
            elapsed = time.perf_counter() - t_start
            fps = (at_step - step_start) * cfg.batch_size * cfg.frames / max(elapsed, 1e-9)
            eta = (cfg.steps - at_step) * elapsed / max(at_step - step_start, 1)
            record.update(_train_names(metrics))
            say(f"step {at_step}/{cfg.steps} loss {metrics['total']:.4f} lr {metrics['lr']:.2e} "
                f"{fps:.1f} frames/s (data {metrics['data_s']:.2f} s, step {metrics['step_s']:.2f} s) "
                f"eta {eta / 60:.1f} min")
        # Validate: held-out people, watched from the first run on.
        if val_set and ((cfg.val_every and at_step % cfg.val_every == 0) or at_step == cfg.steps):
            last_val = evaluate(model, val_batches(), cfg, device)
            record.update({f"val/{k}": v for k, v in last_val.items()})
            say(f"step {at_step} val " + " ".join(f"{k} {v:.4g}" for k, v in last_val.items()))
        # Checkpoint: a rerun resumes here.
        if out_dir and ((cfg.checkpoint_every and at_step % cfg.checkpoint_every == 0) or at_step == cfg.steps):
            checkpoint_path = save(at_step)
        if record:
            history.append({"step": at_step, **record})

    # Validate once before the first step: the untrained net returns the prior, the baseline to beat.
    if val_set and cfg.val_every and step == 0:
        last_val = evaluate(model, val_batches(), cfg, device)
        history.append({"step": 0, **{f"val/{k}": v for k, v in last_val.items()}})
        say("step 0 val " + " ".join(f"{k} {v:.4g}" for k, v in last_val.items()))

    # Train: epochs over the shuffled training clips until cfg.steps optimizer steps.
    while step < cfg.steps:
        skip = step - epoch_start
        new_step = train_one_epoch(model, optimizer, scheduler, epoch_batches(epoch, step, skip), cfg, device,
                                   step, on_step)
        if new_step == step and skip == 0:
            raise RuntimeError(f"{data}: an epoch gave no batch (fewer than {cfg.batch_size} readable clips?)")
        step = new_step
        if step < cfg.steps:  # the epoch ended (a resumed one may have had nothing left)
            epoch, epoch_start = epoch + 1, step
    if val_set and cfg.fit_output:  # at the clips' own size, as inference runs the model
        fitted = set_fitted_output(model, val_batches(native_size=True), cfg, device)
        last_val.update(fitted)
        say("output fitted: " + " ".join(f"{k} {v:.4g}" for k, v in fitted.items()))
        if out_dir:
            checkpoint_path = save(step)
    if out_dir and checkpoint_path is None:
        checkpoint_path = latest_checkpoint(out_dir)
    return {"step": step, **_train_names(last_train),
            **{f"val/{k}": v for k, v in last_val.items()}, "checkpoint": checkpoint_path, "history": history}
