"""`matting export`: a portable model (TorchScript or ONNX) with explicit recurrent state.

The exported model maps one frame to one frame: inputs `src [B,3,H,W]`, `prior [B,1,H,W]` (float32
in [0,1]) and the ten state tensors `h0, c0, ..., h4, c4`; outputs `pha [B,1,H,W]`, `fgr [B,3,H,W]`
and the new state `h0_out, ..., c4_out`. Start a video with every state input a `[1,1,1,1]` zero
tensor and pass each call's state outputs to the next call. Batch, height and width are dynamic;
the downsample ratio is fixed at export. The model's config (with its prior) is stored inside the
file (ONNX metadata `matting_config`; TorchScript extra file `metadata.json`).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from dataclasses import dataclass
from typing import Literal

from pipelines import config as cfglib
from pipelines.cli import EXIT_FAILED, EXIT_OK, UsageError
from pipelines.config import Annotated, Interval, PositiveFloat, option

EPILOG = """\
examples:
  matting export --model checkpoints/model.pt --format onnx model.onnx
  matting export --model models:/matting@champion --format torchscript model.torchscript.pt
  matting export --model model.pt --format onnx --downsample-ratio 0.25 model-hd.onnx   # for 1080p input
  matting export --config export.yaml        # keys: model, format, out, downsample_ratio, opset, verify

The export is checked against PyTorch over 3 consecutive frames carrying state (--no-verify skips it);
ONNX needs the 'export' extra (onnx, onnxscript, onnxruntime).
"""


@dataclass(frozen=True)
class ExportConfig:
    """Settings of one `matting export` run (defaults < YAML file < flags)."""

    out: str = option("", "output file (local path or URI)", metavar="OUT", positional=True)
    model: str = option("", "checkpoint path, models:/NAME@ALIAS or models:/NAME/VERSION", metavar="REF")
    format: Literal["torchscript", "onnx"] | None = option(None, "what to export to")
    downsample_ratio: Annotated[float, Interval(gt=0.0, le=1.0)] = option(1.0, "run the network at R times the input size (fixed in the export)",
                                     metavar="R")
    opset: Annotated[int, Interval(ge=11, le=23)] = option(17, "ONNX opset", metavar="N")
    verify: bool = option(True, "compare the export with PyTorch over 3 frames carrying state")
    tolerance: PositiveFloat = option(1e-4, "largest |export - pytorch| that --verify accepts", metavar="TOL")


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register `export`."""
    return cfglib.add_command(subparsers, "export", ExportConfig, run,
                              help="a portable TorchScript/ONNX model with explicit recurrent state",
                              description=__doc__, epilog=EPILOG)


def _config(args: argparse.Namespace) -> ExportConfig:
    cfg = cfglib.from_args(ExportConfig, args)
    cfglib.require(cfg, {"OUT": "out", "--model": "model", "--format": "format"})
    if not 0.0 < cfg.downsample_ratio <= 1.0:
        raise UsageError(f"--downsample-ratio must be in (0, 1], got {cfg.downsample_ratio}")
    return cfg


def run(args: argparse.Namespace) -> int:
    """Export one model; returns the exit status."""
    cfg = _config(args)
    from matting_core import storage
    from matting_core.model.export import export_model, verify_export
    from pipelines.model_ref import load_model

    try:
        net = load_model(cfg.model, device="cpu")
    except (OSError, ValueError, RuntimeError) as exc:
        print(f"matting export: {exc}", file=sys.stderr)
        return EXIT_FAILED
    with tempfile.TemporaryDirectory(prefix="matting-export-") as tmp:
        local = os.path.join(tmp, "model." + ("onnx" if cfg.format == "onnx" else "pt"))
        try:
            export_model(net, local, cfg.format, cfg.downsample_ratio, cfg.opset)
        except ImportError as exc:
            print(f"matting export: {cfg.format} export needs the 'export' extra "
                  f"(pip install 'matting[export]'): {exc}", file=sys.stderr)
            return EXIT_FAILED
        except Exception as exc:  # exporter errors come in many types; report and fail
            print(f"matting export: {cfg.format} export of {cfg.model} failed: {exc}", file=sys.stderr)
            return EXIT_FAILED
        if cfg.verify:
            try:
                diff = verify_export(net, local, cfg.format, cfg.downsample_ratio)
            except ImportError as exc:
                print(f"matting export: cannot verify without onnxruntime ({exc}); use --no-verify",
                      file=sys.stderr)
                return EXIT_FAILED
            if not diff <= cfg.tolerance:
                print(f"matting export: the export differs from PyTorch by {diff:.2e} "
                      f"(> {cfg.tolerance:.0e}); not written", file=sys.stderr)
                return EXIT_FAILED
            print(f"verified: max |export - pytorch| = {diff:.2e} over 3 frames with state", file=sys.stderr)
        with open(local, "rb") as f:
            storage.write_bytes_atomic(cfg.out, f.read())
    print(f"{cfg.model} -> {cfg.out} ({cfg.format}, downsample_ratio {cfg.downsample_ratio})", file=sys.stderr)
    return EXIT_OK
