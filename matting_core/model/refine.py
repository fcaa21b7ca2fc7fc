"""Fast guided filter (He & Sun, 2015; Wu et al., 2018): upsample low-resolution mattes by the image.

Used by `MattingNet`'s `downsample_ratio` path: the network runs at low resolution, then a local
linear model `y = A * x + b` fitted at low resolution (x the image, y alpha/foreground) is
upsampled and applied to the full-resolution image, so edges follow the full-resolution image
while memory and compute at full resolution stay a few element-wise operations.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["FastGuidedFilter", "GuidedRefiner"]


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
        k = 2 * self.radius + 1
        return F.avg_pool2d(x, k, stride=1, padding=self.radius, count_include_pad=False)

    def forward(self, lr_x: torch.Tensor, lr_y: torch.Tensor, hr_x: torch.Tensor) -> torch.Tensor:
        """Apply the linear model fitted on (`lr_x`, `lr_y`) to `hr_x`."""
        mean_x = self.box(lr_x)
        mean_y = self.box(lr_y)
        cov_xy = self.box(lr_x * lr_y) - mean_x * mean_y
        var_x = self.box(lr_x * lr_x) - mean_x * mean_x
        a = cov_xy / (var_x + self.eps)
        b = mean_y - a * mean_x
        size = [hr_x.shape[2], hr_x.shape[3]]
        a = F.interpolate(a, size=size, mode="bilinear", align_corners=False)
        b = F.interpolate(b, size=size, mode="bilinear", align_corners=False)
        return torch.addcmul(b, a, hr_x)  # one pass over the full-resolution tensors instead of two


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
                ):
        """Full-resolution (fgr, pha)."""
        lr_x = torch.cat([src_lr, src_lr.mean(1, keepdim=True)], dim=1)
        hr_x = torch.cat([src, src.mean(1, keepdim=True)], dim=1)
        out = self.filter(lr_x, torch.cat([fgr_lr, pha_lr], dim=1), hr_x).clamp(0.0, 1.0)
        return out[:, :3], out[:, 3:]
