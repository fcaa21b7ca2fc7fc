"""The training recipe's configuration: frozen dataclasses and named presets (no config library).

`pipelines` wraps `RecipeConfig` in the job's config and validates it; here it is plain data that
`recipe_to_dict` turns into JSON-safe dicts (saved with every checkpoint) and `recipe_from_dict`
reads back.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from matting_core.config_checks import check_range

_PRIOR_OFF_STREAM = 0x9F1  # keeps `prior_off_share`'s draws apart from every other seeded stream

__all__ = ["AugmentConfig", "LossWeights", "OptimConfig", "RecipeConfig", "PRESETS", "BN_MODES",
           "recipe_to_dict", "recipe_from_dict"]

BN_MODES = ("frozen", "sync")


@dataclass(frozen=True)
class AugmentConfig:
    """Per-clip augmentation of training samples (validation samples get none of it).

    Args:
        size: (W, H) of the training frames; each clip is cropped to this aspect and resized.
        scale: range of the crop's side as a fraction of the largest crop of that aspect that fits
            the clip (1.0 = the whole clip, less = a zoomed-in window); drawn once per clip.
        flip: chance of a horizontal flip (flow x negated).
        reverse: chance of playing the clip backwards (flow inverted; see `batches.make_sample`).
        brightness, contrast, saturation, gains: max relative colour change of the composite and
            the foreground alike (an affine map of RGB, so the compositing equation still holds).
        background: chance of replacing the clip's background by a procedural scene (textures,
            boxes, discs, a slow pan and moving objects) composited behind the clip's own F and
            alpha: the recipe sees more backgrounds than the few videos a dataset was made from.
        still: chance of a pause: the window's first pose (F and alpha) held still over the
            clip's own moving background, with zero flow; fake-motion clips never stop, and the
            temporal terms then teach a steady matte where the person does not move.
    """

    size: tuple[int, int] = (256, 256)
    scale: tuple[float, float] = (0.5, 1.0)
    flip: float = 0.5
    reverse: float = 0.5
    brightness: float = 0.15
    contrast: float = 0.15
    saturation: float = 0.2
    gains: float = 0.08
    background: float = 0.0
    still: float = 0.0

    def __post_init__(self) -> None:
        if len(self.size) != 2 or min(self.size) < 8:
            raise ValueError(f"augment.size must be (W, H) of at least 8 px, got {self.size}")
        lo, hi = self.scale
        if not 0.0 < lo <= hi <= 1.0:
            raise ValueError(f"augment.scale must satisfy 0 < low <= high <= 1, got {self.scale}")
        for name in ("flip", "reverse", "background", "still"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"augment.{name} is a probability in [0, 1], got {getattr(self, name)}")


@dataclass(frozen=True)
class LossWeights:
    """Weights of the loss terms (`losses.matting_losses`); 0 switches a term off.

    Args:
        l1: alpha L1.
        mse: alpha squared error. L1 alone is minimised, by a net that cannot yet tell a person from
            the background, by an empty matte (the median of mostly background pixels): from that
            plateau only a weak signal leads out. The squared error's optimum is the mean, and its
            gradient grows with the error, so a net trained on the frames alone (`prior_off_steps`)
            leaves the plateau, and a matte that misses a whole person costs more than a rough edge.
        laplacian: alpha Laplacian-pyramid L1. grad: alpha Sobel-gradient L1.
        fgr: foreground L1 where the true alpha is > 0.
        temporal_warp: predicted alpha_{t-1} warped by the true foreground flow against predicted
            alpha_t (the change along the flow against the true change along it), where the flow
            is valid and the truth itself is consistent under it.
        temporal_diff: dtSSD-like: (pred_t - pred_{t-1}) against (true_t - true_{t-1}), squared.
        truth_tolerance: |true_t - warp(true_{t-1})| above which the truth counts as inconsistent
            under the flow (interpolation at edges, disocclusion) and temporal_warp ignores the pixel.
    """

    l1: float = 1.0
    mse: float = 0.0
    laplacian: float = 1.0
    grad: float = 1.0
    fgr: float = 0.5
    temporal_warp: float = 1.0
    temporal_diff: float = 5.0
    truth_tolerance: float = 0.1


@dataclass(frozen=True)
class OptimConfig:
    """AdamW with linear warm-up then cosine decay (per optimizer step).

    Args:
        lr: peak learning rate of the decoder, ConvLSTMs and head.
        weight_decay: decoupled weight decay (not applied to biases and norm parameters).
        betas: AdamW betas.
        warmup_steps: linear warm-up from lr/warmup_steps to lr.
        min_lr_ratio: the cosine ends at lr * min_lr_ratio at the last step.
        grad_clip: max global gradient norm (0: no clipping).
        encoder_lr_scale: the encoder's lr relative to `lr`. The net starts as the prior (zero
            last layer); a small step on the encoder keeps it from rewriting features it needs
            on people it has not seen, which a handful of training people invites.
        freeze_stages: how many encoder stages (of 5, shallow first) get no gradient at all.
        head_lr_scale: the lr of the network's last layer (the 1x1 convolution that makes the
            residuals) relative to `lr`. It starts at zero, so nothing before it gets a gradient
            until it has grown: a larger step there ends that plateau sooner without larger steps
            for the rest of the network.
        calibration_lr_scale: the lr of the prior calibration table (`model.calibration`)
            relative to `lr`: a few numbers under a loss that is convex in them, which a large
            step fits within a hundred steps without noise.
    """

    lr: float = 3e-4
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 100
    min_lr_ratio: float = 0.05
    grad_clip: float = 1.0
    encoder_lr_scale: float = 0.1
    freeze_stages: int = 0
    head_lr_scale: float = 1.0
    calibration_lr_scale: float = 10.0

    def __post_init__(self) -> None:
        if self.lr <= 0 or not 0.0 <= self.min_lr_ratio <= 1.0 or self.warmup_steps < 0:
            raise ValueError(f"optim: need lr > 0, 0 <= min_lr_ratio <= 1, warmup_steps >= 0 (got {self})")
        if not 0 <= self.freeze_stages <= 5:
            raise ValueError(f"optim.freeze_stages must be in 0..5, got {self.freeze_stages}")


@dataclass(frozen=True)
class RecipeConfig:
    """Everything that decides what training does, apart from the data and where things go.

    Args:
        model: `matting_net` keyword options (architecture widths, `arch`).
        backbone_weights: `none`, `imagenet` (local torch hub cache) or a PATH.
        prior: the prior-stream spec the model learns with (`resolve_prior_spec` input); None =
            today's default, resolved and recorded in the model's config.
        frames: frames per training sample (a random window of longer clips).
        batch_size: clips per optimizer step (per worker under DDP).
        steps: optimizer steps of the whole run (the schedule's length).
        tbptt: frames per truncated back-propagation chunk (the ConvLSTM state is carried across
            chunks, detached; gradients of all chunks add up to one step).
        prior_off_steps: the first this many steps train with an empty prior (all zeros, and no
            prior computed), then the real one. Given the prior from the start, the net learns to
            grow and trim what the prior finds and returns an empty matte where the prior sees
            nobody; trained on the frames alone first, it learns to find people itself.
        prior_off_share: after `prior_off_steps`, this share of the training samples (drawn per
            sample, apart from its augmentation) still has an empty prior, so the net keeps
            finding people the prior misses and learns what is not a person without the prior.
        head_init: standard deviation of the last layer's initial weights (0, the default: zero,
            so the untrained net is exactly the prior). The output leaves the prior only as fast
            as that layer grows, which on varied clips is slow; but measured on 7 P3M people
            (128x128, 300 steps) 1e-3 with head_lr_scale 10 only added noise the training then
            removed, so the default stays 0.
        seed: seeds the model's initialisation, the clip order and every sample's augmentation.
        amp: bf16 autocast on CUDA (ignored on CPU).
        bn: `frozen` (default): batch-norm statistics are estimated once on training samples
            before the first step (`engine.calibrate_batch_norm`) and then fixed, so training is
            independent of the batch size and of how many workers there are, DDP needs no
            synchronisation of statistics, and `optimize_for_inference` folds exactly what was
            trained; the affine parameters still learn. `sync`: batch norms in training mode
            (on GPUs under DDP the caller converts them to SyncBatchNorm with
            `engine.prepare_batch_norm`; on CPUs each worker normalises over its own batch).
        val_every, checkpoint_every, log_every: in optimizer steps (0: never, except at the end).
        val_share: share of the photos held out for validation when no validation data is given.
        val_clips: at most this many validation clips per evaluation.
        shuffle_buffer: clips held for shuffling while streaming a dataset.
        bn_calibration_batches: training batches used to estimate frozen batch-norm statistics.
        fit_output: after the last step, fit the guided refiner's radius and the output contrast
            curve (`MattingNet.set_refine_radius`, `set_output_curve`) on the validation clips at
            their own size, run as inference runs the model (`engine.fit_output`); the model
            trained and the one registered then differ only by them.
    """

    model: dict = field(default_factory=dict)
    backbone_weights: str = "none"
    prior: dict | None = None
    frames: int = 4
    batch_size: int = 2
    steps: int = 1000
    tbptt: int = 4
    prior_off_steps: int = 0
    prior_off_share: float = 0.0
    head_init: float = 0.0
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    loss: LossWeights = field(default_factory=LossWeights)
    optim: OptimConfig = field(default_factory=OptimConfig)
    seed: int = 0
    amp: bool = True
    bn: str = "frozen"
    val_every: int = 200
    checkpoint_every: int = 500
    log_every: int = 10
    val_share: float = 0.25
    val_clips: int = 64
    shuffle_buffer: int = 16
    bn_calibration_batches: int = 4
    fit_output: bool = True

    def __post_init__(self) -> None:
        if self.bn not in BN_MODES:
            raise ValueError(f"bn: must be one of {', '.join(BN_MODES)}, got {self.bn!r}")
        for name in ("frames", "batch_size", "steps", "tbptt"):
            check_range(name, getattr(self, name), ge=1)
        for name in ("val_every", "checkpoint_every", "log_every", "val_clips", "shuffle_buffer", "seed",
                     "prior_off_steps"):
            check_range(name, getattr(self, name), ge=0)
        check_range("val_share", self.val_share, ge=0.0, lt=1.0)
        check_range("prior_off_share", self.prior_off_share, ge=0.0, le=1.0)

    def prior_is_off(self, step: int, rank: int = 0, index: int = 0) -> bool:
        """Whether sample `index` of step `step` (0-based) on worker `rank` has an empty prior."""
        if step < self.prior_off_steps:
            return True
        if not self.prior_off_share:
            return False
        # its own stream: the sample's augmentation draws stay what they are without the share
        draw = np.random.default_rng([int(self.seed), int(step), int(rank), int(index), _PRIOR_OFF_STREAM])
        return bool(draw.random() < self.prior_off_share)


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def recipe_to_dict(cfg: RecipeConfig) -> dict:
    """JSON-safe nested dict of `cfg` (tuples as lists); `recipe_from_dict` reads it back."""
    return _plain(dataclasses.asdict(cfg))


def _build(cls, data: dict):
    names = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(data) - set(names)
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown key(s) {', '.join(sorted(unknown))}; "
                         f"known: {', '.join(names)}")
    out = {}
    for key, value in data.items():
        if isinstance(names[key].default, tuple) and isinstance(value, list):
            value = tuple(value)  # JSON and YAML give lists
        out[key] = value
    return cls(**out)


def recipe_from_dict(data: dict) -> RecipeConfig:
    """A `RecipeConfig` from `recipe_to_dict`'s output (or any subset of its keys)."""
    data = dict(data)
    nested = {"augment": AugmentConfig, "loss": LossWeights, "optim": OptimConfig}
    for key, cls in nested.items():
        if key in data and isinstance(data[key], dict):
            data[key] = _build(cls, data[key])
    return _build(RecipeConfig, data)


# cpu-small: what these 2-core machines train in about 10 minutes with 2 workers (2 clips x 4
# frames each per step at 256x144: whole 512x288 frames at half size, the view inference has;
# zoomed crops showed the net a person bigger, and a prior better, than whole frames show). The
# net starts as the prior. What protects it on unseen people with only a few training people: a
# 10x smaller encoder lr with its first two stages frozen, colour jitter, procedural backgrounds
# for a fifth of the clips, pauses for 30% of them, the temporal terms, and a short schedule
# (validation on held-out people stopped improving after about 500 steps of 4 clips and got
# worse by 1000). The prior calibration and the last layer learn at 10x the lr. The frame-difference
# term weighs 2, not 5: at 5 it kept the calibration of the prior soft (a steep map passes the
# prior's flicker on), which cost MAD on unseen people for a dtSSD already well below the prior's.
# gpu: what a user with GPUs starts from: 512x288 clips of 12 frames, bf16, 4 clips per GPU.
PRESETS: dict[str, RecipeConfig] = {
    "cpu-small": RecipeConfig(
        frames=4, batch_size=2, steps=600, tbptt=4,
        augment=AugmentConfig(size=(256, 144), scale=(0.8, 1.0), background=0.2, still=0.3),
        loss=LossWeights(temporal_diff=2.0),
        optim=OptimConfig(lr=3e-4, warmup_steps=100, encoder_lr_scale=0.1, freeze_stages=2, head_lr_scale=10.0),
        val_every=150, checkpoint_every=150, log_every=10, val_clips=32),
    "gpu": RecipeConfig(
        backbone_weights="imagenet", frames=12, batch_size=4, steps=20000, tbptt=6,
        augment=AugmentConfig(size=(512, 288), scale=(0.8, 1.0), background=0.3, still=0.3),
        optim=OptimConfig(lr=5e-4, warmup_steps=500, encoder_lr_scale=0.2, freeze_stages=1),
        amp=True, val_every=1000, checkpoint_every=2000, log_every=50, val_clips=64, shuffle_buffer=32),
}
