"""PriorCalibration: a learned lookup table that maps the prior's probability to alpha.

A segmentation model's person probability is not an alpha matte: near edges it is spread over
more pixels than the person covers, by an amount that comes mostly from the prior model (though
it varies between people too).
A per-value map of the prior is the cheapest correction there is to learn (the best table under
an L1 loss is the per-value median of the true alpha, and the loss is convex in the table's
entries), so the network's residual is added to the calibrated prior instead of the raw one.
"""
from __future__ import annotations

import torch
from torch import nn

__all__ = ["PriorCalibration"]


class PriorCalibration(nn.Module):
    """Piecewise-linear map of `[N,1,H,W]` probabilities in [0,1] through `knots` equally spaced knots.

    The map is `p + d(p)`, `d` interpolated between per-knot offsets that start at zero, so an
    untrained net returns the prior bit for bit. Indexing a 1-D table with a tensor traces and
    exports (ONNX `Gather`) and costs a few passes over one channel.
    """

    def __init__(self, knots: int) -> None:
        super().__init__()
        if knots < 2:
            raise ValueError(f"PriorCalibration needs at least 2 knots, got {knots}")
        self.knots = int(knots)
        self.delta = nn.Parameter(torch.zeros(self.knots))

    def forward(self, prior: torch.Tensor) -> torch.Tensor:
        """`[N,1,H,W]` calibrated prior (values outside [0,1] are clamped to the table's ends first)."""
        p = prior.clamp(0.0, 1.0)
        x = p * (self.knots - 1)
        index = x.detach().floor().clamp(0, self.knots - 2).long()
        frac = x - index.to(x.dtype)
        low = self.delta[index]
        high = self.delta[index + 1]
        return p + (low + frac * (high - low))
