"""Composited evaluation clips with exact alpha (the VideoMatte240K protocol), for `make-benchmark`.

A photo with alpha moves over a background video along an eased (smoothstep) affine trajectory
between two random poses (translation, scale, small rotation), and holds still for a share of the
clip (`still_share`, split at random between a pause before and a pause after the move: people
stop moving, and that is where flicker shows); the background moves on its own, a slow linear
pan and zoom of a crop window over the playing video. This is deliberately not the
fake-motion generator, so a model trained on fake-motion data is measured on motion it never saw.

Layout: `DIR/<clip>/{com,pha,fgr,bgr}/0000.png` (com, fgr, bgr RGB; pha 8-bit grey) and
`DIR/benchmark.json` (config, clips with their sources and per-frame affine matrices, rejections).
The compositing equation `com = pha*fgr + (1-pha)*bgr` holds on the stored 8-bit values up to
the rounding of com (at most 0.5/255), because com is computed from the quantised pha, fgr, bgr.
Everything is drawn from `np.random.default_rng([seed, clip index])`.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import uuid
from dataclasses import asdict, dataclass, field
from typing import Callable

import cv2
import numpy as np

from matting_core.config_checks import check_range, check_size
from matting_core.redaction import redact_config

from matting_core import storage
from matting_core.data.sources import (DEFAULT_MAX_PIXELS, DEFAULT_MIN_SUBJECT, BackgroundReader, Photo, PhotoInfo,
                                  Rejection, SourceError,
                                  discover_backgrounds, discover_photos, load_photo,
                                  validate_all, validate_background, validate_photo)

__all__ = ["BenchmarkConfig", "Pose", "ClipPlan", "ClipFrames", "smoothstep", "pose_matrix",
           "foreground_track", "still_steps", "background_track", "composite_clip", "plan_clips", "make_clip",
           "write_clip", "make_benchmark", "BenchmarkSummary", "SCHEMA_VERSION"]

SCHEMA_VERSION = 1


@dataclass(frozen=True)
class BenchmarkConfig:
    """What a benchmark is made from: clip count, frames per clip, frame size (w, h), seed, motion ranges."""

    clips: int = 8
    frames: int = 30
    size: tuple[int, int] = (512, 288)
    seed: int = 0
    subject_height: tuple[float, float] = (0.55, 0.9)   # subject height / frame height at the first pose
    travel: float = 0.2                                 # max horizontal travel / frame width
    scale_change: tuple[float, float] = (0.85, 1.15)    # final scale / first scale
    max_rotation_deg: float = 4.0
    bg_zoom: float = 1.25                               # background read this much larger than the frame
    bg_pan: float = 0.08                                # max pan of the crop window / frame size
    still_share: float = 0.3                            # share of frame steps the subject holds still (0: none)

    def __post_init__(self) -> None:
        check_range("clips", self.clips, ge=1)
        check_range("frames", self.frames, ge=2)
        check_size("size", self.size, 32)
        check_range("seed", self.seed, ge=0)
        check_range("still_share", self.still_share, ge=0.0, lt=1.0)


@dataclass(frozen=True)
class Pose:
    """Subject placement: uniform scale, rotation (degrees) and the position of the photo's centre (pixels)."""

    scale: float
    angle: float
    cx: float
    cy: float


@dataclass(frozen=True)
class ClipPlan:
    """Clip `index`: which photo, which background, where in it the clip starts."""

    index: int
    name: str
    photo: PhotoInfo
    background: object  # VideoInfo
    start: int


@dataclass
class ClipFrames:
    """A composited clip: com/fgr/bgr uint8 `[T,H,W,3]`, pha uint8 `[T,H,W]`, affine matrices `[T,2,3]`."""

    com: np.ndarray
    pha: np.ndarray
    fgr: np.ndarray
    bgr: np.ndarray
    fg_affine: np.ndarray
    bg_affine: np.ndarray


def smoothstep(u: np.ndarray | float) -> np.ndarray | float:
    """3u^2 - 2u^3: eases in and out, 0 -> 0, 1 -> 1, zero slope at both ends."""
    u = np.clip(u, 0.0, 1.0)
    return u * u * (3.0 - 2.0 * u)


def pose_matrix(pose: Pose, photo_hw: tuple[int, int]) -> np.ndarray:
    """2x3 matrix mapping photo pixel coordinates to frame coordinates for `pose`."""
    h, w = photo_hw
    a = math.radians(pose.angle)
    rs = pose.scale * np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
    centre = np.array([(w - 1) / 2.0, (h - 1) / 2.0])
    t = np.array([pose.cx, pose.cy]) - rs @ centre
    return np.hstack([rs, t[:, None]])


def _random_pose_pair(rng: np.random.Generator, photo: Photo, cfg: BenchmarkConfig) -> tuple[Pose, Pose]:
    W, H = cfg.size
    ph, pw = photo.alpha.shape
    s0 = rng.uniform(*cfg.subject_height) * H / ph
    s0 = min(s0, 0.95 * W / pw)  # a wide subject still fits the frame's width
    s1 = s0 * rng.uniform(*cfg.scale_change)
    a0, a1 = rng.uniform(-cfg.max_rotation_deg, cfg.max_rotation_deg, size=2)
    cx0 = rng.uniform(0.35, 0.65) * W
    cx1 = float(np.clip(cx0 + rng.uniform(-cfg.travel, cfg.travel) * W, 0.25 * W, 0.75 * W))

    def cy(scale: float, angle: float) -> float:
        if photo.touches_bottom:
            # A portrait stands on the lower edge: keep its cut edge (and rotated corners) below it.
            lift = 0.5 * pw * scale * abs(math.sin(math.radians(angle)))
            return H - 0.5 * ph * scale + lift + 0.02 * H
        return rng.uniform(0.42, 0.58) * H

    return Pose(s0, float(a0), cx0, cy(s0, a0)), Pose(s1, float(a1), cx1, cy(s1, a1))


def still_steps(frames: int, share: float) -> int:
    """Frame steps (of frames - 1) during which the subject holds still; at least one step still moves."""
    return max(0, min(round(share * (frames - 1)), frames - 2))


def foreground_track(p0: Pose, p1: Pose, frames: int, photo_hw: tuple[int, int],
                     hold: tuple[int, int] = (0, 0)) -> np.ndarray:
    """Per-frame photo->frame matrices `[T,2,3]`: pose parameters interpolated with smoothstep easing.

    `hold` = (steps held at p0 before the move, steps held at p1 after it); the move takes the rest.
    """
    before, after = hold
    moving = max(frames - 1 - before - after, 1)
    out = []
    for t in range(frames):
        e = float(smoothstep((t - before) / moving))
        lerp = lambda a, b: a + (b - a) * e
        pose = Pose(lerp(p0.scale, p1.scale), lerp(p0.angle, p1.angle), lerp(p0.cx, p1.cx), lerp(p0.cy, p1.cy))
        out.append(pose_matrix(pose, photo_hw))
    return np.stack(out)


def background_track(rng: np.random.Generator, frames: int, bg_hw: tuple[int, int], cfg: BenchmarkConfig) -> np.ndarray:
    """Per-frame background->frame matrices `[T,2,3]`: a crop window panning and zooming at constant speed."""
    W, H = cfg.size
    bh, bw = bg_hw
    k_max = min(bw / W, bh / H)  # window scale at which the window is the whole (enlarged) background
    k0, k1 = rng.uniform(1.0, k_max, size=2)
    pan = cfg.bg_pan * np.array([W, H]) * rng.uniform(-1, 1, size=2)
    # The window must stay inside the background at both ends (hence throughout) without clipping,
    # which would stop the camera mid-clip: the pan is capped by the smaller end's spare room.
    room_at = lambda k: np.array([bw, bh]) - np.array([W, H]) * k
    pan = np.clip(pan, -np.minimum(room_at(k0), room_at(k1)), np.minimum(room_at(k0), room_at(k1)))
    out = []
    for t in range(frames):
        u = t / max(frames - 1, 1)
        k = k0 + (k1 - k0) * u
        win = np.array([W * k, H * k])
        room = np.array([bw, bh]) - win
        centre = np.array([bw, bh]) / 2.0 + pan * (u - 0.5)
        top_left = np.clip(centre - win / 2.0, 0.0, room)  # only float rounding left to clip
        # frame = (bg - top_left) / k
        out.append(np.array([[1 / k, 0, -top_left[0] / k], [0, 1 / k, -top_left[1] / k]]))
    return np.stack(out)


def composite_clip(photo: Photo, backgrounds: np.ndarray, fg_affine: np.ndarray, bg_affine: np.ndarray,
                   size: tuple[int, int]) -> ClipFrames:
    """Warp the photo and the background frames `[T,Hb,Wb,3]` and composite from the quantised values."""
    W, H = size
    T = len(fg_affine)
    com = np.empty((T, H, W, 3), np.uint8)
    pha = np.empty((T, H, W), np.uint8)
    fgr = np.empty((T, H, W, 3), np.uint8)
    bgr = np.empty((T, H, W, 3), np.uint8)
    for t in range(T):
        a = cv2.warpAffine(photo.alpha, fg_affine[t], (W, H), flags=cv2.INTER_LINEAR,
                           borderMode=cv2.BORDER_CONSTANT, borderValue=0)
        pha[t] = np.clip(np.rint(a * 255.0), 0, 255).astype(np.uint8)
        # Replicate: the foreground colour at a soft photo edge must not blend towards black.
        fgr[t] = cv2.warpAffine(photo.fgr, fg_affine[t], (W, H), flags=cv2.INTER_LINEAR,
                                borderMode=cv2.BORDER_REPLICATE)
        bgr[t] = cv2.warpAffine(backgrounds[t], bg_affine[t], (W, H), flags=cv2.INTER_LINEAR,
                                borderMode=cv2.BORDER_REFLECT)
        al = pha[t].astype(np.float64)[..., None] / 255.0
        com[t] = np.clip(np.rint(al * fgr[t] + (1.0 - al) * bgr[t]), 0, 255).astype(np.uint8)
    return ClipFrames(com, pha, fgr, bgr, fg_affine, bg_affine)


def plan_clips(photos: list[PhotoInfo], backgrounds: list, cfg: BenchmarkConfig) -> list[ClipPlan]:
    """Deterministic plan: photos in a seeded order (each used before any repeats), random background and start."""
    if not photos or not backgrounds:
        return []
    order = np.random.default_rng(cfg.seed).permutation(len(photos))
    plans = []
    for i in range(cfg.clips):
        rng = np.random.default_rng([cfg.seed, i, 1])
        bg = backgrounds[int(rng.integers(len(backgrounds)))]
        plans.append(ClipPlan(i, f"{i:04d}", photos[int(order[i % len(photos)])], bg,
                              int(rng.integers(max(bg.frames, 1)))))
    return plans


def _hold(cfg: BenchmarkConfig, index: int) -> tuple[int, int]:
    # Its own stream, so that still_share = 0 leaves every other draw (and the old clips) unchanged.
    still = still_steps(cfg.frames, cfg.still_share)
    before = int(np.random.default_rng([cfg.seed, index, 3]).integers(still + 1))
    return before, still - before


def make_clip(plan: ClipPlan, cfg: BenchmarkConfig, reader: BackgroundReader,
              photo_loader: Callable[[PhotoInfo], Photo] | None = None) -> ClipFrames:
    """Composite one planned clip (raises SourceError when its photo or background fails)."""
    W, H = cfg.size
    rng = np.random.default_rng([cfg.seed, plan.index, 2])
    photo = (photo_loader or (lambda info: load_photo(info, max_height=int(H * 1.1))))(plan.photo)
    p0, p1 = _random_pose_pair(rng, photo, cfg)
    fg = foreground_track(p0, p1, cfg.frames, photo.alpha.shape, _hold(cfg, plan.index))
    cover = (math.ceil(W * cfg.bg_zoom), math.ceil(H * cfg.bg_zoom))
    bgs = reader.read(plan.background, plan.start, cfg.frames, cover)
    bg = background_track(rng, cfg.frames, bgs.shape[1:3], cfg)
    return composite_clip(photo, bgs, fg, bg, cfg.size)


def _png(img: np.ndarray) -> bytes:
    if img.ndim == 3:
        img = cv2.cvtColor(img, cv2.COLOR_RGB2BGR)
    ok, data = cv2.imencode(".png", img, [cv2.IMWRITE_PNG_COMPRESSION, 1])
    if not ok:
        raise ValueError("PNG encoding failed")
    return data.tobytes()


def write_clip(out: str, name: str, clip: ClipFrames) -> None:
    """Write `out/<name>/{com,pha,fgr,bgr}/0000.png...`; a local clip folder appears only when complete."""
    files = {f"{kind}/{t:04d}.png": getattr(clip, kind)[t]
             for kind in ("com", "pha", "fgr", "bgr") for t in range(len(clip.pha))}
    local = storage.local_path(out)
    if local is None:
        for rel, img in files.items():
            storage.write_bytes_atomic(storage.join(out, name, rel), _png(img))
        return
    os.makedirs(local, exist_ok=True)
    tmp = os.path.join(local, f".{name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        for rel, img in files.items():
            path = os.path.join(tmp, rel)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "wb") as f:
                f.write(_png(img))
        final = os.path.join(local, name)
        if os.path.exists(final):
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp)


@dataclass
class BenchmarkSummary:
    """What `make_benchmark` did: clips written, clips that failed, rejected sources."""

    written: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)   # already complete (resume)
    failed: list[Rejection] = field(default_factory=list)
    rejected: list[Rejection] = field(default_factory=list)
    planned: int = 0


class ConfigMismatch(ValueError):
    """The output folder holds a benchmark made with another configuration."""


def _clip_complete(out: str, name: str, frames: int) -> bool:
    last = f"{frames - 1:04d}.png"
    return all(storage.exists(storage.join(out, name, kind, last)) for kind in ("com", "pha", "fgr", "bgr"))


def make_benchmark(photos: list[str], backgrounds: list[str], out: str, cfg: BenchmarkConfig,
                   overwrite: bool = False, on_problem: Callable[[Rejection], None] | None = None,
                   on_clip: Callable[[str], None] | None = None, max_photo_pixels: int | None = DEFAULT_MAX_PIXELS,
                   min_subject_px: int = DEFAULT_MIN_SUBJECT) -> BenchmarkSummary:
    """Validate sources, plan and write every clip; bad sources and failed clips are listed, the rest goes on.

    Photos above `max_photo_pixels` or with a subject under `min_subject_px` are rejected (`validate_photo`).
    """
    summary = BenchmarkSummary()
    report = on_problem or (lambda r: None)
    config = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(cfg).items()}
    manifest_uri = storage.join(out, "benchmark.json")
    if storage.exists(manifest_uri) and not overwrite:
        old = json.loads(storage.read_bytes(manifest_uri))
        if old.get("config") != config:
            raise ConfigMismatch(f"{out} holds a benchmark made with another configuration "
                                 f"({old.get('config')}); use --overwrite or another --out")

    photo_srcs, rej = discover_photos(photos)
    bg_srcs, rej2 = discover_backgrounds(backgrounds)
    for r in rej + rej2:
        summary.rejected.append(r)
        report(r)
    infos, rej = validate_all(photo_srcs, lambda src: validate_photo(src, max_photo_pixels, min_subject_px))
    bg_infos, rej2 = validate_all(bg_srcs, validate_background)
    for r in rej + rej2:
        summary.rejected.append(r)
        report(r)
    infos.sort(key=lambda i: i.image)
    bg_infos.sort(key=lambda i: i.uri)

    plans = plan_clips(infos, bg_infos, cfg)
    summary.planned = len(plans)
    reader = BackgroundReader(budget_bytes=256 << 20)
    records = []
    previous = {}
    if not overwrite and storage.exists(manifest_uri):
        previous = {c["name"]: c for c in json.loads(storage.read_bytes(manifest_uri)).get("clips", [])}
    for plan in plans:
        record = {"name": plan.name, "photo": plan.photo.image, "alpha": plan.photo.alpha,
                  "background": plan.background.uri, "start": plan.start}
        if plan.name in previous and _clip_complete(out, plan.name, cfg.frames):
            summary.skipped.append(plan.name)  # same configuration: resume, keep what is there
            records.append(previous[plan.name])
            continue
        try:
            clip = make_clip(plan, cfg, reader, lambda info: load_photo(info, max_height=int(cfg.size[1] * 1.1),
                                                                        max_pixels=max_photo_pixels))
            write_clip(out, plan.name, clip)
        except (SourceError, OSError, ValueError) as exc:
            uri = getattr(exc, "uri", plan.photo.image)
            r = Rejection(uri, f"clip {plan.name}: {getattr(exc, 'reason', exc)}")
            summary.failed.append(r)
            report(r)
            continue
        record["fg_affine"] = np.round(clip.fg_affine, 6).tolist()
        record["bg_affine"] = np.round(clip.bg_affine, 6).tolist()
        records.append(record)
        summary.written.append(plan.name)
        if on_clip:
            on_clip(plan.name)

    manifest = {"schema_version": SCHEMA_VERSION, "kind": "matting-benchmark", "config": config,
                "layout": "<clip>/{com,pha,fgr,bgr}/0000.png; com = pha*fgr + (1-pha)*bgr on 8-bit values",
                "motion": "foreground: smoothstep-eased affine between two random poses, held still for "
                          "still_share of the frame steps before and after the move (fg_affine maps photo "
                          "pixels to frame pixels); background: linear pan/zoom of a crop window (bg_affine maps "
                          "the enlarged background frame to frame pixels)",
                "photos": len(infos), "backgrounds": len(bg_infos),
                "clips": records, "failed": [r.to_dict() for r in summary.failed],
                "rejected": [r.to_dict() for r in summary.rejected]}
    storage.write_bytes_atomic(manifest_uri, json.dumps(redact_config(manifest), indent=1).encode())
    lines = "".join(json.dumps(redact_config(r.to_dict())) + "\n" for r in summary.rejected + summary.failed)
    storage.write_bytes_atomic(storage.join(out, "errors.jsonl"), lines.encode())
    return summary
