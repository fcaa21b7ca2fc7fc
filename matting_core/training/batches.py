"""Training samples from clip records: pauses, flip, backgrounds, colour, the prior, crop and resize, time reversal.

A sample is made from one `ClipRecord` (frames, fgr, bgr, alpha and flow read) with its own
`np.random.Generator` (`sample_rng(seed, step, rank, index)`: never the global RNG), so the same
(seed, step, rank) always gives the same batch whatever order workers run in.

The prior enters training exactly as at inference: the recipe's `PriorStream` (prior plus the
`TemporalSmoother` on DIS flow of the frames) runs over the whole augmented composite frames, in
the order the clip plays, reset at the start of every clip; the sample's crop is then cut from
its map as from the frames. It is computed here, in data loading, rather than cached by
`generate`: every augmentation (flip, reversal, a pause, colour, a new background) changes what
the prior sees, so a cached map would be the prior of a different video. The prior stream is the
largest part of what a sample costs, then JPEG decoding and the crop's resizes; `matting train`
makes the next batch in a helper thread while a step computes (`bench/bench_train.py` prints
what a step still waits).
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Iterable, Iterator

import cv2
import numpy as np
import torch

from matting_core.data.clips import ClipRecord
from matting_core.data.fakemotion import colour_matrix
from matting_core.flow import resize_flow, source_inside
from matting_core.prior import PriorStream

__all__ = ["RECORD_COLUMNS", "Batch", "sample_rng", "draw_window", "make_sample", "collate", "invert_flow",
           "iter_batches", "shuffled"]

# The clip columns a sample needs (`iter_clips(uri, columns=RECORD_COLUMNS)`); bgr is composited
# behind a still subject (AugmentConfig.still), and ClipIndex.read decodes it only then.
RECORD_COLUMNS = ["frames", "fgr", "bgr", "alpha", "flow"]
# Separates the sample streams from other seeded streams (clip synthesis uses [seed, index]).
_SAMPLE_STREAM = 0x7EA1
_INVERT_ITERATIONS = 4  # from the splat's guess; more changed the valid share by < 0.5%
_INVERT_TOLERANCE = 0.25  # px: forward-backward mismatch of an inverted flow still counted valid
_FULL = 0.999  # a resized definedness mask at least this high: every source pixel had flow


@dataclass
class Batch:
    """A batch of training clips as tensors.

    src `[B,T,3,H,W]` float32 in [0,1] (the composite frames), prior `[B,T,1,H,W]` (the prior
    stream's map), pha `[B,T,1,H,W]` true alpha, fgr `[B,T,3,H,W]` true foreground, flow
    `[B,T,2,H,W]` true backward foreground flow in pixels at this size (`flow[:,0] = 0`),
    flow_valid `[B,T,1,H,W]` float: 1 where the true flow is defined (alpha_t > 0 in the clip,
    and every pixel the resize drew from had flow), its source lies inside frame t-1 and, for a
    reversed clip, the inverted flow is consistent (see `make_sample`); 0 elsewhere and at t=0.
    clip_ids: the record of each clip; reversed: whether each was played backwards.
    """

    src: torch.Tensor
    prior: torch.Tensor
    pha: torch.Tensor
    fgr: torch.Tensor
    flow: torch.Tensor
    flow_valid: torch.Tensor
    clip_ids: list[int]
    reversed: list[bool]

    @property
    def frames(self) -> int:
        return int(self.src.shape[1])

    def to(self, device, non_blocking: bool = False) -> "Batch":
        """The same batch with every tensor on `device`."""
        return Batch(**{f.name: (getattr(self, f.name).to(device, non_blocking=non_blocking)
                                 if isinstance(getattr(self, f.name), torch.Tensor) else getattr(self, f.name))
                        for f in fields(self)})

    def clip(self, index: int) -> "Batch":
        """Clip `index` alone, as a batch of one."""
        return Batch(**{f.name: (getattr(self, f.name)[index:index + 1] if isinstance(getattr(self, f.name), torch.Tensor)
                                 else getattr(self, f.name)[index:index + 1])
                        for f in fields(self)})

    def slice(self, start: int, stop: int) -> "Batch":
        """Frames start..stop-1 of every clip (flow of frame `start` still points at frame start-1)."""
        return Batch(**{f.name: (getattr(self, f.name)[:, start:stop]
                                 if isinstance(getattr(self, f.name), torch.Tensor) else getattr(self, f.name))
                        for f in fields(self)})


def sample_rng(seed: int, step: int, rank: int, index: int = 0) -> np.random.Generator:
    """The generator of sample `index` of the batch of `step` on worker `rank` (independent streams)."""
    return np.random.default_rng([int(seed), int(step), int(rank), int(index), _SAMPLE_STREAM])


def _resize(img: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """`img` to (W, H): area averaging when shrinking, bilinear when enlarging."""
    h, w = img.shape[:2]
    if (w, h) == tuple(size):
        return img
    interp = cv2.INTER_AREA if size[0] < w and size[1] < h else cv2.INTER_LINEAR
    return cv2.resize(img, tuple(size), interpolation=interp)


def _crop_box(alpha: np.ndarray, size: tuple[int, int], scale: float, rng: np.random.Generator
              ) -> tuple[int, int, int, int]:
    """(x0, y0, w, h) of a crop with `size`'s aspect, `scale` times the largest that fits the clip.

    Centred on a random point of the subject's bounding box over the clip (alpha > 0.5; the
    whole frame without a subject), so zoomed crops still show the person.
    """
    height, width = alpha.shape[1:]
    aspect = size[0] / size[1]
    cw_max = min(float(width), height * aspect)
    cw = max(2, min(width, int(round(cw_max * scale))))
    ch = max(2, min(height, int(round(cw / aspect))))
    ys, xs = np.nonzero((alpha > 0.5).any(axis=0))
    bx0, bx1, by0, by1 = (xs.min(), xs.max(), ys.min(), ys.max()) if xs.size else (0, width - 1, 0, height - 1)
    cx, cy = rng.uniform(bx0, bx1 + 1), rng.uniform(by0, by1 + 1)
    x0 = int(np.clip(round(cx - cw / 2), 0, width - cw))
    y0 = int(np.clip(round(cy - ch / 2), 0, height - ch))
    return x0, y0, cw, ch


def _apply_colour(images: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """uint8 [T,H,W,3] through the affine colour map, saturated to uint8."""
    out = np.empty_like(images)
    for t, img in enumerate(images):
        x = cv2.transform(img.astype(np.float32), matrix)
        x += 0.5
        out[t] = np.clip(x, 0, 255, out=x)  # the assignment truncates, as astype(np.uint8) does
    return out


def _composite(alpha: np.ndarray, fgr: np.ndarray, bgr: np.ndarray) -> np.ndarray:
    """uint8 [T,H,W,3] frames `alpha * fgr + (1 - alpha) * bgr`, rounded.

    alpha float32 [T,H,W] in [0,1], fgr and bgr uint8 [T,H,W,3]; alpha and fgr may hold one frame
    (a held pose), used for every frame of bgr. Frame by frame in float32, without full-clip
    temporaries.
    """
    out = np.empty(bgr.shape, np.uint8)
    for t in range(len(bgr)):
        if t == 0 or len(alpha) > 1:
            a = alpha[t][..., None]
            front, behind = a * fgr[t].astype(np.float32), 1.0 - a
        x = behind * bgr[t].astype(np.float32)
        x += front
        x += 0.5
        out[t] = np.clip(x, 0, 255, out=x)
    return out


def _flip(images: np.ndarray) -> np.ndarray:
    """[T,H,W,...] mirrored left to right, contiguous (cv2.flip: numpy's copy of a reversed view is far slower)."""
    out = np.empty_like(images)
    for t in range(len(images)):
        cv2.flip(images[t], 1, out[t])
    return out


def _splat_inverse(flow_next: np.ndarray) -> np.ndarray:
    """A first guess of the forward flow of frame s: every pixel x of frame s+1 with flow sends -b(x) to
    x + b(x) (nearest pixel); elsewhere the mean motion. Without it the iteration below stalls in the
    zero flow of the background when the subject moves further than its own width (shifted clips)."""
    h, w = flow_next.shape[:2]
    moving = (flow_next[..., 0] != 0) | (flow_next[..., 1] != 0)
    guess = np.zeros_like(flow_next)
    if not moving.any():
        return guess
    ys, xs = np.nonzero(moving)
    b = flow_next[ys, xs]
    guess[:] = -b.mean(axis=0)
    tx = np.rint(xs + b[:, 0]).astype(np.int64)
    ty = np.rint(ys + b[:, 1]).astype(np.int64)
    inside = (tx >= 0) & (tx < w) & (ty >= 0) & (ty < h)
    guess[ty[inside], tx[inside]] = -b[inside]
    return guess


def invert_flow(flow_next: np.ndarray, iterations: int = _INVERT_ITERATIONS) -> tuple[np.ndarray, np.ndarray]:
    """Forward flow of frame s from the backward flow of frame s+1, float32 [H,W,2], and its mismatch [H,W].

    `flow_next` b maps x in frame s+1 to x + b(x) in frame s; the forward flow f of frame s
    satisfies f(y) = -b(y + f(y)) (the point y of frame s is at y + f(y) in frame s+1), solved by
    fixed-point iteration (a contraction for the smooth motion of fake-motion clips) from a
    forward splat of b. The mismatch
    |f(y) + b(y + f(y))| in pixels says where no inverse exists (content that left, flow edges).
    """
    h, w = flow_next.shape[:2]
    gx = np.arange(w, dtype=np.float32)[None, :]
    gy = np.arange(h, dtype=np.float32)[:, None]

    def sample(f: np.ndarray) -> np.ndarray:
        return cv2.remap(flow_next, gx + f[..., 0], gy + f[..., 1], cv2.INTER_LINEAR,
                         borderMode=cv2.BORDER_REPLICATE)

    f = _splat_inverse(flow_next)
    for _ in range(iterations):
        f = -sample(f)
    r = f + sample(f)
    mismatch = cv2.magnitude(r[..., 0], r[..., 1])
    return f.astype(np.float32, copy=False), mismatch.astype(np.float32, copy=False)


def _reverse(frames, fgr, alpha, flow, defined):
    """Play a clip backwards; returns (frames, fgr, alpha, flow, valid) of the reversed clip.

    Reversed frame t' is original frame s = T-1-t'; its backward flow must point at reversed
    frame t'-1 = original s+1, i.e. it is the forward flow of s, obtained by inverting the true
    backward flow of s+1 (`invert_flow`). Valid where frame s had flow, the inverse is consistent
    to 0.25 px, its target lies inside frame s+1 and lands where s+1's flow is defined.
    """
    T, h, w = alpha.shape
    gx = np.arange(w, dtype=np.float32)[None, :]
    gy = np.arange(h, dtype=np.float32)[:, None]
    new_flow = np.zeros_like(flow)
    valid = np.zeros((T, h, w), np.float32)
    for t in range(1, T):
        s = T - 1 - t
        f, mismatch = invert_flow(flow[s + 1])
        target_defined = cv2.remap(defined[s + 1], gx + f[..., 0], gy + f[..., 1], cv2.INTER_LINEAR,
                                   borderMode=cv2.BORDER_CONSTANT, borderValue=0.0)
        ok = (defined[s] >= _FULL) & (mismatch < _INVERT_TOLERANCE) & source_inside(f) & (target_defined >= _FULL)
        new_flow[t] = np.where(ok[..., None], f, 0.0)
        valid[t] = ok
    return frames[::-1].copy(), fgr[::-1].copy(), alpha[::-1].copy(), new_flow, valid


def procedural_background(rng: np.random.Generator, frames: int, size: tuple[int, int]) -> np.ndarray:
    """A random scene panning at constant speed, uint8 [T,H,W,3] RGB, in a few milliseconds.

    Smooth colour fields at two scales, a grain texture, and 6-20 boxes, discs and lines of random
    colours, some blurred (hard edges that are not a person's), moved by a constant sub-frame pan.
    """
    W, H = size
    pad = max(8, max(W, H) // 8)
    ch, cw = H + 2 * pad, W + 2 * pad
    base = rng.uniform(30, 225, 3).astype(np.float32)
    colour = base + cv2.resize(rng.normal(0, 40, (2, 3, 3)).astype(np.float32), (cw, ch), interpolation=cv2.INTER_CUBIC)
    colour += cv2.resize(rng.normal(0, 20, (6, 9, 3)).astype(np.float32), (cw, ch), interpolation=cv2.INTER_CUBIC)
    grain = cv2.resize(rng.normal(0, 1, (ch // 4, cw // 4)).astype(np.float32), (cw, ch),
                       interpolation=cv2.INTER_LINEAR)
    canvas = colour
    canvas += rng.uniform(0, 18) * grain[..., None]
    for _ in range(int(rng.integers(6, 21))):
        c = np.clip(base + rng.normal(0, 70, 3), 0, 255).tolist()
        x, y = int(rng.integers(0, cw)), int(rng.integers(0, ch))
        kind = rng.random()
        if kind < 0.4:
            cv2.rectangle(canvas, (x, y), (x + int(rng.integers(4, cw // 2)), y + int(rng.integers(4, ch // 2))), c, -1)
        elif kind < 0.75:
            cv2.circle(canvas, (x, y), int(rng.integers(3, max(4, ch // 4))), c, -1)
        else:
            end = (int(rng.integers(0, cw)), int(rng.integers(0, ch)))
            cv2.line(canvas, (x, y), end, c, int(rng.integers(1, 6)))
    if rng.random() < 0.5:
        canvas = cv2.GaussianBlur(canvas, (0, 0), rng.uniform(0.8, 3.0))
    grey = ((canvas[..., 0] + canvas[..., 1] + canvas[..., 2]) / 3)[..., None]  # mean(axis=2), without its slow reduction
    canvas -= grey  # real scenes are rarely fully saturated
    canvas *= rng.uniform(0.2, 1.0)
    canvas += grey
    canvas += 0.5
    canvas = np.clip(canvas, 0, 255, out=canvas).astype(np.uint8)
    velocity = rng.uniform(-1.0, 1.0, 2) * pad / max(frames, 1)
    out = np.empty((frames, H, W, 3), np.uint8)
    for t in range(frames):
        ox, oy = np.rint(pad + velocity * t - (velocity * (frames - 1) / 2)).astype(int)
        out[t] = canvas[oy:oy + H, ox:ox + W]
    return out


def draw_window(rng: np.random.Generator, num_frames: int, frames: int) -> int:
    """The first frame of a sample's window of `frames` frames in a clip of `num_frames` (`make_sample`'s first draw)."""
    if num_frames < frames:
        raise ValueError(f"a clip of {num_frames} frames has no window of {frames}")
    return int(rng.integers(0, num_frames - frames + 1))


def make_sample(record: ClipRecord, cfg, rng: np.random.Generator, prior_stream: PriorStream,
                augment: bool = True, window_drawn: bool = False, native_size: bool = False,
                empty_prior: bool = False) -> dict[str, np.ndarray]:
    """One training sample (numpy, `[T,C,H,W]` float32 like a Batch's clips) from a decoded clip.

    In order: a window of `cfg.frames` frames (random when the clip is longer, the first ones
    without `augment`), made a pause (`augment.still`: the first pose held over the clip's moving
    background, zero flow); on the whole frames, a horizontal flip (flow x negated), a procedural
    background composited behind F and alpha, one colour jitter for the clip's frames and
    foregrounds alike, and the prior stream, reset, run over them in the order the clip plays (as
    inference runs it on a video); then a crop with the training aspect and a random scale,
    centred on a random point of the subject, resized to `cfg.augment.size` with the prior, flow
    cropped and its vectors scaled (without `augment`: the whole frame scaled to fit inside that
    size, or left at its own size with `native_size`); last, time reversal (flow inverted, see
    `_reverse`).
    Keys: src, prior, pha, fgr, flow, flow_valid (as in `Batch`), clip_id, reversed.

    With `window_drawn`, the record holds only the window's frames, already drawn from `rng` with
    `draw_window` (and read with `ClipIndex.read(..., frames=...)`, which decodes only those): the
    sample is then the same as from the whole record. With `empty_prior` the prior is all zeros
    (the stream is not run): the recipe's `prior_off_steps`.
    """
    aug = cfg.augment
    if not all(record.has(name) for name in RECORD_COLUMNS):  # (without decoding a deferred bgr)
        raise ValueError(f"clip {record.clip_id}: a training sample needs the columns {', '.join(RECORD_COLUMNS)}")
    T_clip = record.alpha.shape[0]
    T = int(cfg.frames)
    if T_clip < T or (window_drawn and T_clip != T):
        raise ValueError(f"clip {record.clip_id} has {T_clip} frames, the recipe takes {T} per sample"
                         + (" (a drawn window must hold exactly those)" if window_drawn else ""))
    start = draw_window(rng, T_clip, T) if augment and not window_drawn else 0
    window = slice(start, start + T)
    frames, fgr, alpha = record.frames[window], record.fgr[window], record.alpha[window]
    flow = record.flow[window].copy()
    flow[0] = 0.0  # the window's first frame has no previous frame
    if augment and rng.random() < aug.still:
        # A pause: the window's first pose held over the clip's own moving background. Fake
        # motion never stops, and a person who holds still is where a matte must not flicker.
        frames = _composite(alpha[:1], fgr[:1], record.bgr[window])
        fgr, alpha = np.repeat(fgr[:1], T, axis=0), np.repeat(alpha[:1], T, axis=0)
        flow[:] = 0.0
    # Where the true flow is defined: the foreground (frame 0's has no previous frame in the
    # window, which only matters when the clip plays forward: its flow is never used then).
    defined = (alpha > 0).astype(np.float32)
    height, width = alpha.shape[1:]

    # Crop box: the same for the whole clip (the camera does not move with it). Drawn first so
    # the random streams do not depend on what the augmentations below draw.
    if augment:
        W, H = aug.size
        x0, y0, cw, ch = _crop_box(alpha, (W, H), float(rng.uniform(*aug.scale)), rng)
    else:  # the whole frame, as inference sees it, scaled to fit the training size (or not at all)
        (ch, cw), (x0, y0) = (height, width), (0, 0)
        fit = 1.0 if native_size else min(aug.size[0] / cw, aug.size[1] / ch)
        W, H = max(8, round(cw * fit)), max(8, round(ch * fit))

    # Flip, background and colour act on whole frames: the prior below must see what inference sees.
    if augment and rng.random() < aug.flip:
        frames, fgr, alpha, flow, defined = (_flip(a) for a in (frames, fgr, alpha, flow, defined))
        flow[..., 0] *= -1.0
        x0 = width - x0 - cw  # the box follows the subject into the mirror

    if augment and rng.random() < aug.background:
        frames = _composite(alpha, fgr, procedural_background(rng, T, (width, height)))

    if augment and (aug.brightness or aug.contrast or aug.saturation or aug.gains):
        matrix = colour_matrix(rng, aug)
        frames, fgr = _apply_colour(frames, matrix), _apply_colour(fgr, matrix)

    # The prior stream, reset, over the whole frames in the order the clip plays, as inference
    # runs it on a video; then cropped like the frames. Computing it on the crop instead gives
    # the prior a zoomed-in, sharper view than inference ever gives it, and the net then learns
    # to correct a prior it will not meet.
    reverse = bool(augment and rng.random() < aug.reverse)
    prior = np.zeros((T, height, width), np.float32)
    if not empty_prior:
        prior_stream.reset()
        for t in (range(T - 1, -1, -1) if reverse else range(T)):
            prior[t] = prior_stream(np.ascontiguousarray(frames[t]))

    box = (slice(None), slice(y0, y0 + ch), slice(x0, x0 + cw))
    # (OpenCV takes the crops' row strides as they are: no copies.)
    frames = np.stack([_resize(f, (W, H)) for f in frames[box]])
    fgr = np.stack([_resize(f, (W, H)) for f in fgr[box]])
    alpha = np.stack([_resize(a, (W, H)) for a in alpha[box]])
    prior = np.stack([_resize(p, (W, H)) for p in prior[box]])
    flow = np.stack([resize_flow(f, (H, W)) for f in flow[box]])
    defined = np.stack([cv2.resize(d, (W, H), interpolation=cv2.INTER_LINEAR) for d in defined[box]])

    if reverse:
        frames, fgr, alpha, flow, valid = _reverse(frames, fgr, alpha, flow, defined)
        prior = prior[::-1]
    else:
        valid = np.zeros((T, H, W), np.float32)
        for t in range(1, T):
            valid[t] = (defined[t] >= _FULL) & source_inside(flow[t])
        flow = flow * (valid[..., None] > 0)

    return {
        "src": _unit_float(frames),
        "prior": np.ascontiguousarray(prior[:, None], dtype=np.float32),
        "pha": np.ascontiguousarray(alpha[:, None], dtype=np.float32),
        "fgr": _unit_float(fgr),
        "flow": np.ascontiguousarray(flow.transpose(0, 3, 1, 2), dtype=np.float32),
        "flow_valid": np.ascontiguousarray(valid[:, None], dtype=np.float32),
        "clip_id": np.int64(record.clip_id),
        "reversed": np.bool_(reverse),
    }


def _unit_float(images: np.ndarray) -> np.ndarray:
    """uint8 [T,H,W,C] -> float32 [T,C,H,W] in [0,1] (times float32(1/255)), in one pass."""
    T, H, W, C = images.shape
    out = np.empty((T, C, H, W), np.float32)
    return np.multiply(images.transpose(0, 3, 1, 2), np.float32(1.0 / 255.0), out=out)


def collate(samples: list[dict]) -> Batch:
    """Stack samples (`make_sample` dicts, equal sizes) into a Batch."""
    if not samples:
        raise ValueError("collate: no samples")
    stack = {k: torch.from_numpy(np.stack([s[k] for s in samples]))
             for k in ("src", "prior", "pha", "fgr", "flow", "flow_valid")}
    return Batch(**stack, clip_ids=[int(s["clip_id"]) for s in samples],
                 reversed=[bool(s.get("reversed", False)) for s in samples])


def shuffled(items: Iterable, buffer: int, rng: np.random.Generator) -> Iterator:
    """`items` in a random order drawn from a buffer of `buffer` items (streaming; exact for short streams)."""
    pool: list = []
    for item in items:
        pool.append(item)
        if len(pool) >= max(1, buffer):
            yield pool.pop(int(rng.integers(len(pool))))
    while pool:
        yield pool.pop(int(rng.integers(len(pool))))


def iter_batches(records: Iterable[ClipRecord], cfg, prior_stream: PriorStream, first_step: int = 0,
                 rank: int = 0, augment: bool = True, batch_size: int | None = None,
                 drop_last: bool = True, native_size: bool = False) -> Iterator[Batch]:
    """Batches of `batch_size` (default cfg.batch_size) records in the order given; batch k is step first_step + k.

    With `drop_last` an incomplete last batch is dropped (every step sees the same batch size);
    `native_size` (with `augment` off) keeps the clips' own size (see `make_sample`); with
    `augment`, steps before `cfg.prior_off_steps` (and `cfg.prior_off_share` of the samples after
    them) get an empty prior.
    """
    size = int(batch_size or cfg.batch_size)
    group: list[dict] = []
    for n, record in enumerate(records):
        step, index = first_step + n // size, n % size
        group.append(make_sample(record, cfg, sample_rng(cfg.seed, step, rank, index), prior_stream, augment=augment,
                                 native_size=native_size, empty_prior=augment and cfg.prior_is_off(step, rank, index)))
        if len(group) == size:
            yield collate(group)
            group = []
    if group and not drop_last:
        yield collate(group)
