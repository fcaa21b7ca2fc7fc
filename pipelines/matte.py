"""`matting matte`: one video (or frame folder) matted locally, written as DESIGN.md's Mattes layout."""
from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from dataclasses import dataclass
from typing import Literal

from pipelines import config as cfglib
from pipelines.cli import EXIT_FAILED, EXIT_OK, EXIT_PARTIAL, UsageError
from pipelines.config import Annotated, Interval, NonNegativeInt, PositiveFloat, option, to_dict

log = logging.getLogger(__name__)

DEFAULT_FORMATS = ("pha", "fgr", "rgba.webm")


@dataclass(frozen=True)
class MattingOptions:
    """How frames are matted, for `matte` and `infer` alike: prior, smoothing, device, network input, alpha bits.

    `prior`, `prior_weights` and `smooth_prior` left unset use what the checkpoint records.
    `downsample_ratio` unset picks one per video so the network's input's longer side is at
    most `max_side` (unset: the side the model was trained at, so people are as many pixels tall
    as the ones it learned on; 512 for models that do not record it).
    `frames_per_call` and `prior_ahead` unset take the device's defaults (`Matter`): batched with
    the prior ahead in a thread on CUDA, the streaming path on the CPU.
    """

    prior: Literal["selfie", "deeplabv3", "none"] | None = option(
        None, "person prior (unset: the one the checkpoint records)")
    prior_weights: str | None = option(None, "prior weights: default, none or a PATH (unset: the checkpoint's)",
                                       metavar="W")
    smooth_prior: bool | None = option(None, "motion-compensated smoothing of the prior before the network "
                                             "(unset: as the checkpoint records)")
    smooth_alpha: bool = option(False, "also smooth the output alpha along the motion")
    device: Literal["auto", "cpu", "cuda"] = option("auto", "where the network runs")
    amp: bool = option(True, "mixed precision on CUDA")
    alpha_bits: Literal[8, 16] = option(8, "bits of pha/*.png")
    composite_bg: str = option("green", "COLOR|IMAGE|VIDEO behind composite.mp4", metavar="BG")
    downsample_ratio: Annotated[float, Interval(gt=0.0, le=1.0)] | None = option(
        None, "network input scale in (0,1] (unset: longer side at most --max-side)", metavar="R")
    max_side: Annotated[int, Interval(ge=32)] | None = option(
        None, "longer side of the network input when --downsample-ratio is unset (unset: the side the "
              "model was trained at, else 512)", metavar="PX")
    frames_per_call: Annotated[int, Interval(ge=1, le=64)] | None = option(
        None, "frames per network call, 1 to 64 (unset: 4 on CUDA, 1 on the CPU)", metavar="T")
    prior_ahead: bool | None = option(None, "compute the prior and its smoothing in a thread ahead of the network "
                                            "(unset: on with CUDA, off on the CPU)")


@dataclass(frozen=True)
class MatteConfig(MattingOptions):
    """Settings of one `matting matte` run (defaults < YAML file < flags); `fps` unset takes the video's
    (frame folders default to 25)."""

    video: str = option("", "video file or folder of numbered PNG/JPEG frames", metavar="VIDEO", positional=True)
    out: str = option("", "output folder (or URI); results go to OUT/<video stem>/", metavar="OUT",
                      flags=("-o", "--out"))
    model: str = option("", "checkpoint path, models:/NAME@ALIAS or models:/NAME/VERSION", metavar="REF")
    formats: tuple[str, ...] = option(DEFAULT_FORMATS, "comma-separated subset of pha,fgr,rgba.mov,rgba.webm,"
                                                       "composite.mp4", metavar="LIST")
    fps: PositiveFloat | None = option(None, "frame rate of the outputs (unset: the video's; 25 for frame folders)",
                               metavar="FPS")
    threads: NonNegativeInt = option(0, "CPU threads for the network; 0: all", metavar="N")
    encoder_threads: NonNegativeInt | None = option(None, "threads per video encoder (unset: 1 for frames up to 640x480 "
                                               "matted on the CPU, else FFmpeg's choice)", metavar="N")
    writer_thread: bool = option(True, "encode outputs in a thread, overlapping them with matting")
    progress: bool | None = option(None, "progress bar (unset: when stderr is a terminal)")


EPILOG = """\
examples:
  matting matte clip.mp4 -o mattes --model checkpoints/model.pt
  matting matte clip.mp4 -o mattes --model models:/matting@champion \\
      --formats pha,fgr,rgba.mov,rgba.webm,composite.mp4 --composite-bg '#00b140'
  matting matte frames/ -o mattes --model model.pt --formats pha --alpha-bits 16 --fps 30
  matting matte talk.mp4 -o mattes --model model.pt --formats composite.mp4 --composite-bg beach.mp4
  matting matte clip.mp4 -o mattes --config matte.yaml --device cuda

outputs (DIR/<video stem>/, published only when complete):
  pha/000000.png  alpha (8-bit, or 16-bit with --alpha-bits 16)
  fgr/000000.png  foreground colour
  rgba.mov        ProRes 4444 with alpha;  rgba.webm  VP9 with alpha
  composite.mp4   H.264 over a colour (name, #rrggbb, r,g,b), an image or a (looped) video
  result.json     status, frames, fps, model, prior, timings, errors (always)

exit status: 0 all frames matted, 3 some frames could not be read (listed in result.json),
2 usage error, 1 nothing produced.
"""


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register `matting matte`."""
    return cfglib.add_command(
        subparsers, "matte", MatteConfig, run, help="matte one video or frame folder locally",
        description="Matte one video (or folder of numbered frames) with a trained model, streaming "
                    "frame by frame in constant memory, and write the requested formats.", epilog=EPILOG)


def _config(args: argparse.Namespace) -> MatteConfig:
    cfg = cfglib.from_args(MatteConfig, args)
    cfglib.require(cfg, {"VIDEO": "video", "-o/--out": "out", "--model": "model"})
    from matting_core.inference.outputs import parse_formats
    try:
        formats = parse_formats(cfg.formats)
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    return dataclasses.replace(cfg, formats=formats)


def run(args: argparse.Namespace) -> int:
    """Matte one video; returns the exit status."""
    cfg = _config(args)
    from matting_core.runtime import resolve_device, set_cpu_threads, tune_malloc, tune_openmp

    tune_openmp()  # before anything imports torch
    from matting_core.inference.loop import matte_video
    from matting_core.inference.outputs import MatteOutputs, default_encoder_threads
    from matting_core.video import VideoError, probe, video_stem

    try:
        device = resolve_device(cfg.device)
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    try:
        info = probe(cfg.video, strict=False)  # a corrupt frame is reported by index, not fatal
    except VideoError as exc:
        print(f"matting matte: {exc}", file=sys.stderr)
        return EXIT_FAILED
    tune_malloc()
    if device.type == "cpu":
        set_cpu_threads(cfg.threads)
    try:
        matter, model_config = _build_matter(cfg, device)
    except (OSError, ValueError, RuntimeError, KeyError) as exc:
        print(f"matting matte: {exc}", file=sys.stderr)
        return EXIT_FAILED
    stem = video_stem(cfg.video)
    size = (info.width, info.height)
    encoder_threads = cfg.encoder_threads
    if encoder_threads is None:
        encoder_threads = default_encoder_threads(size, device.type == "cpu")
    try:
        outputs = MatteOutputs(cfg.out, stem, cfg.formats, cfg.fps or info.fps, size,
                               alpha_bits=cfg.alpha_bits, composite_bg=cfg.composite_bg,
                               background=cfg.writer_thread, encoder_threads=encoder_threads)
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    show = cfg.progress if cfg.progress is not None else sys.stderr.isatty()
    with outputs:
        result = matte_video(cfg.video, info, matter, outputs, progress=show,
                             record={"model": cfg.model, "model_config": model_config, "config": to_dict(cfg)})
    if result.status == "failed":
        print(f"matting matte: {cfg.video}: {result.reason}", file=sys.stderr)
        for err in result.errors:
            print(f"  frame {err['index']}: {err['message']}", file=sys.stderr)
        return EXIT_FAILED
    print(f"{stem}: {result.frames} frames -> {result.where} ({result.timings['fps']:.1f} frames/s)",
          file=sys.stderr)
    for err in result.errors:
        print(f"  frame {err['index']} lost: {err['message']}", file=sys.stderr)
    return EXIT_PARTIAL if result.lost_frames else EXIT_OK


def _build_matter(cfg: MatteConfig, device):
    from pipelines.model_ref import load_model

    return build_matter(load_model(cfg.model, device=str(device)), cfg, device)


def build_matter(net, cfg: MattingOptions, device):
    """(`Matter` for `net` with the prior and options of `cfg`, the net's config)."""
    from matting_core.inference.matter import Matter
    from matting_core.prior import prior_stream_from_spec

    config = dict(getattr(net, "config", {}) or {})
    stream = prior_stream_from_spec(config.get("prior"), backend=cfg.prior, weights=cfg.prior_weights,
                                    smooth=cfg.smooth_prior, device=device)
    matter = Matter(net, stream, device=device, amp=cfg.amp, downsample_ratio=cfg.downsample_ratio,
                    max_side=cfg.max_side, smooth_alpha=cfg.smooth_alpha,
                    frames_per_call=cfg.frames_per_call, prior_ahead=cfg.prior_ahead)
    return matter, config
