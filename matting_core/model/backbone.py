"""The MobileNetV2 encoder with a 4-channel input (RGB + person prior) and its weight loading."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Dict, Mapping

import torch
from torch import nn
from torchvision.models import MobileNet_V2_Weights, mobilenet_v2

__all__ = ["SKIP_INDICES", "SKIP_CHANNELS", "BackboneWeightsError", "mobilenet_v2_encoder",
           "load_backbone_weights", "imagenet_cache_path"]

# Outputs of `features[i]` used as skips: strides 2, 4, 8, 16, 32 (the 2nd, 4th, 7th, 14th, 18th blocks).
SKIP_INDICES = (1, 3, 6, 13, 17)
SKIP_CHANNELS = (16, 24, 32, 96, 320)


class BackboneWeightsError(FileNotFoundError):
    """Backbone weights that cannot be found or read."""


def mobilenet_v2_encoder(in_channels: int = 4) -> nn.Sequential:
    """TorchVision's `mobilenet_v2().features[:18]` with an `in_channels`-channel first convolution.

    `features[18]` (the 1x1 conv to 1280 channels) only serves classification and is dropped.
    """
    features = mobilenet_v2(weights=None).features[: SKIP_INDICES[-1] + 1]
    old = features[0][0]
    features[0][0] = nn.Conv2d(in_channels, old.out_channels, old.kernel_size, old.stride, old.padding, bias=False)
    nn.init.kaiming_normal_(features[0][0].weight, mode="fan_out")
    return features


def imagenet_cache_path() -> Path:
    """Where TorchVision's MobileNetV2 ImageNet weights live in the torch hub cache."""
    name = os.path.basename(MobileNet_V2_Weights.IMAGENET1K_V2.url)
    return Path(torch.hub.get_dir()) / "checkpoints" / name


def _imagenet_file() -> Path:
    preferred = imagenet_cache_path()
    v1 = preferred.parent / os.path.basename(MobileNet_V2_Weights.IMAGENET1K_V1.url)
    for candidate in (preferred, v1):
        if candidate.is_file():
            return candidate
    raise BackboneWeightsError(
        f"backbone_weights='imagenet': TorchVision's MobileNetV2 ImageNet weights are not in the local "
        f"torch hub cache ({preferred} is absent) and cannot be downloaded here. Copy the file "
        f"from {MobileNet_V2_Weights.IMAGENET1K_V2.url} to {preferred} (or set TORCH_HOME), pass its path "
        f"as backbone_weights=PATH, or use backbone_weights='none'.")


def _read_state_dict(path: Path) -> Dict[str, torch.Tensor]:
    if not path.is_file():
        raise BackboneWeightsError(
            f"backbone weights {path}: no such file; pass the path of a state dict of TorchVision's "
            f"mobilenet_v2 (or of its `features`), 'imagenet' or 'none'")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for truncated or foreign files
        raise BackboneWeightsError(f"backbone weights {path}: cannot be read as a state dict ({exc})") from exc
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise BackboneWeightsError(f"backbone weights {path}: not a state dict of tensors")
    return dict(obj)


def load_backbone_weights(encoder: nn.Sequential, weights: str) -> None:
    """Load `weights` (`'imagenet'` or a PATH to a mobilenet_v2 / features state dict) into `encoder`.

    Raises `BackboneWeightsError` naming the file and how to provide it when it is missing or unusable.
    """
    path = _imagenet_file() if weights == "imagenet" else Path(weights).expanduser()
    state = _read_state_dict(path)
    if any(k.startswith("features.") for k in state):
        state = {k[len("features."):]: v for k, v in state.items() if k.startswith("features.")}
    keep = {str(i) for i in range(len(encoder))}
    state = {k: v for k, v in state.items() if k.split(".", 1)[0] in keep}
    first = encoder[0][0].weight
    rgb = state.get("0.0.weight")
    if rgb is not None and rgb.shape[1] == 3 and first.shape[1] != 3:
        # The prior channel starts at zero: the pretrained filters then see exactly the activations
        # they were trained on, and the prior's weights grow from there (their gradient is not zero
        # because the prior input is not). A copy of the RGB mean would instead add a spurious
        # brightness-like signal to every filter.
        extra = torch.zeros(rgb.shape[0], first.shape[1] - 3, *rgb.shape[2:], dtype=rgb.dtype)
        state["0.0.weight"] = torch.cat([rgb, extra], dim=1)
    try:
        missing, unexpected = encoder.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shape mismatches
        raise BackboneWeightsError(f"backbone weights {path}: not a mobilenet_v2 state dict ({exc})") from exc
    if missing or unexpected:
        raise BackboneWeightsError(
            f"backbone weights {path}: not a mobilenet_v2 state dict "
            f"(missing {missing[:3]}..., unexpected {unexpected[:3]}...)")
