"""Building blocks of MattingNet: light convolutions, a ConvLSTM cell and attention gates.

Every block works on one frame `[N,C,H,W]`; the network folds time into the batch (`[B*T,C,H,W]`)
everywhere except in the ConvLSTM, which steps through time.
"""
from __future__ import annotations

from typing import List, Tuple

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ConvBNReLU", "SeparableConv", "DecoderBlock", "ConvLSTM", "AttentionGate", "unfold_time"]


def unfold_time(x: torch.Tensor, B: int, T: int) -> torch.Tensor:
    """`[B*T,C,H,W] -> [B,T,C,H,W]` (a reshape with explicit sizes, which traces shape-generically)."""
    return x.reshape([B, T, x.shape[1], x.shape[2], x.shape[3]])


class ConvBNReLU(nn.Sequential):
    """Convolution, batch norm, ReLU: `[N,Cin,H,W] -> [N,Cout,H,W]`."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 1) -> None:
        super().__init__(
            nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )


class SeparableConv(nn.Sequential):
    """Depthwise 3x3 then pointwise 1x1 (+BN+ReLU): a 3x3 receptive field at about 1/8 of the cost.

    Args:
        in_channels: input channels.
        out_channels: output channels.
        activate: add batch norm and ReLU after the pointwise convolution.
    """

    def __init__(self, in_channels: int, out_channels: int, activate: bool = True) -> None:
        layers: List[nn.Module] = [
            nn.Conv2d(in_channels, in_channels, 3, padding=1, groups=in_channels, bias=False),
            nn.Conv2d(in_channels, out_channels, 1, bias=not activate),
        ]
        if activate:
            layers += [nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True)]
        super().__init__(*layers)


class DecoderBlock(nn.Sequential):
    """Two separable 3x3 convolutions: `[N,Cin,H,W] -> [N,Cout,H,W]`."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(SeparableConv(in_channels, out_channels), SeparableConv(out_channels, out_channels))


class ConvLSTM(nn.Module):
    """Convolutional LSTM over a skip connection; returns `concat(skip, h)` for the decoder.

    The gates are a depthwise-separable 3x3 convolution of `concat(x, h)`, computed as the sum of
    an input part and a hidden part. The input part has no recurrence, so a clip computes it for
    all frames in one batched call; only the (small) hidden part runs per time step. Being
    separable keeps the cost of the high-resolution skips low on CPUs.

    Args:
        in_channels: channels of the skip feature `x`.
        hidden_channels: channels of the hidden and cell states.

    Shapes: `x` `[B,T,C,H,W]`, `h`/`c` `[B,Hc,H,W]` (or anything that broadcasts to it, such as a
    `[1,1,1,1]` zero tensor, which starts a video); output `[B,T,C+Hc,H,W]` and the new `(h, c)`.
    """

    def __init__(self, in_channels: int, hidden_channels: int) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.hidden_channels = hidden_channels
        self.input_gates = nn.Sequential(
            nn.Conv2d(in_channels, in_channels, 3, padding=1, groups=in_channels, bias=False),
            nn.Conv2d(in_channels, 4 * hidden_channels, 1, bias=True),
        )
        self.hidden_gates = nn.Sequential(
            nn.Conv2d(hidden_channels, hidden_channels, 3, padding=1, groups=hidden_channels, bias=False),
            nn.Conv2d(hidden_channels, 4 * hidden_channels, 1, bias=False),
        )
        with torch.no_grad():
            # A forget-gate bias of 1 keeps the memory early in training (Jozefowicz et al., 2015).
            self.input_gates[1].bias.zero_()
            self.input_gates[1].bias[hidden_channels:2 * hidden_channels].fill_(1.0)

    def forward(self, x: torch.Tensor, h: torch.Tensor, c: torch.Tensor
                ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One clip `[B,T,C,H,W]` from state `(h, c)`: returns (`[B,T,C+Hc,H,W]`, h, c)."""
        B, T = x.shape[0], x.shape[1]
        x_gates = unfold_time(self.input_gates(x.flatten(0, 1)), B, T)  # [B,T,4Hc,H,W]
        # expand_as a tensor (not to a list of sizes) keeps the traced shape symbolic for ONNX.
        like = x_gates[:, 0, : self.hidden_channels]  # [B,Hc,H,W]
        h = h.expand_as(like)
        c = c.expand_as(like)
        hs: List[torch.Tensor] = []
        for t in range(T):
            gates = x_gates[:, t] + self.hidden_gates(h)
            i, f, g, o = gates.chunk(4, dim=1)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            h = torch.sigmoid(o) * torch.tanh(c)
            hs.append(h)
        return torch.cat([x, torch.stack(hs, dim=1)], dim=2), h, c


class AttentionGate(nn.Module):
    """Additive attention gate (Oktay et al., "Attention U-Net", 2018) on a skip connection.

    `out = x * sigmoid(psi(relu(theta(x) + up(phi(g)))))`: one coefficient per pixel of the skip
    `x`, driven by the gating signal `g`, the decoder's coarser (more semantic) feature. The decoder
    knows where the person is; the gate lets the fine, high-resolution skip through there and damps
    background texture elsewhere, which is what causes the holes and halos of a plain U-Net skip.
    `phi(g)` is computed at g's own (coarser) resolution and upsampled, so the gate is cheap. A
    `[N,Cg,1,1]` `g` (the global context used at the deepest skip) broadcasts over the image.

    Args:
        skip_channels: channels of `x`.
        gate_channels: channels of `g`.
        inter_channels: width of the attention's hidden layer.
        global_gate: `g` is `[N,Cg,1,1]` and broadcasts instead of being upsampled.
        projected: `g` is already `up(phi(g))` at x's resolution (`[N,inter,H,W]`): the caller
            computed it together with its own projections (see `LightDecoderLevel`); no `phi` here.
    """

    def __init__(self, skip_channels: int, gate_channels: int, inter_channels: int,
                 global_gate: bool = False, projected: bool = False) -> None:
        super().__init__()
        self.global_gate = global_gate
        self.projected = projected
        self.theta = nn.Conv2d(skip_channels, inter_channels, 1, bias=False)
        self.phi = nn.Identity() if projected else nn.Conv2d(gate_channels, inter_channels, 1, bias=True)
        self.psi = nn.Conv2d(inter_channels, 1, 1, bias=True)

    def coefficients(self, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """Attention map `[N,1,H,W]` in [0,1] for skip `x` `[N,C,H,W]` and gate `g` `[N,Cg,h,w]`."""
        gate = self.phi(g)
        if not self.global_gate and not self.projected:
            gate = F.interpolate(gate, size=[x.shape[2], x.shape[3]], mode="bilinear", align_corners=False)
        return torch.sigmoid(self.psi(F.relu(self.theta(x) + gate)))

    def forward(self, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """Gated skip `[N,C,H,W]`."""
        return x * self.coefficients(x, g)
