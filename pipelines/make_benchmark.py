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
Exit status: 0 all clips written, 3 some clips failed (listed), 2 usage, 1 nothing written.
"""


@dataclass
class MakeBenchmarkConfig:
    """Settings of `make-benchmark` (YAML keys match the field names)."""

    photos: list[str] = field(default_factory=list)
    backgrounds: list[str] = field(default_factory=list)
    out: str = ""
    clips: int = 8
    frames: int = 30
    size: tuple[int, ...] = (512, 288)
    seed: int = 0
    still_share: float = 0.3
    overwrite: bool = False


FLAGS = {"photos": "photos", "backgrounds": "backgrounds", "out": "out", "clips": "clips",
         "frames": "frames", "size": "size", "seed": "seed", "still_share": "still_share",
         "overwrite": "overwrite"}


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register `matting make-benchmark`."""
    p = subparsers.add_parser(
        "make-benchmark", help="composited evaluation clips with exact alpha (benchmark layout)",
        description=__doc__, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", metavar="FILE.yaml", help="settings file (flags override it)")
    p.add_argument("--photos", metavar="URI", action="append",
                   help="photos with alpha: image/+alpha/ folders, RGBA images or a CSV/Parquet manifest (repeatable)")
    p.add_argument("--backgrounds", metavar="URI", action="append",
                   help="background videos or frame folders (repeatable)")
    p.add_argument("--out", metavar="DIR", help="output folder (local or s3://)")
    p.add_argument("--clips", type=int, metavar="N", help="number of clips (default 8)")
    p.add_argument("--frames", type=int, metavar="T", help="frames per clip (default 30)")
    p.add_argument("--size", metavar="WxH", help="frame size (default 512x288)")
    p.add_argument("--seed", type=int, metavar="S", help="seed; the same sources and seed give the same clips (default 0)")
    p.add_argument("--still-share", type=float, metavar="F",
                   help="share of each clip during which the subject holds still, in [0, 1) (default 0.3; 0: always moving)")
    p.add_argument("--overwrite", action="store_true", default=None,
                   help="replace a benchmark made with another configuration")
    p.set_defaults(run=run)
    return p


def run(args: argparse.Namespace) -> int:
    """Make the benchmark; exit 0 (all written), 3 (some clips failed) or 1 (none written)."""
    from pipelines.cli import EXIT_FAILED, EXIT_OK, EXIT_PARTIAL, UsageError
    from pipelines.config import load, overrides_from_args

    cfg = load(MakeBenchmarkConfig, getattr(args, "config", None), overrides_from_args(args, FLAGS))
    if not cfg.photos or not cfg.backgrounds or not cfg.out:
        raise UsageError("--photos, --backgrounds and --out are required")
    if len(cfg.size) != 2 or min(cfg.size) < 16:
        raise UsageError(f"--size must be WxH with both at least 16, got {cfg.size}")
    if cfg.clips < 1 or cfg.frames < 2:
        raise UsageError("--clips must be >= 1 and --frames >= 2")
    if not 0.0 <= cfg.still_share < 1.0:
        raise UsageError(f"--still-share must be in [0, 1), got {cfg.still_share}")

    from matting_core.data.benchmark import BenchmarkConfig, ConfigMismatch, make_benchmark

    bcfg = BenchmarkConfig(clips=cfg.clips, frames=cfg.frames, size=(int(cfg.size[0]), int(cfg.size[1])),
                           seed=cfg.seed, still_share=cfg.still_share)

    def on_problem(r):
        print(f"matting make-benchmark: {r.uri}: {r.reason}", file=sys.stderr)

    def on_clip(name):
        log.info("clip %s written", name)

    try:
        summary = make_benchmark(cfg.photos, cfg.backgrounds, cfg.out, bcfg, overwrite=cfg.overwrite,
                                 on_problem=on_problem, on_clip=on_clip)
    except ConfigMismatch as exc:
        raise UsageError(str(exc)) from exc
    print(f"{cfg.out}: {len(summary.written)} clip(s) written, {len(summary.skipped)} already there, "
          f"{len(summary.failed)} failed, {len(summary.rejected)} source(s) rejected")
    if summary.planned == 0:
        print("matting make-benchmark: no valid photo or background: nothing to make", file=sys.stderr)
        return EXIT_FAILED
    if summary.failed:
        return EXIT_PARTIAL if summary.written or summary.skipped else EXIT_FAILED
    return EXIT_OK
