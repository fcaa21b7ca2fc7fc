"""`matting make-benchmark`: composited evaluation clips with exact alpha, in the benchmark layout.

The foreground follows an eased affine trajectory and the background pans and zooms on its own:
not the fake-motion generator's motion, so evaluating a model trained on fake-motion data
measures how it generalises.
"""
from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import dataclass, field

from matting_core.data.benchmark import BenchmarkConfig, ConfigMismatch, make_benchmark
from matting_core.output_lock import OutputLock, OutputLocked
from pipelines import config as cfglib
from pipelines.config import PositiveInt, option

log = logging.getLogger("matting.make_benchmark")

EPILOG = """\
examples:
  matting make-benchmark --photos ../shared/data/photos/p3m --photos ../shared/data/photos/alphamatting \\
      --backgrounds ../shared/data/videos/backgrounds --out bench/ --clips 8 --frames 30 --size 512x288
  matting make-benchmark --photos ../shared/data/photos/p3m --backgrounds ../shared/data/videos/backgrounds \
      --out bench-moving/ --still-share 0    # the subject never pauses
  matting make-benchmark --photos s3://bucket/photos --backgrounds s3://bucket/bg --out s3://bucket/bench --seed 7
  # then: matting matte bench/0000/com -o mattes/ --model REF; matting evaluate --true bench/ --pred mattes/

Writes OUT/<clip>/{com,pha,fgr,bgr}/0000.png, OUT/benchmark.json and OUT/errors.jsonl.
Exit status: 0 all clips written, 3 some clips failed (listed), 2 usage (or OUT in use by another
run), 1 nothing written.
"""


@dataclass(frozen=True)
class MakeBenchmarkConfig:
    """Settings of `make-benchmark` (YAML keys match the field names; clip knobs under `benchmark:`)."""

    photos: tuple[str, ...] = option((), "photos with alpha: image/+alpha/ folders, RGBA images or a CSV/Parquet "
                                         "manifest", metavar="URI", repeat=True)
    backgrounds: tuple[str, ...] = option((), "background videos or frame folders", metavar="URI", repeat=True)
    out: str = option("", "output folder (local or s3://)", metavar="DIR")
    overwrite: bool = option(False, "replace a benchmark made with another configuration")
    max_photo_pixels: PositiveInt = option(50_000_000, "photos (or alphas) with more pixels are rejected, from "
                                                       "their header, before decoding", metavar="N")
    min_subject_px: PositiveInt = option(16, "photos whose subject (alpha bounding box) is narrower or shorter "
                                             "are rejected", metavar="PX")
    benchmark: BenchmarkConfig = field(default_factory=BenchmarkConfig)


_NESTED = (
    cfglib.Flag("--clips", "benchmark.clips", "number of clips", "N"),
    cfglib.Flag("--frames", "benchmark.frames", "frames per clip", "T"),
    cfglib.Flag("--size", "benchmark.size", "frame size", "WxH"),
    cfglib.Flag("--seed", "benchmark.seed", "seed; the same sources and seed give the same clips", "S"),
    cfglib.Flag("--still-share", "benchmark.still_share",
                "share of each clip during which the subject holds still, in [0, 1); 0: always moving", "F"),
)


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register `matting make-benchmark`."""
    return cfglib.add_command(subparsers, "make-benchmark", MakeBenchmarkConfig, run,
                              help="composited evaluation clips with exact alpha (benchmark layout)",
                              description=__doc__, epilog=EPILOG, nested=_NESTED)


def run(args: argparse.Namespace) -> int:
    """Make the benchmark; exit 0 (all written), 3 (some clips failed) or 1 (none written)."""
    from pipelines.cli import EXIT_FAILED, EXIT_OK, EXIT_PARTIAL, UsageError

    cfg = cfglib.from_args(MakeBenchmarkConfig, args)
    bcfg = cfg.benchmark
    if not cfg.photos or not cfg.backgrounds or not cfg.out:
        raise UsageError("--photos, --backgrounds and --out are required")
    if min(bcfg.size) < 16:
        raise UsageError(f"--size must be WxH with both at least 16, got {bcfg.size}")
    if bcfg.clips < 1 or bcfg.frames < 2:
        raise UsageError("--clips must be >= 1 and --frames >= 2")
    if not 0.0 <= bcfg.still_share < 1.0:
        raise UsageError(f"--still-share must be in [0, 1), got {bcfg.still_share}")

    def on_problem(r):
        print(f"matting make-benchmark: {r.uri}: {r.reason}", file=sys.stderr)

    def on_clip(name):
        log.info("clip %s written", name)

    try:
        # two runs into one folder would race on its clips and benchmark.json, or mix two configurations
        with OutputLock(cfg.out):
            summary = make_benchmark(list(cfg.photos), list(cfg.backgrounds), cfg.out, bcfg,
                                     overwrite=cfg.overwrite, on_problem=on_problem, on_clip=on_clip,
                                     max_photo_pixels=cfg.max_photo_pixels, min_subject_px=cfg.min_subject_px)
    except (ConfigMismatch, OutputLocked) as exc:
        raise UsageError(str(exc)) from exc
    print(f"{cfg.out}: {len(summary.written)} clip(s) written, {len(summary.skipped)} already there, "
          f"{len(summary.failed)} failed, {len(summary.rejected)} source(s) rejected")
    if summary.planned == 0:
        print("matting make-benchmark: no valid photo or background: nothing to make", file=sys.stderr)
        return EXIT_FAILED
    if summary.failed:
        return EXIT_PARTIAL if summary.written or summary.skipped else EXIT_FAILED
    return EXIT_OK
