"""`matting demo`: the whole pipeline on embedded defaults, offline, on a laptop.

Procedural sources (person-like photos with soft hair edges, textured moving backgrounds) ->
`generate` a fake-motion clip dataset on a local Ray runtime. Everything lands under --out.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from dataclasses import dataclass

from pipelines import config as cfglib


@dataclass(frozen=True)
class DemoConfig:
    """Configuration of `matting demo`."""

    out: str = "demo-output"
    clips: int = 48
    workers: int = 2
    seed: int = 0
    photos: int = 12
    videos: int = 3


def run_demo(cfg: DemoConfig) -> int:
    """Run every stage; returns the exit status."""
    from matting_core.synthetic import write_sources
    from pipelines.generate import GenerateConfig, run_generate

    t0 = time.time()
    os.makedirs(cfg.out, exist_ok=True)
    print(f"[1/2] procedural sources -> {cfg.out}/sources")
    src = write_sources(os.path.join(cfg.out, "sources"), photos=cfg.photos, videos=cfg.videos, seed=cfg.seed)
    print(f"[2/2] matting generate -> {cfg.out}/clips")
    gen = GenerateConfig(photos=(src["photos"],), backgrounds=(src["backgrounds"],),
                         out=os.path.join(cfg.out, "clips"), clips=cfg.clips, workers=cfg.workers,
                         seed=cfg.seed, progress=sys.stderr.isatty())
    summary = run_generate(gen)
    print(summary.message)
    if summary.status not in (0, 3):
        return summary.status
    print(f"demo finished in {time.time() - t0:.0f} s; outputs under {os.path.abspath(cfg.out)}")
    return summary.status


def add_parser(sub) -> None:
    """Register `matting demo`."""
    p = sub.add_parser("demo", help="run the whole pipeline on embedded defaults",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog="examples:\n  matting demo\n  matting demo --out /tmp/demo --clips 200\n")
    p.add_argument("--config", help="YAML file with DemoConfig fields")
    p.add_argument("--out", help="output folder (default demo-output)")
    p.add_argument("--clips", type=int, help="clips to generate (default 48)")
    p.add_argument("--workers", type=int, help="Ray workers (default 2)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """CLI entry."""
    cfg = cfglib.load(DemoConfig, args.config, cfglib.overrides_from_args(
        args, {"out": "out", "clips": "clips", "workers": "workers"}))
    return run_demo(cfg)
