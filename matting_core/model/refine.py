"""Fast guided filter (He & Sun, 2015; Wu et al., 2018): upsample low-resolution mattes by the image.

Used by `MattingNet`'s `downsample_ratio` path: the network runs at low resolution, then a local
linear model `y = A * x + b` fitted at low resolution (x the image, y alpha/foreground) is
upsampled and applied to the full-resolution image, so edges follow the full-resolution image
while memory and compute at full resolution stay a few element-wise operations.

Cost at full resolution (1080p, 2 CPU threads) is dominated by the bilinear upsampling of `A` and
`b`: everything else (box filters, the solve) stays at low resolution, no full-resolution guide is
built (the alpha's grey-level guide is folded into its coefficients) and, without autograd, the
upsampled buffers are reused in place for the multiply-add and the clamp.

`refine_frame` is the same refiner for inference on the CPU, one frame at a time with OpenCV,
from the network's low-resolution outputs to the uint8 foreground and float alpha `Matter`
returns: OpenCV's box filter and bilinear upsampling cost a fraction of PyTorch's there, and the
full-resolution passes read the uint8 frame as it is, without a float copy of it.
"""
from __future__ import annotations

from typing import Tuple

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["FastGuidedFilter", "GuidedRefiner", "refine_frame"]

# Rows of a full-resolution strip in refine_frame: its float buffers (~0.7 MB each at 1920
# wide) stay in the cache, and there are few enough strips for Python's per-call cost not to show.
_STRIP_ROWS = 64


def _upsample(x: torch.Tensor, size: list[int]) -> torch.Tensor:
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


class FastGuidedFilter(nn.Module):
    """Channel-wise fast guided filter.

    Args:
        radius: box radius at low resolution (window `2r+1`).
        eps: regulariser; larger values smooth more.

    Shapes: `lr_x`, `lr_y` `[N,C,h,w]`, `hr_x` `[N,C,H,W]` -> `[N,C,H,W]`.
    """

    def __init__(self, radius: int = 1, eps: float = 1e-5) -> None:
        super().__init__()
        self.radius = radius
        self.eps = eps

    def box(self, x: torch.Tensor) -> torch.Tensor:
        """Mean over a `(2r+1)^2` window, normalised by the number of pixels inside the image."""
        # A depthwise convolution (oneDNN's fast path, channels-last) and a one-channel count map.
        # Measured at 512x288 x 16 channels: 2.8 ms, against 15 ms for avg_pool2d and 36 ms for
        # channels folded into the batch of a one-channel convolution.
        k = 2 * self.radius + 1
        c = int(x.shape[1])  # a constant in traced graphs (ONNX needs a kernel of known shape)
        weight = torch.ones(c, 1, k, k, dtype=x.dtype, device=x.device)
        total = F.conv2d(x.contiguous(memory_format=torch.channels_last), weight, padding=self.radius, groups=c)
        count = F.conv2d(torch.ones_like(x[:, :1]), weight[:1], padding=self.radius)
        return (total / count).contiguous()

    def coefficients(self, lr_x: torch.Tensor, lr_y: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Low-resolution linear model `(A, b)`, each `[N,C,h,w]`, with `lr_y ~ A * lr_x + b` locally."""
        c = lr_x.shape[1]
        # One layout for both: the network's outputs are channels-last after optimize_for_inference,
        # and mixing layouts made every element-wise op below strided. With the depthwise box
        # filter, this fit at 512x288 went from 38 to 11 ms (the whole refiner at 1080p: 64 -> 38 ms).
        lr_x, lr_y = lr_x.contiguous(), lr_y.contiguous()
        # The four window means in one call.
        means = self.box(torch.cat([lr_x, lr_y, lr_x * lr_y, lr_x * lr_x], dim=1))
        mean_x, mean_y = means[:, :c], means[:, c:2 * c]
        cov_xy = means[:, 2 * c:3 * c] - mean_x * mean_y
        var_x = means[:, 3 * c:] - mean_x * mean_x
        a = cov_xy / (var_x + self.eps)
        b = mean_y - a * mean_x
        return a, b

    def forward(self, lr_x: torch.Tensor, lr_y: torch.Tensor, hr_x: torch.Tensor) -> torch.Tensor:
        """Apply the linear model fitted on (`lr_x`, `lr_y`) to `hr_x`."""
        a, b = self.coefficients(lr_x, lr_y)
        return apply_linear(a, b, hr_x)


def apply_linear(a: torch.Tensor, b: torch.Tensor, hr_x: torch.Tensor) -> torch.Tensor:
    """`up(a) * hr_x + up(b)` at `hr_x`'s size: `a`, `b` `[N,C,h,w]`, `hr_x` `[N,C or 1,H,W]` -> `[N,C,H,W]`."""
    size = [hr_x.shape[2], hr_x.shape[3]]
    big_a = _upsample(a, size)
    big_b = _upsample(b, size)
    if torch.is_grad_enabled():
        return torch.addcmul(big_b, big_a, hr_x)
    # Without autograd the upsampled buffer takes the result: one full-resolution pass and allocation less.
    return big_b.addcmul_(big_a, hr_x)


class GuidedRefiner(nn.Module):
    """Upsample foreground and alpha by the full-resolution frame.

    Foreground channel k is guided by image channel k, alpha by the image's grey level (mean of RGB).

    Shapes: `src` `[N,3,H,W]`, `src_lr` `[N,3,h,w]`, `fgr_lr` `[N,3,h,w]`, `pha_lr` `[N,1,h,w]`
    -> (`fgr` `[N,3,H,W]`, `pha` `[N,1,H,W]`), clamped to [0,1].
    """

    def __init__(self, radius: int = 1, eps: float = 1e-5) -> None:
        super().__init__()
        self.filter = FastGuidedFilter(radius, eps)

    def forward(self, src: torch.Tensor, src_lr: torch.Tensor, fgr_lr: torch.Tensor, pha_lr: torch.Tensor
                ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Full-resolution (fgr, pha)."""
        # A frame made from an HWC image is channels-last; bilinear upsampling writes NCHW, and
        # mixing the two layouts made every full-resolution op strided (about 20% slower at 1080p).
        src = src.contiguous()
        lr_x = torch.cat([src_lr, src_lr.mean(1, keepdim=True)], dim=1)
        a, b = self.filter.coefficients(lr_x, torch.cat([fgr_lr, pha_lr], dim=1))
        fgr = apply_linear(a[:, :3], b[:, :3], src)
        pha = apply_linear(a[:, 3:], b[:, 3:], src.mean(1, keepdim=True))
        if torch.is_grad_enabled():
            return fgr.clamp(0.0, 1.0), pha.clamp(0.0, 1.0)
        return fgr.clamp_(0.0, 1.0), pha.clamp_(0.0, 1.0)



def refine_frame(src_lr: np.ndarray, fgr_lr: np.ndarray, pha_lr: np.ndarray, frame: np.ndarray,
                 radius: int = 1, eps: float = 1e-5, curve: Tuple[float, float] = (1.0, 0.5)
                 ) -> Tuple[np.ndarray, np.ndarray]:
    """`GuidedRefiner` on one frame with OpenCV, then the alpha through `output_curve(gain, centre)` = `curve`:
    `src_lr`, `fgr_lr` float32 `[h,w,3]`, `pha_lr` `[h,w]`, `frame` uint8 `[H,W,3]` -> (fgr uint8 `[H,W,3]`, pha float32 `[H,W]`)."""
    # The same fit (window means over the pixels inside the image), bilinear upsampling (cv2's
    # INTER_LINEAR has F.interpolate's half-pixel centres) and clamps as GuidedRefiner.forward:
    # equal to it within float rounding.
    height, width = frame.shape[:2]
    k = (2 * radius + 1, 2 * radius + 1)
    # Foreground channels guided by the frame's, alpha (last) by its grey level: 4 channels at once.
    x = np.concatenate([src_lr, src_lr.mean(axis=2, keepdims=True)], axis=2)
    y = np.concatenate([fgr_lr, pha_lr[..., None]], axis=2)
    inv_count = 1.0 / cv2.boxFilter(np.ones(pha_lr.shape, np.float32), -1, k, normalize=False,
                                    borderType=cv2.BORDER_CONSTANT)

    def mean(v: np.ndarray) -> np.ndarray:
        total = cv2.boxFilter(v, -1, k, normalize=False, borderType=cv2.BORDER_CONSTANT)
        return total * inv_count[..., None]

    mean_x, mean_y = mean(x), mean(y)
    a = (mean(x * y) - mean_x * mean_y) / (mean(x * x) - mean_x * mean_x + eps)
    b = mean_y - a * mean_x

    # Bilinear upsampling split in two (it is separable): rows first, at the low width, for the
    # whole frame, then columns strip by strip, so that each strip's float intermediates stay in
    # the cache; full-resolution float buffers, one per pass, made this step memory-bound.
    def rows(v: np.ndarray) -> np.ndarray:
        return cv2.resize(np.ascontiguousarray(v), (v.shape[1], height), interpolation=cv2.INTER_LINEAR)

    # The frame's 1/255 and the grey level's 1/3 go into the coefficients at low resolution, so the
    # full-resolution passes read the uint8 frame as it is; the foreground is computed on the
    # 0..255 scale, where the saturating conversion to uint8 is the clamp and the rounding.
    # The output curve is affine up to its clamp, and bilinear upsampling commutes with an affine
    # map: it goes into the alpha's coefficients too, which spares three full-resolution passes.
    gain, centre = (float(v) for v in curve)
    if gain <= 0:
        raise ValueError(f"output curve gain must be positive, got {gain}")
    a_fgr, b_fgr = rows(a[..., :3]), rows(b[..., :3] * 255.0)
    a_pha, b_pha = rows(a[..., 3] * (gain / 765.0)), rows((b[..., 3] - centre) * gain + 0.5)
    fgr = np.empty((height, width, 3), np.uint8)
    pha = np.empty((height, width), np.float32)
    for top in range(0, height, _STRIP_ROWS):
        strip = slice(top, min(top + _STRIP_ROWS, height))
        n = strip.stop - strip.start

        def cols(v: np.ndarray) -> np.ndarray:
            return cv2.resize(v[strip], (width, n), interpolation=cv2.INTER_LINEAR)

        cv2.add(cv2.multiply(cols(a_fgr), frame[strip], dtype=cv2.CV_32F), cols(b_fgr), dst=fgr[strip],
                dtype=cv2.CV_8U)
        r, g, bl = cv2.split(frame[strip])
        grey = cv2.add(cv2.add(r, g, dtype=cv2.CV_16U), bl, dtype=cv2.CV_16U)  # r + g + b, exact
        cv2.add(cv2.multiply(cols(a_pha), grey, dtype=cv2.CV_32F), cols(b_pha), dst=pha[strip])
    # clamp(curve(clamp(x, 0, 1)), 0, 1) of an increasing curve: clamp(curve(x)) to the curve's values at 0 and 1
    low, high = (min(max((v - centre) * gain + 0.5, 0.0), 1.0) for v in (0.0, 1.0))
    np.clip(pha, low, high, out=pha)
    return fgr, pha
