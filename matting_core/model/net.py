"""MattingNet: a MobileNetV2 U-Net with a ConvLSTM and an attention gate on every skip connection.

Input: frames and a person prior; output: alpha, foreground colour and the recurrent state, which
is passed in and returned explicitly (a flat list of tensors) so the model streams, scripts and exports.
"""
from __future__ import annotations

import math
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from matting_core.model.backbone import SKIP_CHANNELS, SKIP_INDICES, load_backbone_weights, mobilenet_v2_encoder
from matting_core.model.calibration import PriorCalibration
from matting_core.model.blocks import (AttentionGate, ConvBNReLU, ConvLSTM, DecoderBlock, SeparableConv,
                                       unfold_time)
from matting_core.model.refine import GuidedRefiner
from matting_core.prior import resolve_prior_spec

__all__ = ["MattingNet", "matting_net", "downsample", "downsample_image", "ARCH_VERSION"]

# Checkpoints whose config has no "arch" key were written by version 1 (see MattingNet).
ARCH_VERSION = 2

_MEAN = (0.485, 0.456, 0.406)
_STD = (0.229, 0.224, 0.225)


class MattingNet(nn.Module):
    """Person matting U-Net on `mobilenet_v2` features, recurrent over time.

    Encoder: TorchVision's `mobilenet_v2().features[:18]` on 4 channels (RGB + prior); skips
    from `features` indices 1, 3, 6, 13, 17 (strides 2..32). On every skip, a `ConvLSTM` carries
    state across frames, then an `AttentionGate` driven by the decoder's next-coarser feature
    (image-level context, the skip's global average, at the deepest skip) weighs it before the
    decoder concatenates it with its upsampled features. The head, at full resolution, sees the
    input again and predicts residuals added to the calibrated prior (alpha: `PriorCalibration`,
    a learned per-value map of the prior's probability, identity at the start) and to the input
    colour (foreground); its last layer starts at zero, so an untrained net returns the prior.

    Architecture versions (`arch`, stored in the config; checkpoints without it are version 1):
    version 2 (the default) keeps every structural element of version 1 (encoder, skips, a
    ConvLSTM and an attention gate on every skip, a full-resolution head that sees the input) and
    moves work off the two finest resolutions, which cost as much as the whole encoder on CPUs:
    - the head (`LightHead`) projects the stride-2 decoder feature with a 1x1 convolution *before*
      upsampling it (a 1x1 convolution commutes with bilinear upsampling, so only the depthwise
      3x3 over the upsampled decoder feature is dropped) and adds a dense 3x3 convolution of the
      full-resolution input, which keeps the full-resolution receptive field on image edges;
    - the stride-4 and stride-2 decoder levels (`LightDecoderLevel`) upsample the coarse feature
      once, already projected to their output width and to the attention gate's signal, and
      convolve after the (linear) merge instead of over a 72- or 44-channel concatenation (the
      stride-4 level keeps a second separable convolution, as in version 1).
    Together they cut streaming at 512x288 by about 14 ms/frame on 2 CPU threads.
    `optimize_for_inference` (matting_core.model.optimize) folds batch norms and switches to
    channels-last for inference.

    Args:
        lstm_channels: hidden channels of the five ConvLSTMs, shallow to deep.
        decoder_channels: decoder widths at strides 32, 16, 8, 4, 2.
        head_channels: width of the full-resolution head (8 in version 2: its cost is per full-resolution pixel).
        attention_channels: hidden width of each attention gate (at most the skip's width).
        refine_radius, refine_eps: fast guided filter of the `downsample_ratio` path (training
            fits the radius with the output curve, `engine.fit_output`).
        prior: the prior stream the model learns and is used with (a `resolve_prior_spec` input;
            recorded resolved, so inference rebuilds exactly it whatever the defaults become).
        arch: architecture version, 1 or 2 (see above).
        prior_calibration: knots of the `PriorCalibration` table (0: none, the residual is added
            to the raw prior; checkpoints written before it existed load with 0).
        work_side: longer side of the frames the network was trained on (None: not recorded).
            Convolutions are not scale-invariant: `Matter` runs the network at this scale by
            default (its input downsampled, the output upsampled by the guided refiner), so a
            person at inference is as many pixels tall as the people it learned on.
        output_curve: (gain, centre) of the contrast curve the clamped (and refined) alpha goes through,
            `clamp((alpha - centre) * gain + 0.5, 0, 1)`; (1, 0.5), the default, leaves it as it is.
            Training fits it on validation clips after the last step (`engine.fit_output`):
            a briefly trained net's alpha is too soft on people it has not seen, and one monotone
            curve is the cheapest correction. Not applied with `clamp=False` (the training losses).

    Shapes: `src` `[B,T,3,H,W]` (or `[B,3,H,W]`), `prior` `[B,T,1,H,W]` (or `[B,1,H,W]`), values in
    [0,1], any H and W. Returns `pha` `[B,T,1,H,W]` and `fgr` `[B,T,3,H,W]` in [0,1] (4-D for 4-D
    input) and the new state.
    """

    __jit_unused_properties__ = ["encoder", "state_channels", "output_conv"]

    def __init__(self,
                 lstm_channels: Sequence[int] = (4, 8, 16, 32, 64),
                 decoder_channels: Sequence[int] = (96, 64, 40, 24, 12),
                 head_channels: int = 8,
                 attention_channels: int = 16,
                 refine_radius: int = 1,
                 refine_eps: float = 1e-5,
                 prior: Optional[Dict[str, Any]] = None,
                 arch: int = ARCH_VERSION,
                 prior_calibration: int = 11,
                 work_side: Optional[int] = None,
                 output_curve: Sequence[float] = (1.0, 0.5)) -> None:
        super().__init__()
        if arch not in (1, 2):
            raise ValueError(f"arch must be 1 or 2, got {arch!r}")
        if len(lstm_channels) != len(SKIP_INDICES) or len(decoder_channels) != len(SKIP_INDICES):
            raise ValueError(f"lstm_channels and decoder_channels need {len(SKIP_INDICES)} entries each")
        self.config: Dict[str, Any] = {
            "lstm_channels": [int(c) for c in lstm_channels],
            "decoder_channels": [int(c) for c in decoder_channels],
            "head_channels": int(head_channels),
            "attention_channels": int(attention_channels),
            "refine_radius": int(refine_radius),
            "refine_eps": float(refine_eps),
            "prior": resolve_prior_spec(prior),
            "arch": int(arch),
            "prior_calibration": int(prior_calibration),
            "work_side": None if work_side is None else int(work_side),
        }
        self.curve_gain, self.curve_centre = 1.0, 0.5
        self.set_output_curve(*output_curve)
        if work_side is not None and int(work_side) < 32:
            raise ValueError(f"work_side must be at least 32 px, got {work_side!r}")
        self.arch = int(arch)
        # Set by optimize_for_inference: inputs are converted to channels-last, the weights' layout.
        self.channels_last = False
        self.register_buffer("mean", torch.tensor(_MEAN + (0.5,)).view(1, 4, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(_STD + (0.5,)).view(1, 4, 1, 1), persistent=False)
        # (x - mean) / std as one multiply-add pass over the full-resolution input.
        self.register_buffer("scale", 1.0 / self.std, persistent=False)
        self.register_buffer("shift", -self.mean / self.std, persistent=False)

        encoder = mobilenet_v2_encoder(in_channels=4)
        bounds = [0] + [i + 1 for i in SKIP_INDICES]
        # stages[k] maps skip k-1 to skip k (features[bounds[k]:bounds[k+1]]).
        self.stages = nn.ModuleList(encoder[a:b] for a, b in zip(bounds[:-1], bounds[1:]))
        self.lstms = nn.ModuleList(ConvLSTM(c, h) for c, h in zip(SKIP_CHANNELS, lstm_channels))
        skip_out = [c + h for c, h in zip(SKIP_CHANNELS, lstm_channels)]
        dec = [int(c) for c in decoder_channels]  # strides 32, 16, 8, 4, 2
        self.bottleneck = Bottleneck(skip_out[4], dec[0], attention_channels)
        # Coarse to fine: level i fuses decoder width dec[i] with skip 3-i (strides 16, 8, 4, 2).
        # The stride-2 level (i = 3) uses one separable conv instead of two: at 1/4 of the pixels of
        # the frame it was the costliest decoder step on CPUs (memory-bound), for little receptive field.
        levels: List[nn.Module] = [
            DecoderLevel(skip_out[3 - i], dec[i], dec[i + 1], attention_channels) for i in range(2 if arch == 2 else 3)]
        if arch == 1:
            levels.append(DecoderLevel(skip_out[0], dec[3], dec[4], attention_channels, convs=1))
            self.head: nn.Module = SeparableHead(dec[4], 4, head_channels)
        else:
            # Half the gate width at strides 4 and 2: its map is one coefficient per pixel either way.
            light_gate = max(4, attention_channels // 2)
            levels.append(LightDecoderLevel(skip_out[1], dec[2], dec[3], light_gate, convs=2))
            levels.append(LightDecoderLevel(skip_out[0], dec[3], dec[4], light_gate, convs=1))
            self.head = LightHead(dec[4], 4, head_channels)
        self.levels = nn.ModuleList(levels)
        # Alpha and foreground are residuals over the prior and the input colour, and the last layer
        # starts at zero: an untrained net returns the prior as alpha and the frame as foreground (a
        # usable matte, not noise), and training learns the correction. Its weights still get gradients.
        nn.init.zeros_(self.output_conv.weight)
        nn.init.zeros_(self.output_conv.bias)
        self.refiner = GuidedRefiner(refine_radius, refine_eps)
        self.calibration = PriorCalibration(prior_calibration) if prior_calibration else None

    @torch.jit.unused
    def set_output_curve(self, gain: float, centre: float) -> None:
        """Make alpha go through `clamp((alpha - centre) * gain + 0.5, 0, 1)` (recorded in `config`)."""
        if not gain > 0 or not 0.0 <= centre <= 1.0:
            raise ValueError(f"output_curve needs gain > 0 and centre in [0, 1], got ({gain}, {centre})")
        self.curve_gain, self.curve_centre = float(gain), float(centre)
        self.config["output_curve"] = [self.curve_gain, self.curve_centre]

    @torch.jit.unused
    def set_refine_radius(self, radius: int) -> None:
        """Make the guided refiner of the `downsample_ratio` path use box radius `radius` (recorded in `config`)."""
        if int(radius) != radius or radius < 1:
            raise ValueError(f"refine_radius must be a positive integer, got {radius!r}")
        self.refiner.filter.radius = int(radius)
        self.config["refine_radius"] = int(radius)

    @property
    def encoder(self) -> nn.Sequential:
        """The encoder as TorchVision's `features[:18]` (same modules as `stages`, indices 0..17)."""
        return nn.Sequential(*[m for stage in self.stages for m in stage])

    @property
    def output_conv(self) -> nn.Conv2d:
        """The head's last 1x1 convolution (`[N,hidden,H,W] -> [N,4,H,W]`: alpha and foreground residuals)."""
        return self.head.out if self.arch == 2 else self.head[1]

    def skip_modules(self) -> List[Tuple[int, ConvLSTM, AttentionGate]]:
        """(features index, ConvLSTM, AttentionGate) for each skip, shallow to deep."""
        gates = [level.gate for level in self.levels][::-1] + [self.bottleneck.gate]
        return list(zip(SKIP_INDICES, list(self.lstms), gates))

    # ---------------------------------------------------------------- state
    @property
    def state_channels(self) -> List[int]:
        """Channels of each state tensor, in the order of the state list (h0, c0, h1, c1, ...)."""
        return [h for h in self.config["lstm_channels"] for _ in range(2)]

    def initial_state(self, batch: int, height: int, width: int, downsample_ratio: float = 1.0,
                      device: Optional[torch.device] = None) -> List[torch.Tensor]:
        """Zero state for frames of `height` x `width` (what `state=None` uses)."""
        h, w = _work_size(height, width, downsample_ratio)
        h, w = _pad32(h), _pad32(w)
        out = []
        for k, hidden in enumerate(self.config["lstm_channels"]):
            stride = 2 ** (k + 1)
            z = torch.zeros(batch, hidden, h // stride, w // stride, device=device)
            out += [z, z.clone()]
        return out

    # ---------------------------------------------------------------- forward
    def forward(self, src: torch.Tensor, prior: torch.Tensor, state: Optional[List[torch.Tensor]] = None,
                downsample_ratio: float = 1.0, clamp: bool = True
                ) -> Tuple[torch.Tensor, torch.Tensor, List[torch.Tensor]]:
        """(pha, fgr, state) for frames `src` with person probability `prior`; see the class docstring.

        `clamp=False` returns the residual sums (prior + alpha residual, frame + colour residual)
        before they are clamped to [0,1]: training computes its losses on them, so a residual that
        overshoots a saturated prior still gets a gradient (the clamp's is zero there).
        """
        single = src.dim() == 4
        if single:
            src = src.unsqueeze(1)
            prior = prior.unsqueeze(1)
        B, T, _, H, W = src.shape
        src_bt = src.flatten(0, 1)  # [B*T,3,H,W]
        prior_bt = prior.flatten(0, 1)  # [B*T,1,H,W]
        if downsample_ratio != 1.0:
            src_lr = downsample(src_bt, downsample_ratio)
            prior_lr = downsample(prior_bt, downsample_ratio)
            pha_lr, fgr_lr, new_state = self._run(src_lr, prior_lr, B, T, state, clamp)
            fgr, pha = self.refiner(src_bt, src_lr, fgr_lr, pha_lr)
        else:
            pha, fgr, new_state = self._run(src_bt, prior_bt, B, T, state, clamp)
        if clamp and (self.curve_gain != 1.0 or self.curve_centre != 0.5):
            # On the final alpha, after the refiner: a curve as steep as the fits pick, applied
            # before it, hardens the low-resolution alpha that the refiner then blurs again.
            pha = output_curve(pha, self.curve_gain, self.curve_centre)
        pha = unfold_time(pha, B, T)
        fgr = unfold_time(fgr, B, T)
        if single:
            pha = pha.squeeze(1)
            fgr = fgr.squeeze(1)
        return pha, fgr, new_state

    def _run(self, src: torch.Tensor, prior: torch.Tensor, B: int, T: int,
             state: Optional[List[torch.Tensor]], clamp: bool = True
             ) -> Tuple[torch.Tensor, torch.Tensor, List[torch.Tensor]]:
        """The network at the working resolution: `[B*T,3,h,w]`, `[B*T,1,h,w]` -> pha, fgr `[B*T,.,h,w]`."""
        h, w = src.shape[2], src.shape[3]
        x = torch.cat([src, prior], dim=1)  # [B*T,4,h,w]
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        # Pad to a multiple of 32 by padding 31 and cropping: a constant pad and a size-dependent
        # slice trace into shape-generic ONNX, where a size-dependent pad would be frozen. Tracing
        # always pads (the example's size must not decide the graph); otherwise aligned sizes skip it.
        h_pad = (h + 31) // 32 * 32
        w_pad = (w + 31) // 32 * 32
        if torch.jit.is_tracing() or h != h_pad or w != w_pad:
            x = F.pad(x, [0, 31, 0, 31], mode="replicate")[:, :, :h_pad, :w_pad]
        inp = torch.addcmul(self.shift, x, self.scale)

        feat = inp
        skips: List[torch.Tensor] = []
        for stage in self.stages:
            feat = stage(feat)
            skips.append(feat)

        new_state: List[torch.Tensor] = []
        for k, lstm in enumerate(self.lstms):
            s = unfold_time(skips[k], B, T)  # [B,T,C,h_k,w_k]
            if state is None:
                h0 = torch.zeros(1, 1, 1, 1, dtype=s.dtype, device=s.device)
                c0 = h0
            else:
                h0 = state[2 * k]
                c0 = state[2 * k + 1]
            out, hk, ck = lstm(s, h0, c0)
            skips[k] = out.flatten(0, 1)  # [B*T,C+Hc,h_k,w_k]
            new_state.append(hk)
            new_state.append(ck)

        d = self.bottleneck(skips[4])  # [B*T,dec0,h/32,w/32]
        for i, level in enumerate(self.levels):
            d = level(d, skips[3 - i])
        out = self.head(d, inp)  # [B*T,4,H_pad,W_pad]
        out = out[:, :, :h, :w]
        base = prior if self.calibration is None else self.calibration(prior)
        pha = out[:, :1] + base
        fgr = out[:, 1:] + src
        if clamp:
            pha = pha.clamp(0.0, 1.0)
            fgr = fgr.clamp(0.0, 1.0)
        return pha, fgr, new_state


class SeparableHead(nn.Sequential):
    """Version-1 head: upsample the decoder feature, concatenate the input, separable 3x3, 1x1 to 4.

    A Sequential (keys `0.*`, `1.*`) so version-1 checkpoints load unchanged.
    Shapes: `d` `[N,Cd,H/2,W/2]`, `inp` `[N,Cin,H,W]` -> `[N,4,H,W]`.
    """

    def __init__(self, dec_channels: int, in_channels: int, hidden_channels: int) -> None:
        super().__init__(SeparableConv(dec_channels + in_channels, hidden_channels), nn.Conv2d(hidden_channels, 4, 1))

    def forward(self, d: torch.Tensor, inp: torch.Tensor) -> torch.Tensor:
        """Residuals `[N,4,H,W]` (alpha, foreground)."""
        d = F.interpolate(d, size=[inp.shape[2], inp.shape[3]], mode="bilinear", align_corners=False)
        return self[1](self[0](torch.cat([d, inp], dim=1)))


class LightHead(nn.Module):
    """Version-2 head: `out(relu(up(project(d)) + image(inp)))`.

    `project` (1x1) runs at the decoder's stride-2 resolution before upsampling, which equals
    running it after (1x1 convolutions commute with bilinear upsampling), so the decoder side
    costs one upsample of `hidden` channels; `image` is a dense 3x3 convolution of the
    normalised input at full resolution, which puts the image's own edges into the residuals.
    No batch norm: the sum of two branches would need it on both, and the head is shallow.

    Shapes: `d` `[N,Cd,H/2,W/2]`, `inp` `[N,Cin,H,W]` -> `[N,4,H,W]`.
    """

    def __init__(self, dec_channels: int, in_channels: int, hidden_channels: int) -> None:
        super().__init__()
        self.project = nn.Conv2d(dec_channels, hidden_channels, 1, bias=False)
        self.image = nn.Conv2d(in_channels, hidden_channels, 3, padding=1, bias=True)
        self.out = nn.Conv2d(hidden_channels, 4, 1)

    def forward(self, d: torch.Tensor, inp: torch.Tensor) -> torch.Tensor:
        """Residuals `[N,4,H,W]` (alpha, foreground)."""
        up = F.interpolate(self.project(d), size=[inp.shape[2], inp.shape[3]], mode="bilinear", align_corners=False)
        return self.out(F.relu(self.image(inp) + up))


class Bottleneck(nn.Module):
    """Deepest skip (stride 32): attention gated by its own global context, then a 1x1 projection."""

    def __init__(self, skip_channels: int, out_channels: int, attention_channels: int) -> None:
        super().__init__()
        self.gate = AttentionGate(skip_channels, skip_channels, min(attention_channels, skip_channels),
                                  global_gate=True)
        self.proj = ConvBNReLU(skip_channels, out_channels, 1)

    def forward(self, skip: torch.Tensor) -> torch.Tensor:
        """`[N,C,h,w] -> [N,Cout,h,w]`."""
        return self.proj(self.gate(skip, skip.mean(dim=[2, 3], keepdim=True)))


class DecoderLevel(nn.Module):
    """One decoder step: gate the skip by the coarser decoder feature, upsample, concatenate, convolve."""

    def __init__(self, skip_channels: int, coarse_channels: int, out_channels: int, attention_channels: int,
                 convs: int = 2) -> None:
        super().__init__()
        self.gate = AttentionGate(skip_channels, coarse_channels, min(attention_channels, skip_channels))
        self.block = (DecoderBlock(coarse_channels + skip_channels, out_channels) if convs == 2
                      else SeparableConv(coarse_channels + skip_channels, out_channels))

    def forward(self, coarse: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        """`coarse` `[N,Cc,h,w]`, `skip` `[N,Cs,2h,2w]` -> `[N,Cout,2h,2w]`."""
        up = F.interpolate(coarse, size=[skip.shape[2], skip.shape[3]], mode="bilinear", align_corners=False)
        return self.block(torch.cat([up, self.gate(skip, coarse)], dim=1))


class LightDecoderLevel(nn.Module):
    """Version-2 fine decoder level: one upsample, a linear merge, then a depthwise 3x3 (+ a separable 3x3).

    `project` maps the coarse feature, at its own resolution, to `[out | gate signal]`; one
    bilinear upsample brings both to the skip's resolution (1x1 convolutions commute with it). The
    `AttentionGate` (its `phi` already applied by `project`) weighs the skip, a 1x1 convolution
    brings the gated skip to `out_channels`, and the sum goes through a depthwise 3x3 + BN + ReLU.
    This is the separable convolution of version 1 with the pointwise part first, which is linear,
    so it is split over the concatenation instead of running on the concatenation. With `convs=2`
    a `SeparableConv` follows (the receptive field of version 1's two separable convolutions).

    Shapes: `coarse` `[N,Cc,h,w]`, `skip` `[N,Cs,2h,2w]` -> `[N,Cout,2h,2w]`.
    """

    def __init__(self, skip_channels: int, coarse_channels: int, out_channels: int, attention_channels: int,
                 convs: int = 1) -> None:
        super().__init__()
        self.out_channels = out_channels
        self.project = nn.Conv2d(coarse_channels, out_channels + attention_channels, 1, bias=True)
        self.gate = AttentionGate(skip_channels, attention_channels, attention_channels, projected=True)
        self.merge = nn.Conv2d(skip_channels, out_channels, 1, bias=False)
        self.block = nn.Sequential(
            nn.Conv2d(out_channels, out_channels, 3, padding=1, groups=out_channels, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
            *([SeparableConv(out_channels, out_channels)] if convs == 2 else []),
        )

    def forward(self, coarse: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        """`coarse` `[N,Cc,h,w]`, `skip` `[N,Cs,2h,2w]` -> `[N,Cout,2h,2w]`."""
        up = F.interpolate(self.project(coarse), size=[skip.shape[2], skip.shape[3]], mode="bilinear",
                           align_corners=False)
        gated = self.gate(skip, up[:, self.out_channels:])
        return self.block(self.merge(gated) + up[:, :self.out_channels])


def output_curve(pha: torch.Tensor, gain: float, centre: float) -> torch.Tensor:
    """Alpha in [0,1] through `MattingNet`'s output contrast curve, `clamp((pha - centre) * gain + 0.5, 0, 1)`."""
    return ((pha - centre) * gain + 0.5).clamp(0.0, 1.0)


def downsample(x: torch.Tensor, ratio: float) -> torch.Tensor:
    """`[N,C,H,W] -> [N,C,floor(H*ratio),floor(W*ratio)]`, bilinear (a scale factor, so it exports)."""
    return F.interpolate(x, scale_factor=ratio, mode="bilinear", align_corners=False, recompute_scale_factor=False)


def _bilinear_taps(size: int, ratio: float) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Along one axis of `downsample`: source indices `i0`, `i1` and weights `w0`, `w1` of each output sample."""
    # As ATen computes them in float32 for a float input: source = (dst + 0.5) / ratio - 0.5, clamped.
    out = int(math.floor(size * ratio))
    real = np.float32(1.0 / ratio) * (np.arange(out, dtype=np.float32) + np.float32(0.5)) - np.float32(0.5)
    real = np.maximum(real, np.float32(0.0))
    i0 = np.minimum(real.astype(np.intp), size - 1)
    w1 = np.clip(real - i0.astype(np.float32), np.float32(0.0), np.float32(1.0))
    return i0, np.minimum(i0 + 1, size - 1), np.float32(1.0) - w1, w1


def downsample_image(image: np.ndarray, ratio: float, scale: float = 1.0) -> np.ndarray:
    """`downsample` of a numpy image `[H,W]` or `[H,W,C]` (any dtype), times `scale`: float32 `[h,w(,C)]`.

    Reads only the pixels the bilinear samples use, so a uint8 frame needs no float copy at full
    resolution; equal to `downsample` of `image * scale` within float rounding.
    """
    y0, y1, wy0, wy1 = _bilinear_taps(image.shape[0], ratio)
    x0, x1, wx0, wx1 = _bilinear_taps(image.shape[1], ratio)
    extra = (None,) * (image.ndim - 2)  # broadcast the weights over channels
    top, bottom = image[y0], image[y1]  # [h,W(,C)]
    wx0, wx1 = wx0[(slice(None),) + extra], wx1[(slice(None),) + extra]
    # np.take gathers along an axis several times faster than fancy indexing does.
    upper = np.take(top, x0, axis=1) * wx0 + np.take(top, x1, axis=1) * wx1  # [h,w(,C)] float32
    lower = np.take(bottom, x0, axis=1) * wx0 + np.take(bottom, x1, axis=1) * wx1
    wy0, wy1 = wy0[(slice(None), None) + extra], wy1[(slice(None), None) + extra]
    out = upper * (wy0 * np.float32(scale)) + lower * (wy1 * np.float32(scale))
    return out.astype(np.float32, copy=False)


def _work_size(height: int, width: int, downsample_ratio: float) -> Tuple[int, int]:
    """Resolution the network runs at for a `downsample_ratio` (as `downsample` computes it)."""
    if downsample_ratio == 1.0:
        return height, width
    return int(math.floor(height * downsample_ratio)), int(math.floor(width * downsample_ratio))


def _pad32(n: int) -> int:
    return n + (32 - n % 32) % 32


def matting_net(backbone_weights: str = "none", **options: Any) -> MattingNet:
    """Build a `MattingNet`; `backbone_weights` is `'none'`, `'imagenet'` (local torch hub cache) or a PATH.

    `options` are `MattingNet`'s constructor arguments.
    """
    net = MattingNet(**options)
    if backbone_weights not in (None, "none"):
        load_backbone_weights(net.encoder, str(backbone_weights))
    return net
