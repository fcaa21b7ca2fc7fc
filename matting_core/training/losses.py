"""Matting losses on clips: spatial alpha and foreground terms, and temporal terms on the true flow.

Every function takes `[B,T,C,H,W]` predictions, as the network gives them **before its clamp**
(`MattingNet.forward(..., clamp=False)`): where the prior is saturated and the residual
overshoots, the clamped output has no gradient, the sum before it does.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["warp", "laplacian_pyramid", "laplacian_loss", "sobel", "matting_losses", "TERMS"]

TERMS = ("l1", "mse", "laplacian", "grad", "fgr", "temporal_warp", "temporal_diff")


def warp(x: torch.Tensor, flow: torch.Tensor) -> torch.Tensor:
    """Backward warp `out(p) = x(p + flow(p))`, bilinear, border replicated (DESIGN.md flow convention).

    `x` `[B,C,H,W]` (frame t-1), `flow` `[B,2,H,W]` backward flow of frame t in pixels -> `[B,C,H,W]`;
    the same as `matting_core.flow.warp` (OpenCV remap with map = grid + flow), differentiable.
    """
    B, _, H, W = x.shape
    ys = torch.arange(H, dtype=flow.dtype, device=flow.device).view(1, H, 1)
    xs = torch.arange(W, dtype=flow.dtype, device=flow.device).view(1, 1, W)
    # align_corners=True: -1 and 1 are the centres of the first and last pixels.
    gx = (xs + flow[:, 0]) * (2.0 / max(W - 1, 1)) - 1.0
    gy = (ys + flow[:, 1]) * (2.0 / max(H - 1, 1)) - 1.0
    grid = torch.stack([gx, gy], dim=-1)  # [B,H,W,2]
    return F.grid_sample(x, grid.to(x.dtype), mode="bilinear", padding_mode="border", align_corners=True)


def _gauss_kernel(device, dtype) -> torch.Tensor:
    k = torch.tensor([1.0, 4.0, 6.0, 4.0, 1.0], device=device, dtype=dtype)
    k = torch.outer(k, k)
    return (k / k.sum()).view(1, 1, 5, 5)


def laplacian_pyramid(x: torch.Tensor, levels: int = 5) -> list[torch.Tensor]:
    """The first `levels` band-pass levels of `x` `[N,1,H,W]`, fine to coarse (fewer for small maps)."""
    kernel = _gauss_kernel(x.device, x.dtype)
    out = []
    current = x
    for _ in range(levels):
        if min(current.shape[-2:]) < 4:
            break
        blurred = F.conv2d(F.pad(current, [2, 2, 2, 2], mode="replicate"), kernel)
        down = blurred[:, :, ::2, ::2]
        up = F.interpolate(down, size=current.shape[-2:], mode="bilinear", align_corners=False)
        out.append(current - up)
        current = down
    return out


def laplacian_loss(pred: torch.Tensor, true: torch.Tensor, levels: int = 5) -> torch.Tensor:
    """Mean over levels of 2^level * L1 between Laplacian pyramids of `[N,1,H,W]` maps (as Robust Video Matting)."""
    pairs = list(zip(laplacian_pyramid(pred, levels), laplacian_pyramid(true, levels)))
    loss = pred.new_zeros(())
    for i, (p, t) in enumerate(pairs):
        loss = loss + (2 ** i) * F.l1_loss(p, t)
    return loss / max(len(pairs), 1)


def sobel(x: torch.Tensor) -> torch.Tensor:
    """Sobel derivatives `[N,2,H,W]` (x then y) of `[N,1,H,W]`, replicate-padded."""
    kx = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]], device=x.device, dtype=x.dtype) / 8
    weight = torch.stack([kx, kx.t()]).unsqueeze(1)  # [2,1,3,3]
    return F.conv2d(F.pad(x, [1, 1, 1, 1], mode="replicate"), weight)


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of `values` where `mask` (broadcast, 0/1 or weights) is set; 0 (with a graph) when it is empty."""
    mask = mask.expand_as(values)
    return (values * mask).sum() / mask.sum().clamp_min(1.0)


def matting_losses(pred_pha: torch.Tensor, pred_fgr: torch.Tensor, batch, weights,
                   context_frames: int = 0) -> dict[str, torch.Tensor]:
    """The recipe's loss terms for one clip batch, and their weighted sum `total`.

    `pred_pha` `[B,T,1,H,W]` and `pred_fgr` `[B,T,3,H,W]` before the network's clamp; `batch` a
    `Batch` of the same frames; `weights` a `LossWeights`. The first `context_frames` frames
    only serve as frame t-1 of the temporal terms (truncated back-propagation passes the last,
    detached, prediction of the previous chunk this way); spatial terms skip them.
    Terms (each a mean, so weights do not depend on the batch or frame size):
    - l1: |alpha_p - alpha_t|; mse: (alpha_p - alpha_t)^2; laplacian: Laplacian-pyramid L1; grad: Sobel-gradient L1;
    - fgr: |F_p - F_t| over pixels with true alpha > 0;
    - temporal_warp: |(a_t - W(a_{t-1})) - (t_t - W(t_{t-1}))| with W the warp by the true flow,
      over pixels where `batch.flow_valid` is set and the truth is consistent under the flow
      (|t_t - W(t_{t-1})| < `weights.truth_tolerance`): the prediction must follow the
      person's motion, and change only where the true alpha changes along it;
    - temporal_diff: ((a_t - a_{t-1}) - (t_t - t_{t-1}))^2, the square of dtSSD's difference.
    """
    c = int(context_frames)
    B, T = pred_pha.shape[:2]
    pred_pha, pred_fgr = pred_pha.float(), pred_fgr.float()
    true_pha, true_fgr = batch.pha.float(), batch.fgr.float()
    if true_pha.shape != pred_pha.shape:
        raise ValueError(f"prediction {tuple(pred_pha.shape)} and batch {tuple(true_pha.shape)} differ")

    p = pred_pha[:, c:].flatten(0, 1)  # [N,1,H,W]
    t = true_pha[:, c:].flatten(0, 1)
    terms: dict[str, torch.Tensor] = {}
    terms["l1"] = F.l1_loss(p, t)
    terms["mse"] = F.mse_loss(p, t)
    terms["laplacian"] = laplacian_loss(p, t)
    terms["grad"] = F.l1_loss(sobel(p), sobel(t))
    terms["fgr"] = _masked_mean((pred_fgr[:, c:] - true_fgr[:, c:]).abs(), (true_pha[:, c:] > 0).float())

    first = max(c, 1)
    if T > first:
        a_t, a_prev = pred_pha[:, first:], pred_pha[:, first - 1:-1]
        t_t, t_prev = true_pha[:, first:], true_pha[:, first - 1:-1]
        flow = batch.flow[:, first:].float().flatten(0, 1)
        warped = warp(torch.cat([a_prev.flatten(0, 1), t_prev.flatten(0, 1)], dim=1), flow)  # one sampling pass
        wa, wt = warped[:, :1], warped[:, 1:]
        true_change = t_t.flatten(0, 1) - wt
        mask = batch.flow_valid[:, first:].float().flatten(0, 1) * (true_change.abs() < weights.truth_tolerance)
        terms["temporal_warp"] = _masked_mean(((a_t.flatten(0, 1) - wa) - true_change).abs(), mask)
        terms["temporal_diff"] = F.mse_loss(a_t - a_prev, t_t - t_prev)
    else:
        zero = pred_pha.sum() * 0.0
        terms["temporal_warp"] = zero
        terms["temporal_diff"] = zero
    terms["total"] = sum(float(getattr(weights, name)) * terms[name] for name in TERMS)
    return terms
