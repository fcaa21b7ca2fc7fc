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

from pipelines.cli import EXIT_FAILED, EXIT_OK, UsageError
from pipelines.config import load, overrides_from_args, require

FORMATS = ("torchscript", "onnx")

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

    model: str = ""
    format: str = ""
    out: str = ""
    downsample_ratio: float = 1.0
    opset: int = 17
    verify: bool = True
    tolerance: float = 1e-4


_FLAGS = {"model": "model", "format": "format", "out": "out", "downsample_ratio": "downsample_ratio",
          "opset": "opset", "verify": "verify"}


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register `export`."""
    p = subparsers.add_parser(
        "export", help="a portable TorchScript/ONNX model with explicit recurrent state",
        description=__doc__, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", nargs="?", metavar="OUT", help="output file (local path or URI)")
    p.add_argument("--config", metavar="FILE.yaml", help="YAML config (ExportConfig keys)")
    p.add_argument("--model", metavar="REF", help="checkpoint path, models:/NAME@ALIAS or models:/NAME/VERSION")
    p.add_argument("--format", choices=FORMATS, help="torchscript or onnx")
    p.add_argument("--downsample-ratio", type=float, metavar="R",
                   help="run the network at R times the input size (fixed in the export; default 1)")
    p.add_argument("--opset", type=int, help="ONNX opset (default 17)")
    p.add_argument("--no-verify", dest="verify", action="store_false", default=None,
                   help="skip comparing the export with PyTorch")
    p.set_defaults(run=run)
    return p


def _config(args: argparse.Namespace) -> ExportConfig:
    cfg = load(ExportConfig, args.config, overrides_from_args(args, _FLAGS))
    require(cfg, {"OUT": "out", "--model": "model", "--format": "format"})
    if cfg.format not in FORMATS:
        raise UsageError(f"--format must be one of {', '.join(FORMATS)}, got {cfg.format!r}")
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
