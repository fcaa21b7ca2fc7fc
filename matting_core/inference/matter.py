"""Streaming matting of one video: prior -> motion-compensated smoothing -> network.

`Matter` keeps everything a video needs between frames (the network's recurrent state, the prior
stream's smoothing history, the optional alpha smoother) and nothing else, so memory stays
bounded whatever the video's length: frames are consumed from an iterator and results are
yielded as they come. `step(frame)` mattes one frame; `run(frames)` mattes a video lazily and can
send `frames_per_call` frames through the network at once (`[1,T,3,H,W]`, the recurrent state
carried from call to call) and compute the prior stream in a thread ahead of the network. On
CUDA both are on by default, so the accelerator is not left waiting for the CPU's prior and
flow; on the CPU the default is one frame per call in the caller's thread: batching frames over
time was slower per frame there (STACK.md), and a prior thread would take cores from the
network's own threads. `reset()` starts the next video.
"""
from __future__ import annotations

import copy
import threading
import time
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Sequence

import cv2
import numpy as np
import torch

from matting_core.flow import TemporalSmoother, Track
from matting_core.model import MattingNet
from matting_core.model.net import downsample_image
from matting_core.model.optimize import optimize_for_inference
from matting_core.model.refine import refine_frame
from matting_core.prior import Prior, PriorStream, prior_stream_from_spec
from matting_core.runtime import resolve_device
from matting_core.threads import iterate_ahead

__all__ = ["MatteFrame", "Matter", "StageTimer", "auto_downsample_ratio", "CUDA_FRAMES_PER_CALL",
           "DEFAULT_MAX_SIDE"]

# Frames per network call on CUDA when unset. Not measured (no GPU in these sessions): a few frames
# per call amortise the per-call launches and transfers while memory and latency stay small.
CUDA_FRAMES_PER_CALL = 4


@dataclass
class MatteFrame:
    """One frame's result: alpha float32 [H,W] in [0,1], foreground uint8 [H,W,3] RGB, prior float32 [H,W]."""

    index: int
    pha: np.ndarray
    fgr: np.ndarray
    prior: np.ndarray


class StageTimer:
    """Accumulated wall time per named stage (seconds) and the number of frames timed."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.frames = 0
        self._lock = threading.Lock()  # the prior thread and the network's add to it at once

    def clear(self) -> None:
        """Forget every stage's time and the frame count (a new video starts)."""
        with self._lock:
            self.seconds.clear()
            self.frames = 0

    def add(self, stage: str, seconds: float) -> None:
        """Add `seconds` to `stage`."""
        with self._lock:
            self.seconds[stage] = self.seconds.get(stage, 0.0) + seconds

    def summary(self) -> dict[str, Any]:
        """JSON-safe totals and per-frame milliseconds for result.json."""
        n = max(self.frames, 1)
        with self._lock:
            seconds = dict(self.seconds)
        return {"frames": self.frames,
                "total_s": {k: round(v, 4) for k, v in seconds.items()},
                "ms_per_frame": {k: round(1e3 * v / n, 3) for k, v in seconds.items()}}


class _TimedPrior(Prior):
    """A prior that adds its own run time to a StageTimer (to split prior from smoothing cost)."""

    def __init__(self, prior: Prior, timer: StageTimer):
        self.inner, self.timer = prior, timer
        self.backend = prior.backend

    @property
    def spec(self) -> dict[str, Any]:
        return self.inner.spec

    def __call__(self, frame: np.ndarray) -> np.ndarray:
        t0 = time.perf_counter()
        out = self.inner(frame)
        self.timer.add("prior", time.perf_counter() - t0)
        return out


@dataclass
class _Prepared:
    """A frame with its prior, ready for the network; `fresh`: it starts a stream (new video or size)."""

    frame: np.ndarray  # uint8 [H,W,3]
    prior: np.ndarray  # float32 [H,W]
    ratio: float
    fresh: bool
    track: Track | None  # the prior stream's motion at the frame's size, for the alpha smoother


# The network's input side for models that do not record the side they were trained at.
DEFAULT_MAX_SIDE = 512


def auto_downsample_ratio(height: int, width: int, max_side: int = DEFAULT_MAX_SIDE) -> float:
    """Ratio at which the network sees a frame whose longer side is at most `max_side` (1 for small frames)."""
    return min(1.0, max_side / max(height, width))


class Matter:
    """Mattes a video with a MattingNet and a prior stream, in bounded memory.

    Nothing it is given changes: the network is copied (to `device`, eval mode, no gradients,
    inference-optimised), the prior stream's smoothing history is its own, and process-wide
    settings (thread counts) are left to the caller (`matting_core.runtime.set_cpu_threads`).
    One video at a time: `step` and a running `run` share the same state.

    Args:
        net: a `matting_core.model.MattingNet` (or any module with its forward signature).
        prior: a PriorStream, or None for the one the checkpoint records (`net.config["prior"]`);
            Matter runs its prior (timed apart from the smoothing) with a smoother of its own.
        device: `auto`, `cpu`, `cuda` or a torch.device.
        amp: float16 autocast on CUDA (ignored on CPU).
        downsample_ratio: the network's input scale; None picks `auto_downsample_ratio(max_side)`
            per video from the first frame's size.
        max_side: longer side of the network's input when the ratio is automatic; None: the side
            the network was trained at (`net.config["work_side"]`), else `DEFAULT_MAX_SIDE`.
        smooth_alpha: also smooth the output alpha with the prior stream's motion (no extra flow).
        alpha_smoother: settings for the alpha smoother (TemporalSmoother keyword arguments).
        prior_at_work_size: when the network runs below the frame's resolution, run the prior
            stream (prior and motion-compensated smoothing) on the frame scaled to the network's
            working size too, and upsample its map: the network sees the prior at that size
            anyway, and smoothing full-resolution maps was a sixth of the time at 1080p.
        frames_per_call: frames `run` sends through the network in one `[1,T,3,H,W]` call (the
            last call of a video may be shorter); None: `CUDA_FRAMES_PER_CALL` on CUDA, 1 on the
            CPU. The results equal one-frame calls' (within a few 1e-6 in float32).
        prior_ahead: `run` computes the prior stream in a thread, up to `frames_per_call` frames
            ahead of the network; None: on with CUDA, off on the CPU.
    """

    def __init__(self, net: torch.nn.Module, prior: PriorStream | None = None, device: Any = "auto",
                 amp: bool = True, downsample_ratio: float | None = None, max_side: int | None = None,
                 smooth_alpha: bool = False, alpha_smoother: dict[str, Any] | None = None,
                 prior_at_work_size: bool = True, frames_per_call: int | None = None,
                 prior_ahead: bool | None = None):
        self.device = resolve_device(device)
        if downsample_ratio is not None and not 0.0 < downsample_ratio <= 1.0:
            raise ValueError(f"downsample_ratio must be in (0, 1], got {downsample_ratio}")
        cuda = self.device.type == "cuda"
        if frames_per_call is None:
            frames_per_call = CUDA_FRAMES_PER_CALL if cuda else 1
        if int(frames_per_call) != frames_per_call or frames_per_call < 1:
            raise ValueError(f"frames_per_call must be a positive integer, got {frames_per_call}")
        self.frames_per_call = int(frames_per_call)
        self.prior_ahead = cuda if prior_ahead is None else bool(prior_ahead)
        self.net = _inference_copy(net, self.device)
        # On the CPU the guided refiner runs with OpenCV on the uint8 frames (refine_frame): in
        # PyTorch it was the costliest part of a 1080p frame after the network itself.
        self.refine_on_frames = not cuda and isinstance(self.net, MattingNet)
        self.amp = bool(amp) and cuda
        self.fixed_ratio = downsample_ratio
        if max_side is None:
            max_side = (getattr(net, "config", None) or {}).get("work_side") or DEFAULT_MAX_SIDE
        self.max_side = int(max_side)
        self.prior_at_work_size = bool(prior_at_work_size)
        self.timer = StageTimer()
        if prior is None:
            config = getattr(net, "config", {}) or {}
            prior = prior_stream_from_spec(config.get("prior"), device=self.device)
        own = prior.fresh()
        own.prior = _TimedPrior(own.prior, self.timer)
        self.prior_stream = own
        self.alpha_smoother = None
        if smooth_alpha:
            self.alpha_smoother = TemporalSmoother(**(alpha_smoother or {}))
        self.reset()

    @property
    def spec(self) -> dict[str, Any]:
        """JSON-safe settings for result.json: device, precision, ratio, batching, prior stream, alpha smoothing."""
        return {"device": str(self.device), "amp": self.amp,
                "downsample_ratio": self.ratio if self.ratio is not None else self.fixed_ratio,
                "max_side": self.max_side, "prior_size": list(self._prior_size) if self._prior_size else None,
                "frames_per_call": self.frames_per_call, "prior_ahead": self.prior_ahead,
                "refiner": "opencv" if self.refine_on_frames else "torch",
                "prior_stream": self.prior_stream.spec,
                "alpha_smoother": self.alpha_smoother.spec if self.alpha_smoother else None}

    @property
    def state(self) -> list[torch.Tensor] | None:
        """The network's recurrent state after the last frame (None before the first)."""
        return self._state

    def reset(self) -> None:
        """Forget the previous video: recurrent state, smoothing histories, automatic ratio, timings."""
        self._state: list[torch.Tensor] | None = None
        self._size: tuple[int, int] | None = None
        self._prior_size: tuple[int, int] | None = None  # (W,H) the prior stream runs at, None: the frame's
        self.ratio: float | None = self.fixed_ratio
        self.index = 0
        self.timer.clear()  # result.json reports one video's timings, not an actor's running total
        self.prior_stream.reset()
        if self.alpha_smoother is not None:
            self.alpha_smoother.reset()

    def step(self, frame: np.ndarray) -> MatteFrame:
        """Matte the next frame of the video: uint8 [H,W,3] RGB -> MatteFrame."""
        return self._finish([self._prepare(frame)])[0]

    def run(self, frames: Iterable[np.ndarray]) -> Iterator[MatteFrame]:
        """Matte a whole video lazily: one MatteFrame per input frame (uint8 [H,W,3] RGB), in order.

        At most `frames_per_call` frames wait for the network (twice that, plus the one being
        prepared, with `prior_ahead`). An exception from `frames` or the prior stream comes out
        after the results of the frames before it. Closing the iterator early stops and joins
        the prior thread (once the frame it is preparing, or the next read of `frames`, is done).
        """
        self.reset()
        prepared = self._ahead(frames) if self.prior_ahead else (self._prepare(f) for f in frames)
        try:
            batch: list[_Prepared] = []
            while True:
                try:
                    item = next(prepared)
                except StopIteration:
                    break
                except Exception:
                    yield from self._finish(batch)  # the frames read before the failure are matted
                    raise
                if item.fresh and batch:  # a new size starts a new recurrent state: not in one call
                    yield from self._finish(batch)
                    batch = []
                batch.append(item)
                if len(batch) == self.frames_per_call:
                    yield from self._finish(batch)
                    batch = []
            yield from self._finish(batch)
        finally:
            prepared.close()

    def _prepare(self, frame: np.ndarray) -> _Prepared:
        """The prior stream's side of a frame: size bookkeeping, prior and smoothing, timed."""
        if frame.ndim != 3 or frame.shape[2] != 3 or frame.dtype != np.uint8:
            raise ValueError(f"expected a uint8 [H,W,3] RGB frame, got {frame.dtype} {frame.shape}")
        size = frame.shape[:2]
        fresh = size != self._size
        if fresh:
            # The smoothing history (and, in _finish, the recurrent state) is tied to one frame size.
            self.prior_stream.reset()
            self._size, self._prior_size = size, None
            self.ratio = self.fixed_ratio
            if self.ratio is None:
                self.ratio = auto_downsample_ratio(*size, self.max_side)
            if self.prior_at_work_size and self.ratio < 1.0:
                # The size the network's own downsampling gives (MattingNet._work_size).
                h, w = (max(1, int(np.floor(n * self.ratio))) for n in size)
                self._prior_size = (w, h)
        timer = self.timer
        t0 = time.perf_counter()
        prior_before = timer.seconds.get("prior", 0.0)
        if self._prior_size is None:
            prior = self.prior_stream(frame)
        else:
            small = cv2.resize(frame, self._prior_size, interpolation=cv2.INTER_AREA)
            prior = cv2.resize(self.prior_stream(small), (size[1], size[0]), interpolation=cv2.INTER_LINEAR)
        timer.add("smoothing", (time.perf_counter() - t0) - (timer.seconds.get("prior", 0.0) - prior_before))
        track = None
        if self.alpha_smoother is not None and self._prior_size is None:  # motion at the alpha's size to reuse
            track = getattr(self.prior_stream.smoother, "last_track", None)
        return _Prepared(frame, prior, self.ratio, fresh, track)

    def _finish(self, batch: list[_Prepared]) -> list[MatteFrame]:
        """The network's side of consecutive prepared frames of one size: one call, then alpha smoothing, in order."""
        if not batch:
            return []
        if batch[0].fresh:
            self._state, self.index = None, 0
            if self.alpha_smoother is not None:
                self.alpha_smoother.reset()
        timer = self.timer
        t0 = time.perf_counter()
        phas, fgrs = self._net([b.frame for b in batch], [b.prior for b in batch], batch[0].ratio)
        timer.add("net", time.perf_counter() - t0)
        results = []
        for item, pha, fgr in zip(batch, phas, fgrs):
            if self.alpha_smoother is not None:
                t1 = time.perf_counter()
                if item.track is None:
                    pha = self.alpha_smoother(item.frame, pha)
                else:
                    pha = self.alpha_smoother.update(item.track, pha)
                timer.add("alpha_smoothing", time.perf_counter() - t1)
            timer.frames += 1
            results.append(MatteFrame(self.index, pha, fgr, item.prior))
            self.index += 1
        return results

    @torch.inference_mode()
    def _net(self, frames: list[np.ndarray], priors: list[np.ndarray], ratio: float
             ) -> tuple[Sequence[np.ndarray], Sequence[np.ndarray]]:
        """T frames uint8 [H,W,3] and priors [H,W] -> T alphas float32 [H,W], T foregrounds uint8 [H,W,3]."""
        dev = self.device
        if self.refine_on_frames and ratio < 1.0:
            # The network at its working size (as its own downsample_ratio path runs it, the
            # frames downsampled from uint8 without a full-resolution float copy), then its guided
            # refiner with OpenCV, frame by frame.
            src_lr = np.stack([downsample_image(f, ratio, 1.0 / 255) for f in frames])  # [T,h,w,3]
            pri_lr = np.stack([downsample_image(p, ratio) for p in priors])  # [T,h,w]
            src_t = torch.from_numpy(src_lr).permute(0, 3, 1, 2)[None]  # [1,T,3,h,w]
            pri_t = torch.from_numpy(pri_lr)[None, :, None]  # [1,T,1,h,w]
            if len(frames) == 1:
                src_t, pri_t = src_t[:, 0], pri_t[:, 0]
            # (clamped here, not by the net: its output curve comes after the refiner, as in its forward)
            pha_lr, fgr_lr, self._state = self.net(src_t, pri_t, self._state, 1.0, False)
            pha_lr, fgr_lr = _hwc(pha_lr.clamp_(0, 1)), _hwc(fgr_lr.clamp_(0, 1))  # [T,h,w,C]
            radius, eps = self.net.refiner.filter.radius, self.net.refiner.filter.eps
            curve = (self.net.curve_gain, self.net.curve_centre)
            fgrs, phas = zip(*(refine_frame(src_lr[t], fgr_lr[t], pha_lr[t, ..., 0], frame, radius, eps, curve)
                               for t, frame in enumerate(frames)))
            return phas, fgrs
        src = torch.from_numpy(np.stack(frames)).to(dev).permute(0, 3, 1, 2)[None].float().div_(255)  # [1,T,3,H,W]
        pri = torch.from_numpy(np.stack(priors).astype(np.float32, copy=False)).to(dev)[None, :, None]  # [1,T,1,H,W]
        if len(frames) == 1:  # the one-frame form, as a streaming net (or an exported one) expects
            src, pri = src[:, 0], pri[:, 0]  # [1,3,H,W], [1,1,H,W]
        with torch.autocast(dev.type, dtype=torch.float16, enabled=self.amp):
            pha, fgr, self._state = self.net(src, pri, self._state, downsample_ratio=ratio)
        pha = pha.reshape(-1, *pha.shape[-2:]).float().clamp_(0, 1)  # [T,H,W]
        fgr = fgr.reshape(-1, *fgr.shape[-3:]).float().clamp_(0, 1).mul_(255).round_().to(torch.uint8)  # [T,3,H,W]
        return pha.cpu().numpy(), fgr.permute(0, 2, 3, 1).contiguous().cpu().numpy()

    def _ahead(self, frames: Iterable[np.ndarray]) -> Iterator[_Prepared]:
        """`_prepare` of each frame, run in a thread up to `frames_per_call` frames ahead of the caller."""
        # At normal priority, unlike the decoder and writers: the network waits for these priors.
        return iterate_ahead((self._prepare(frame) for frame in frames), self.frames_per_call, "matte-prior")


def _hwc(x: torch.Tensor) -> np.ndarray:
    """`[...,C,h,w]` -> contiguous float32 `[N,h,w,C]` as numpy."""
    return np.ascontiguousarray(x.reshape(-1, *x.shape[-3:]).permute(0, 2, 3, 1).float().numpy())


def _inference_copy(net: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """`net` on `device` in eval mode without gradients, as a copy: the caller's model (perhaps in training) is untouched."""
    if isinstance(net, MattingNet):
        # Folded batch norms + channels-last: about 20% faster streaming on CPU, same outputs (~1e-6).
        # optimize_for_inference works on a copy; one on another device is copied first, then moved.
        return optimize_for_inference(net if _on(net, device) else copy.deepcopy(net).to(device))
    return copy.deepcopy(net).to(device).eval().requires_grad_(False)


def _on(net: torch.nn.Module, device: torch.device) -> bool:
    first = next(net.parameters(), None)
    return first is None or first.device.type == device.type
