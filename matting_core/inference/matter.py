"""Streaming matting of one video: prior -> motion-compensated smoothing -> network, frame by frame.

`Matter` keeps everything a video needs between frames (the network's recurrent state, the prior
stream's smoothing history, the optional alpha smoother) and nothing else, so memory stays
constant whatever the video's length: frames are consumed from an iterator and each result is
yielded before the next frame is read. One frame per network call: on these CPUs batching frames
over time was slower per frame (STACK.md); `reset()` starts the next video.
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from typing import Any, Iterable, Iterator

import cv2
import numpy as np
import torch

from matting_core.flow import TemporalSmoother
from matting_core.model import MattingNet
from matting_core.model.optimize import optimize_for_inference
from matting_core.prior import Prior, PriorStream, prior_stream_from_spec
from matting_core.runtime import resolve_device

__all__ = ["MatteFrame", "Matter", "StageTimer", "auto_downsample_ratio"]


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

    def add(self, stage: str, seconds: float) -> None:
        """Add `seconds` to `stage`."""
        self.seconds[stage] = self.seconds.get(stage, 0.0) + seconds

    def summary(self) -> dict[str, Any]:
        """JSON-safe totals and per-frame milliseconds for result.json."""
        n = max(self.frames, 1)
        return {"frames": self.frames,
                "total_s": {k: round(v, 4) for k, v in self.seconds.items()},
                "ms_per_frame": {k: round(1e3 * v / n, 3) for k, v in self.seconds.items()}}


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


def auto_downsample_ratio(height: int, width: int, max_side: int = 512) -> float:
    """Ratio at which the network sees a frame whose longer side is at most `max_side` (1 for small frames)."""
    return min(1.0, max_side / max(height, width))


class Matter:
    """Mattes a video frame by frame with a MattingNet and a prior stream, in constant memory.

    Nothing it is given changes: the network is copied (to `device`, eval mode, no gradients,
    inference-optimised), the prior stream's smoothing history is its own, and process-wide
    settings (thread counts) are left to the caller (`matting_core.runtime.set_cpu_threads`).

    Args:
        net: a `matting_core.model.MattingNet` (or any module with its forward signature).
        prior: a PriorStream, or None for the one the checkpoint records (`net.config["prior"]`);
            Matter runs its prior (timed apart from the smoothing) with a smoother of its own.
        device: `auto`, `cpu`, `cuda` or a torch.device.
        amp: float16 autocast on CUDA (ignored on CPU).
        downsample_ratio: the network's input scale; None picks `auto_downsample_ratio(max_side)`
            per video from the first frame's size.
        max_side: longer side of the network's input when the ratio is automatic.
        smooth_alpha: also smooth the output alpha with the prior stream's motion (no extra flow).
        alpha_smoother: settings for the alpha smoother (TemporalSmoother keyword arguments).
        prior_at_work_size: when the network runs below the frame's resolution, run the prior
            stream (prior and motion-compensated smoothing) on the frame scaled to the network's
            working size too, and upsample its map: the network sees the prior at that size
            anyway, and smoothing full-resolution maps was a sixth of the time at 1080p.
    """

    def __init__(self, net: torch.nn.Module, prior: PriorStream | None = None, device: Any = "auto",
                 amp: bool = True, downsample_ratio: float | None = None, max_side: int = 512,
                 smooth_alpha: bool = False, alpha_smoother: dict[str, Any] | None = None,
                 prior_at_work_size: bool = True):
        self.device = resolve_device(device)
        if downsample_ratio is not None and not 0.0 < downsample_ratio <= 1.0:
            raise ValueError(f"downsample_ratio must be in (0, 1], got {downsample_ratio}")
        self.net = _inference_copy(net, self.device)
        self.amp = bool(amp) and self.device.type == "cuda"
        self.fixed_ratio = downsample_ratio
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
        """JSON-safe settings for result.json: device, precision, ratio, prior stream, alpha smoothing."""
        return {"device": str(self.device), "amp": self.amp,
                "downsample_ratio": self.ratio if self.ratio is not None else self.fixed_ratio,
                "max_side": self.max_side, "prior_size": list(self._prior_size) if self._prior_size else None,
                "prior_stream": self.prior_stream.spec,
                "alpha_smoother": self.alpha_smoother.spec if self.alpha_smoother else None}

    @property
    def state(self) -> list[torch.Tensor] | None:
        """The network's recurrent state after the last frame (None before the first)."""
        return self._state

    def reset(self) -> None:
        """Forget the previous video: recurrent state, smoothing histories, automatic ratio."""
        self._state: list[torch.Tensor] | None = None
        self._size: tuple[int, int] | None = None
        self._prior_size: tuple[int, int] | None = None  # (W,H) the prior stream runs at, None: the frame's
        self.ratio: float | None = self.fixed_ratio
        self.index = 0
        self.prior_stream.reset()
        if self.alpha_smoother is not None:
            self.alpha_smoother.reset()

    def step(self, frame: np.ndarray) -> MatteFrame:
        """Matte the next frame of the video: uint8 [H,W,3] RGB -> MatteFrame."""
        if frame.ndim != 3 or frame.shape[2] != 3 or frame.dtype != np.uint8:
            raise ValueError(f"expected a uint8 [H,W,3] RGB frame, got {frame.dtype} {frame.shape}")
        size = frame.shape[:2]
        if self._size is not None and size != self._size:
            # The recurrent state and the histories are tied to one frame size.
            self.reset()
        if self._size is None:
            self._size = size
            if self.fixed_ratio is None:
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
        t1 = time.perf_counter()
        timer.add("smoothing", (t1 - t0) - (timer.seconds.get("prior", 0.0) - prior_before))
        pha, fgr = self._net(frame, prior)
        t2 = time.perf_counter()
        timer.add("net", t2 - t1)
        if self.alpha_smoother is not None:
            track = getattr(self.prior_stream.smoother, "last_track", None)
            if track is None or self._prior_size is not None:  # no motion at the alpha's size to reuse
                pha = self.alpha_smoother(frame, pha)
            else:
                pha = self.alpha_smoother.update(track, pha)
            timer.add("alpha_smoothing", time.perf_counter() - t2)
        timer.frames += 1
        result = MatteFrame(self.index, pha, fgr, prior)
        self.index += 1
        return result

    @torch.inference_mode()
    def _net(self, frame: np.ndarray, prior: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        dev = self.device
        src = torch.from_numpy(frame).to(dev).permute(2, 0, 1)[None].float().div_(255)  # [1,3,H,W]
        pri = torch.from_numpy(np.ascontiguousarray(prior, dtype=np.float32)).to(dev)[None, None]  # [1,1,H,W]
        with torch.autocast(dev.type, dtype=torch.float16, enabled=self.amp):
            pha, fgr, self._state = self.net(src, pri, self._state, downsample_ratio=self.ratio)
        pha = pha.reshape(pha.shape[-2:]).float().clamp_(0, 1)  # [H,W]
        fgr = fgr.reshape(fgr.shape[-3:]).float().clamp_(0, 1).mul_(255).round_().to(torch.uint8)
        return (pha.cpu().numpy(), fgr.permute(1, 2, 0).contiguous().cpu().numpy())

    def run(self, frames: Iterable[np.ndarray]) -> Iterator[MatteFrame]:
        """Matte a whole video lazily: one MatteFrame per input frame, holding no past frames."""
        self.reset()
        for frame in frames:
            yield self.step(frame)


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
