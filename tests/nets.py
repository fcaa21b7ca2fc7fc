"""Test networks that behave like trained ones, and random clips to feed them."""
from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
import torch

from matting_core.model import MattingNet

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
CARPHONE = SHARED / "data" / "videos" / "people" / "carphone.mp4"
SELFIE = SHARED / "models" / "selfie_segmentation_landscape.tflite"
STREET = SHARED / "data" / "videos" / "people" / "street-two-people" / "frames"

H, W = 64, 96


def clip(b=1, t=3, h=H, w=W, seed=1) -> tuple[torch.Tensor, torch.Tensor]:
    """Random `src` [B,T,3,H,W] and `prior` [B,T,1,H,W] in [0,1], seeded."""
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(b, t, 3, h, w, generator=gen), torch.rand(b, t, 1, h, w, generator=gen)


@torch.no_grad()
def lively(net: MattingNet, seed: int = 0) -> MattingNet:
    """`net` with what training gives a net and initialisation does not: batch-norm statistics of its
    own activations, a non-zero output layer and prior calibration (a fresh net returns the prior; tests need more)."""
    gen = torch.Generator().manual_seed(seed)
    net.output_conv.weight.copy_(torch.randn(net.output_conv.weight.shape, generator=gen) * 0.5)
    net.output_conv.bias.copy_(torch.randn(4, generator=gen) * 0.1)
    if net.calibration is not None:
        net.calibration.delta.copy_(torch.randn(net.calibration.delta.shape, generator=gen) * 0.1)
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None  # cumulative average over the calibration batches
    net.train()
    for k in range(2):
        net(*clip(b=2, t=2, seed=100 + k))
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            # Nearly dead channels of a random net get gains up to 1/sqrt(2.6e-5) ~ 200, which make
            # PyTorch's own fp32 output differ from fp64 by ~8e-5: no 1e-4 comparison could pass.
            m.running_var.clamp_(min=1e-2)
    return net.eval()


def carphone_frames(count: int) -> list[np.ndarray]:
    """The first `count` frames of carphone.mp4 (uint8 RGB); skips the test when ../shared is absent."""
    from matting_core.video import iter_frames

    if not CARPHONE.exists():
        pytest.skip(f"{CARPHONE} absent")
    return list(itertools.islice(iter_frames(str(CARPHONE)), count))


def lively_net() -> MattingNet:
    """A net whose output depends on its recurrent state (an untrained one returns the prior whatever the state)."""
    from matting_core.model import matting_net

    torch.manual_seed(0)
    return lively(matting_net(backbone_weights="none"))


def selfie_stream():
    """The selfie prior with the default smoother; skips the test when the model is absent."""
    from matting_core.flow import TemporalSmoother
    from matting_core.prior import PriorStream, make_prior

    if not SELFIE.exists():
        pytest.skip(f"{SELFIE} absent")
    return PriorStream(make_prior("selfie", weights=str(SELFIE)), TemporalSmoother())
