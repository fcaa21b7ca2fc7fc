"""Portable MattingNet: TorchScript and ONNX with the recurrent state as explicit inputs and outputs.

The exported model takes one frame and returns one frame:
    inputs  `src` `[B,3,H,W]`, `prior` `[B,1,H,W]` (float32 in [0,1]), then the state
            `h0, c0, h1, c1, ..., h4, c4`;
    outputs `pha` `[B,1,H,W]`, `fgr` `[B,3,H,W]`, then the new state `h0_out, c0_out, ...`.
Start a video with each state input a `[1,1,1,1]` zero tensor (it broadcasts to the real size) and
feed each call the state outputs of the previous one. The `downsample_ratio` is fixed at export.
"""
from __future__ import annotations

import copy
import json
import os
import warnings
from typing import Dict, List, Tuple

import torch
from torch import nn

from matting_core.model.net import MattingNet

__all__ = ["StreamingMattingNet", "state_names", "example_inputs", "export_torchscript", "export_onnx",
           "export_model", "verify_export", "FORMATS"]

FORMATS = ("torchscript", "onnx")
NUM_STATES = 10


def state_names(suffix: str = "") -> List[str]:
    """Names of the state tensors in order: `h0, c0, ..., h4, c4` (+ suffix)."""
    return [f"{kind}{k}{suffix}" for k in range(NUM_STATES // 2) for kind in ("h", "c")]


class StreamingMattingNet(nn.Module):
    """One-frame MattingNet with the ten state tensors as separate inputs and outputs (see module doc)."""

    def __init__(self, net: MattingNet, downsample_ratio: float = 1.0) -> None:
        super().__init__()
        self.net = net
        self.downsample_ratio = float(downsample_ratio)

    def forward(self, src: torch.Tensor, prior: torch.Tensor,
                h0: torch.Tensor, c0: torch.Tensor, h1: torch.Tensor, c1: torch.Tensor,
                h2: torch.Tensor, c2: torch.Tensor, h3: torch.Tensor, c3: torch.Tensor,
                h4: torch.Tensor, c4: torch.Tensor
                ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                           torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(pha `[B,1,H,W]`, fgr `[B,3,H,W]`, ten state tensors) for one frame."""
        pha, fgr, s = self.net(src, prior, [h0, c0, h1, c1, h2, c2, h3, c3, h4, c4], self.downsample_ratio)
        return pha, fgr, s[0], s[1], s[2], s[3], s[4], s[5], s[6], s[7], s[8], s[9]


def example_inputs(height: int = 288, width: int = 512, batch: int = 1) -> Tuple[torch.Tensor, ...]:
    """Inputs for the exported model's first frame: src, prior and ten `[1,1,1,1]` zero states."""
    gen = torch.Generator().manual_seed(0)
    src = torch.rand(batch, 3, height, width, generator=gen)
    prior = torch.rand(batch, 1, height, width, generator=gen)
    return (src, prior) + tuple(torch.zeros(1, 1, 1, 1) for _ in range(NUM_STATES))


def _prepare(net: MattingNet, downsample_ratio: float) -> StreamingMattingNet:
    return StreamingMattingNet(copy.deepcopy(net).cpu().eval(), downsample_ratio).eval()


def _metadata(net: MattingNet, downsample_ratio: float) -> Dict[str, str]:
    """What a runtime needs besides the graph: the model config (prior included) and the I/O names."""
    return {
        "matting_config": json.dumps(net.config, sort_keys=True),
        "downsample_ratio": repr(float(downsample_ratio)),
        "inputs": json.dumps(["src", "prior"] + state_names()),
        "outputs": json.dumps(["pha", "fgr"] + state_names("_out")),
        "initial_state": "each state input a [1,1,1,1] float32 zero tensor",
    }


def export_torchscript(net: MattingNet, path: str, downsample_ratio: float = 1.0) -> None:
    """Script the one-frame model (any H, W, batch) and save it to the local `path`.

    The metadata (see `_metadata`) is stored as the extra file `metadata.json`.
    """
    module = _prepare(net, downsample_ratio)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated but still the portable format
        scripted = torch.jit.script(module)
    _mkdir(path)
    scripted.save(path, _extra_files={"metadata.json": json.dumps(_metadata(net, downsample_ratio))})


def export_onnx(net: MattingNet, path: str, downsample_ratio: float = 1.0, opset: int = 17,
                height: int = 288, width: int = 512) -> None:
    """Export the one-frame model to ONNX at the local `path` with dynamic batch, height and width.

    Tries the TorchScript-based exporter first (no extra dependency), then the dynamo exporter
    (needs `onnxscript`). `height` x `width` is the size of the tracing example only.
    """
    module = _prepare(net, downsample_ratio)
    inputs = example_inputs(height, width)
    input_names = ["src", "prior"] + state_names()
    output_names = ["pha", "fgr"] + state_names("_out")
    dynamic_axes = {"src": {0: "batch", 2: "height", 3: "width"},
                    "prior": {0: "batch", 2: "height", 3: "width"},
                    "pha": {0: "batch", 2: "height", 3: "width"},
                    "fgr": {0: "batch", 2: "height", 3: "width"}}
    for name in state_names():
        dynamic_axes[name] = {0: "batch", 1: f"{name}_channels", 2: f"{name}_height", 3: f"{name}_width"}
    for name in state_names("_out"):
        dynamic_axes[name] = {0: "batch", 2: f"{name}_height", 3: f"{name}_width"}
    _mkdir(path)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # The TorchScript-based exporter traces; the model is written so that traced shapes stay
        # symbolic (see MattingNet._run), which the tests check at a size other than the example's.
        torch.onnx.export(module, inputs, path, input_names=input_names, output_names=output_names,
                          dynamic_axes=dynamic_axes, opset_version=opset, dynamo=False)
    _add_onnx_metadata(path, _metadata(net, downsample_ratio))


def _add_onnx_metadata(path: str, metadata: Dict[str, str]) -> None:
    import onnx

    model = onnx.load(path)
    for key, value in metadata.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(model, path)


def export_model(net: MattingNet, path: str, fmt: str, downsample_ratio: float = 1.0, opset: int = 17) -> None:
    """Export `net` to the local `path` as `fmt` (`torchscript` or `onnx`)."""
    if fmt == "torchscript":
        export_torchscript(net, path, downsample_ratio)
    elif fmt == "onnx":
        export_onnx(net, path, downsample_ratio, opset=opset)
    else:
        raise ValueError(f"unknown export format {fmt!r}; use one of {', '.join(FORMATS)}")


def verify_export(net: MattingNet, path: str, fmt: str, downsample_ratio: float = 1.0, frames: int = 3,
                  height: int = 144, width: int = 256, seed: int = 0) -> float:
    """Largest absolute difference between the exported model at `path` and `net` over `frames`
    consecutive random frames, each call fed the previous call's state (PyTorch's own state for `net`)."""
    gen = torch.Generator().manual_seed(seed)
    net = copy.deepcopy(net).cpu().eval()
    run = _runner(path, fmt)
    state = [torch.zeros(1, 1, 1, 1) for _ in range(NUM_STATES)]
    ref_state = None
    worst = 0.0
    for _ in range(frames):
        src = torch.rand(1, 3, height, width, generator=gen)
        prior = torch.rand(1, 1, height, width, generator=gen)
        with torch.no_grad():
            pha, fgr, ref_state = net(src, prior, ref_state, downsample_ratio)
        outputs = run(src, prior, state)
        state = outputs[2:]
        for got, want in zip(outputs, [pha, fgr] + list(ref_state)):
            worst = max(worst, float((got - want).abs().max()))
    return worst


def _runner(path: str, fmt: str):
    """A function `(src, prior, state) -> [pha, fgr, *state]` running the exported file."""
    if fmt == "torchscript":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            module = torch.jit.load(path, map_location="cpu")

        def run(src, prior, state):
            with torch.no_grad():
                return list(module(src, prior, *state))
        return run
    if fmt == "onnx":
        import onnxruntime as ort

        session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        names = state_names()

        def run(src, prior, state):
            feed = {"src": src.numpy(), "prior": prior.numpy()}
            feed.update({n: s.numpy() for n, s in zip(names, state)})
            return [torch.from_numpy(x) for x in session.run(None, feed)]
        return run
    raise ValueError(f"unknown export format {fmt!r}; use one of {', '.join(FORMATS)}")


def _mkdir(path: str) -> None:
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
