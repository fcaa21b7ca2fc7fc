"""Fake-motion clip synthesis: a photo with alpha made to move like a person in a video.

The method of Molodetskikh et al. (2022): random optical-flow fields at three scales (a coarse
similarity motion, a mid-scale and a fine-scale deformation) move and deform the photo and its
alpha over time; with probability 1/3 the person also shifts halfway out of the frame and back;
the result is composited over consecutive frames of a real background video.

How motion is built, and why the ground truth is exact:
the generator draws the *backward* flow of every frame, `f_t(x)` (frame t's point x was at
`x + f_t(x)` in frame t-1, DESIGN.md), as an analytic field defined everywhere, including
outside the frame. Frame t's pixel x shows the photo point reached by tracing x back to frame 0
through `f_t, f_{t-1}, ..., f_1` and then through the placement. Each frame is therefore sampled
once from the original photo (no blur from re-warping warped frames), and the stored flow is
the very field that produced the motion, so `warp(alpha_{t-1}, flow_t) == alpha_t` wherever the
point was visible in frame t-1, up to interpolation. Tracing runs on a grid 8x coarser than the
frame (the fields are smooth at that scale) that reaches past the frame's edges, and the
coordinates are upsampled bilinearly, so the outer pixels are as exact as the others.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import cv2
import numpy as np

from matting_core.config_checks import check_range, check_size

from matting_core.data.clips import Clip
from matting_core.data.sources import Photo

__all__ = ["GENERATOR_VERSION", "MotionConfig", "AugmentConfig", "FakeMotionConfig", "synthesize_clip", "clip_rng",
           "colour_matrix"]

# Smallest clip side: the motion grids and the person's bounding box need room to exist.
MIN_CLIP_SIDE = 32

# Bump whenever synthesis makes something else from the same inputs, config and seed: it enters
# the dataset fingerprint, so `generate` never resumes a dataset with shards of another version.
# 1: datasets that record no version; 2: motion grids reach the frame edges.
GENERATOR_VERSION = 2


@dataclass(frozen=True)
class MotionConfig:
    """Magnitudes of the random motion, in fractions of the frame height per frame.

    Args:
        translate: std of the global translation velocity.
        rotate_deg: std of the rotation velocity (degrees per frame).
        scale: std of the relative scale change per frame.
        mid_amplitude / fine_amplitude: std of the mid and fine deformation fields.
        mid_grid / fine_grid: control points per frame height for those fields.
        keyframes: how many random draws of each velocity the clip interpolates between
            (more = less smooth in time).
        shift_probability: chance that the person shifts halfway out of frame and back.
        person_height: range of the subject's height as a fraction of the frame height.
    """

    translate: float = 0.008
    rotate_deg: float = 0.6
    scale: float = 0.008
    mid_amplitude: float = 0.006
    fine_amplitude: float = 0.003
    mid_grid: int = 3
    fine_grid: int = 9
    keyframes: int = 3
    shift_probability: float = 1.0 / 3.0
    person_height: tuple[float, float] = (0.55, 0.95)


@dataclass(frozen=True)
class AugmentConfig:
    """Photometric augmentation of F and B (and blur of alpha), constant over a clip.

    Args:
        brightness / contrast / saturation: max relative change.
        gains: max per-channel gain change (white balance).
        noise_probability / noise_sigma: chance of per-frame Gaussian noise and its max std (0-255).
        blur_probability / blur_sigma: chance of a Gaussian blur and its sigma range (pixels).
    """

    brightness: float = 0.12
    contrast: float = 0.12
    saturation: float = 0.15
    gains: float = 0.06
    noise_probability: float = 0.3
    noise_sigma: float = 3.0
    blur_probability: float = 0.2
    blur_sigma: tuple[float, float] = (0.5, 1.2)


@dataclass(frozen=True)
class FakeMotionConfig:
    """Everything that decides a clip's content besides the photo, background and seed."""

    frames: int = 8
    size: tuple[int, int] = (512, 288)  # (W, H)
    background_zoom: float = 1.15
    motion: MotionConfig = field(default_factory=MotionConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)

    def __post_init__(self) -> None:
        check_range("frames", self.frames, ge=2)  # one frame has no motion, and no flow to learn from
        check_size("size", self.size, MIN_CLIP_SIDE)
        check_range("background_zoom", self.background_zoom, ge=1.0)


def clip_rng(seed: int, index: int) -> np.random.Generator:
    """The generator for clip `index` of a job seeded with `seed` (independent of scheduling)."""
    return np.random.default_rng([int(seed), int(index)])


def _smooth_series(rng: np.random.Generator, frames: int, keys: int, shape: tuple, std: float) -> np.ndarray:
    """Velocities `[frames, *shape]` varying smoothly in time between `keys` random draws."""
    keys = max(2, keys)
    draws = rng.normal(0.0, std, size=(keys, *shape)).astype(np.float32)
    pos = np.linspace(0, keys - 1, frames)
    lo = np.floor(pos).astype(int).clip(0, keys - 2)
    w = (pos - lo).reshape(-1, *([1] * len(shape)))
    w = w * w * (3 - 2 * w)  # smoothstep keeps velocity continuous at the keys
    return (1 - w) * draws[lo] + w * draws[lo + 1]


class _MotionField:
    """Analytic backward flow `f_t(x)` for t = 1..T-1 at arbitrary points (pixels of frame t)."""

    def __init__(self, cfg: MotionConfig, frames: int, size: tuple[int, int], center: tuple[float, float],
                 shift: np.ndarray, rng: np.random.Generator):
        w, h = size
        self.w, self.h, self.center = w, h, np.array(center, np.float32)
        self.vel = _smooth_series(rng, frames, cfg.keyframes, (2,), cfg.translate * h)
        self.rot = np.deg2rad(_smooth_series(rng, frames, cfg.keyframes, (), cfg.rotate_deg))
        self.scl = _smooth_series(rng, frames, cfg.keyframes, (), cfg.scale)
        aspect = w / h
        self.grids = []
        for n, amp in ((cfg.mid_grid, cfg.mid_amplitude), (cfg.fine_grid, cfg.fine_amplitude)):
            gh, gw = n + 1, max(2, round(n * aspect)) + 1
            self.grids.append(_smooth_series(rng, frames, cfg.keyframes, (gh, gw, 2), amp * h))
        self.shift = shift  # [T, 2] displacement of the person at each frame

    def __call__(self, t: int, pts: np.ndarray) -> np.ndarray:
        """f_t at `pts` float32 [..., 2] (x, y) -> float32 [..., 2]."""
        d = pts - self.center
        # The forward velocity moves the subject; the backward flow undoes it.
        cos, sin, s = np.cos(self.rot[t]), np.sin(self.rot[t]), self.scl[t]
        fwd = np.empty_like(pts)
        fwd[..., 0] = (cos - 1 + s) * d[..., 0] - sin * d[..., 1]
        fwd[..., 1] = sin * d[..., 0] + (cos - 1 + s) * d[..., 1]
        fwd += self.vel[t] + (self.shift[t] - self.shift[t - 1])
        flow = -fwd
        flat = np.ascontiguousarray(pts.reshape(-1, 1, 2))
        for grid in self.grids:
            g = grid[t]
            gh, gw = g.shape[:2]
            # corner control points on the outer pixel centres, as for the tracing grid
            mx = (flat[..., 0] * ((gw - 1) / (self.w - 1))).astype(np.float32)
            my = (flat[..., 1] * ((gh - 1) / (self.h - 1))).astype(np.float32)
            flow += cv2.remap(g, mx, my, cv2.INTER_CUBIC, borderMode=cv2.BORDER_REPLICATE).reshape(pts.shape)
        return flow


def _shift_path(rng: np.random.Generator, frames: int, size: tuple[int, int], bbox: tuple[float, float, float, float]) -> np.ndarray:
    """Displacement [T, 2] taking the bbox centre to the frame edge at mid-clip and back."""
    w, h = size
    x0, y0, x1, y1 = bbox
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    direction = rng.choice(4, p=[0.35, 0.35, 0.15, 0.15])
    target = [np.array([-cx, 0]), np.array([w - cx, 0]), np.array([0, -cy]), np.array([0, h - cy])][direction]
    phase = np.sin(np.pi * np.arange(frames) / max(1, frames - 1))
    return (phase[:, None] * target[None, :]).astype(np.float32)


class _ControlGrid:
    """Points every `factor` pixels covering the frame and one step beyond each edge, and the
    bilinear upsampling of values on them to every pixel of the frame.

    A resize by an integer factor puts coarse sample i at full-resolution x = factor*(i+0.5) - 0.5
    and clamps beyond the outermost samples. A grid inside the frame only would leave its outer
    ~factor/2 pixels copies of the outermost values, with the wrong motion and flow; with the
    ring of points outside, every pixel is interpolated between real samples.
    """

    def __init__(self, size: tuple[int, int], factor: int):
        w, h = size
        self.size, self.factor = size, factor
        lw, lh = -(-w // factor) + 2, -(-h // factor) + 2
        xs = (np.arange(lw, dtype=np.float32) - 0.5) * factor - 0.5
        ys = (np.arange(lh, dtype=np.float32) - 0.5) * factor - 0.5
        gx, gy = np.meshgrid(xs, ys)
        self.points = np.stack([gx, gy], axis=-1)  # [lh, lw, 2] full-resolution (x, y)

    def upsample(self, values: np.ndarray) -> np.ndarray:
        """float32 [lh, lw, 2] at the points -> float32 [H, W, 2] at every pixel of the frame."""
        (w, h), f = self.size, self.factor
        lh, lw = values.shape[:2]
        padded = cv2.resize(values, (lw * f, lh * f), interpolation=cv2.INTER_LINEAR)
        return padded[f:f + h, f:f + w]


def colour_matrix(rng: np.random.Generator, cfg) -> np.ndarray:
    """A random colour jitter (`cfg`: brightness, contrast, saturation, gains) as one affine map of RGB in
    0-255, float32 [3, 4] (for cv2.transform).

    Saturation (blend with grey), contrast (about mid-grey), brightness and per-channel gains are
    all linear, so they fold into one matrix and cost one pass over the image.
    """
    b = 1 + rng.uniform(-cfg.brightness, cfg.brightness)
    c = 1 + rng.uniform(-cfg.contrast, cfg.contrast)
    s = 1 + rng.uniform(-cfg.saturation, cfg.saturation)
    g = 1 + rng.uniform(-cfg.gains, cfg.gains, size=3)
    luma = np.array([0.299, 0.587, 0.114])
    sat = s * np.eye(3) + (1 - s) * np.tile(luma, (3, 1))
    lin = np.diag(b * g) @ (c * sat)
    offset = np.diag(b * g) @ np.full(3, 128.0 * (1 - c))
    return np.hstack([lin, offset[:, None]]).astype(np.float32)


class _NoiseBank:
    """Per-frame Gaussian noise cut at random offsets from one field drawn per clip.

    Drawing a fresh full-frame field for every frame costs more than the rest of the synthesis;
    random crops with random sign give frames whose noise is independent to the eye.
    """

    PAD = 64

    def __init__(self, rng: np.random.Generator, shape: tuple[int, int, int]):
        h, w, c = shape
        self.rng, self.shape = rng, shape
        self.field = rng.standard_normal((h + self.PAD, w + self.PAD, c), dtype=np.float32)

    def add(self, img: np.ndarray, sigma: float) -> np.ndarray:
        """img uint8 [H,W,3] plus a noise crop of std `sigma`, saturated to uint8."""
        h, w, _ = self.shape
        y, x = self.rng.integers(0, self.PAD + 1, size=2)
        sign = 1.0 if self.rng.random() < 0.5 else -1.0
        return cv2.scaleAdd(self.field[y:y + h, x:x + w], sign * sigma, img.astype(np.float32)).clip(0, 255).astype(np.uint8)


def synthesize_clip(photo: Photo, background: np.ndarray, cfg: FakeMotionConfig,
                    rng: np.random.Generator) -> Clip:
    """Make one fake-motion clip from a prepared photo and `T` background frames.

    Args:
        photo: subject crop with alpha and estimated foreground (`sources.load_photo`).
        background: uint8 [T,H',W',3] frames covering the clip size (H' >= H, W' >= W).
        cfg: clip size, length, motion and augmentation.
        rng: the clip's own generator (`clip_rng(seed, index)`).
    """
    T = cfg.frames
    W, H = cfg.size
    mc = cfg.motion
    if background.shape[0] != T:
        raise ValueError(f"need {T} background frames, got {background.shape[0]}")

    # Placement: scale the subject to a realistic height, put it on the frame.
    ph, pw = photo.alpha.shape
    scale = rng.uniform(*mc.person_height) * H / ph
    scale = min(scale, 0.95 * W / pw)
    sw, sh = max(2, round(pw * scale)), max(2, round(ph * scale))
    interp = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
    fgr_src = cv2.resize(photo.fgr, (sw, sh), interpolation=interp)
    pha_src = cv2.resize(photo.alpha, (sw, sh), interpolation=interp)
    ox = rng.uniform(-0.15 * sw, W - 0.85 * sw)
    if photo.touches_bottom:
        oy = H - sh + rng.uniform(0.0, 0.1) * sh
    else:
        oy = rng.uniform(min(0.0, H - sh), max(0.0, H - sh))
    bbox = (ox, oy, ox + sw, oy + sh)

    shifted = bool(rng.random() < mc.shift_probability)
    shift = _shift_path(rng, T, (W, H), bbox) if shifted else np.zeros((T, 2), np.float32)
    field = _MotionField(mc, T, (W, H), ((bbox[0] + bbox[2]) / 2, (bbox[1] + bbox[3]) / 2), shift, rng)

    # Trace every frame back to frame 0 on a coarse grid, then upsample the coordinates.
    grid = _ControlGrid((W, H), 8)
    canon, flows = [], [np.zeros((H, W, 2), np.float32)]
    for t in range(T):
        p = grid.points.copy()
        for k in range(t, 0, -1):
            f = field(k, p)
            if k == t:
                flows.append(grid.upsample(f))
            p += f
        canon.append(grid.upsample(p))

    # Photometric augmentation parameters, fixed for the clip.
    ac = cfg.augment
    col_f, col_b = colour_matrix(rng, ac), colour_matrix(rng, ac)
    noise_f = ac.noise_sigma * rng.random() if rng.random() < ac.noise_probability else 0.0
    noise_b = ac.noise_sigma * rng.random() if rng.random() < ac.noise_probability else 0.0
    noise = _NoiseBank(rng, (H, W, 3)) if (noise_f or noise_b) else None
    blur = rng.uniform(*ac.blur_sigma) if rng.random() < ac.blur_probability else 0.0
    bh, bw = background.shape[1:3]
    bx, by = int(rng.integers(0, bw - W + 1)), int(rng.integers(0, bh - H + 1))

    frames = np.empty((T, H, W, 3), np.uint8)
    fgr = np.empty_like(frames)
    bgr = np.empty_like(frames)
    alpha = np.empty((T, H, W), np.uint8)
    flow = np.stack(flows)
    for t in range(T):
        map_xy = canon[t] - np.array([ox, oy], np.float32)
        f_t = cv2.remap(fgr_src, map_xy, None, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
        a_t = cv2.remap(pha_src, map_xy, None, cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0)
        f_t = cv2.transform(f_t, col_f)
        b_t = cv2.transform(np.ascontiguousarray(background[t, by:by + H, bx:bx + W]), col_b)
        if blur:
            f_t = cv2.GaussianBlur(f_t, (0, 0), blur)
            b_t = cv2.GaussianBlur(b_t, (0, 0), blur)
            a_t = cv2.GaussianBlur(a_t, (0, 0), blur)
        if noise_f:
            f_t = noise.add(f_t, noise_f)
        if noise_b:
            b_t = noise.add(b_t, noise_b)
        # Quantised F, B and alpha are what is stored; compositing from them makes
        # I = aF + (1-a)B hold exactly before encoding.
        fgr[t], bgr[t] = f_t, b_t
        alpha[t] = cv2.convertScaleAbs(a_t, alpha=255.0)
        a = alpha[t].astype(np.float32) * np.float32(1.0 / 255.0)
        frames[t] = cv2.blendLinear(f_t, b_t, a, 1.0 - a)
        flow[t] *= (alpha[t] > 0)[..., None]
    flow[0] = 0.0
    info = {"scale": float(scale), "offset": [float(ox), float(oy)], "blur": float(blur)}
    return Clip(frames, fgr, bgr, alpha, flow, shifted, info)
