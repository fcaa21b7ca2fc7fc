"""`matting demo`: the whole pipeline on embedded defaults, offline, on a laptop.

1. procedural sources: person-like photos with soft hair edges, textured moving backgrounds;
2. `generate`: a fake-motion clip dataset on a local Ray runtime;
3. `make-benchmark`: evaluation clips with exact alpha and motion unlike the generator's;
4. `matte`: each benchmark clip matted by a checkpoint (a freshly initialised one unless
   --model is given: training arrives with `matting train`), with the selfie prior;
5. `evaluate`: the model beside the prior-only baselines, as JSON, CSV and an HTML report;
6. `preview.png`: one frame's outputs side by side.
Everything lands under --out.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass

from pipelines import config as cfglib
from pipelines.config import Annotated, Interval, NonNegativeInt, PositiveInt, option


@dataclass(frozen=True)
class DemoConfig:
    """Configuration of `matting demo`."""

    out: str = option("demo-output", "output folder", metavar="DIR")
    clips: PositiveInt = option(48, "clips to generate", metavar="N")
    workers: PositiveInt = option(2, "Ray workers", metavar="N")
    seed: NonNegativeInt = option(0, "seed of the sources, the dataset and the benchmark", metavar="S")
    photos: PositiveInt = option(12, "procedural photos to make", metavar="N")
    videos: PositiveInt = option(3, "procedural background videos to make", metavar="N")
    benchmark_clips: PositiveInt = option(2, "benchmark clips", metavar="N")
    benchmark_frames: Annotated[int, Interval(ge=2)] = option(24, "frames per benchmark clip", metavar="T")
    model: str = option("", "checkpoint or models:/ reference to matte with (unset: a fresh, untrained one)",
                        metavar="REF")


def _fresh_checkpoint(path: str) -> str:
    import torch

    from matting_core.model import matting_net, save_checkpoint

    torch.manual_seed(0)
    save_checkpoint(matting_net(backbone_weights="none"), path)
    return path


def write_preview(clip_dir: str, matte_dir: str, out_png: str, index: int = 0) -> str:
    """One frame's outputs side by side: input | predicted alpha | foreground over green | true alpha."""
    import cv2
    import numpy as np

    from matting_core.video import decode_image, frame_files

    def pick(folder: str) -> np.ndarray:
        files = frame_files(folder)
        with open(files[min(index, len(files) - 1)], "rb") as f:
            return decode_image(f.read(), folder, cv2.IMREAD_COLOR)

    com = pick(os.path.join(clip_dir, "com"))
    pha = pick(os.path.join(matte_dir, "pha"))
    fgr = pick(os.path.join(matte_dir, "fgr"))
    true = pick(os.path.join(clip_dir, "pha"))
    a = pha[..., :1].astype(np.float32) / 255.0
    green = np.zeros_like(fgr)
    green[:] = (64, 177, 0)  # BGR
    over = (a * fgr + (1 - a) * green + 0.5).astype(np.uint8)
    tiles = [com, pha, over, true]
    labels = ["input", "predicted alpha", "foreground over green", "true alpha"]
    for tile, label in zip(tiles, labels):
        cv2.putText(tile, label, (8, 22), cv2.FONT_HERSHEY_SIMPLEX, 0.6, (255, 255, 255), 2, cv2.LINE_AA)
        cv2.putText(tile, label, (8, 22), cv2.FONT_HERSHEY_SIMPLEX, 0.6, (0, 0, 0), 1, cv2.LINE_AA)
    sheet = np.concatenate([np.concatenate(tiles[:2], 1), np.concatenate(tiles[2:], 1)], 0)
    cv2.imwrite(out_png, sheet)
    return out_png


def run_demo(cfg: DemoConfig) -> int:
    """Run every stage; returns the exit status (the worst of the stages')."""
    from matting_core.data.synthetic import write_sources
    from pipelines.cli import main as cli
    from pipelines.generate import GenerateConfig, run_generate

    t0 = time.time()
    out = cfg.out
    os.makedirs(out, exist_ok=True)
    print(f"[1/6] procedural sources -> {out}/sources")
    src = write_sources(os.path.join(out, "sources"), photos=cfg.photos, videos=cfg.videos, seed=cfg.seed)

    print(f"[2/6] matting generate -> {out}/clips")
    gen = GenerateConfig(photos=(src["photos"],), backgrounds=(src["backgrounds"],),
                         out=os.path.join(out, "clips"), clips=cfg.clips, workers=cfg.workers,
                         seed=cfg.seed, progress=sys.stderr.isatty())
    summary = run_generate(gen)
    print(summary.message)
    statuses = [summary.status]
    if summary.status == 1:
        return 1

    bench = os.path.join(out, "benchmark")
    print(f"[3/6] matting make-benchmark -> {bench}")
    statuses.append(cli(["make-benchmark", "--photos", src["photos"], "--backgrounds", src["backgrounds"],
                         "--out", bench, "--clips", str(cfg.benchmark_clips),
                         "--frames", str(cfg.benchmark_frames), "--size", "512x288", "--seed", str(cfg.seed)]))
    if statuses[-1] == 1:
        return 1

    model = cfg.model or _fresh_checkpoint(os.path.join(out, "model-untrained.pt"))
    mattes = os.path.join(out, "mattes")
    clips = sorted(d for d in os.listdir(bench) if os.path.isdir(os.path.join(bench, d, "com")))
    print(f"[4/6] matting matte {len(clips)} benchmark clip(s) with {model} -> {mattes}")
    for clip in clips:
        statuses.append(cli(["matte", os.path.join(bench, clip, "com"), "-o", mattes, "--model", model,
                             "--formats", "pha,fgr,rgba.webm,composite.mp4"]))
        if statuses[-1] == 1:
            return 1

    report = os.path.join(out, "report", "evaluation.json")
    print(f"[5/6] matting evaluate -> {report} (+ .csv, .html)")
    statuses.append(cli(["evaluate", "--true", bench, "--pred", f"model={mattes}", "--out", report]))

    preview = write_preview(os.path.join(bench, clips[0]), os.path.join(mattes, clips[0]),
                            os.path.join(out, "preview.png"), index=cfg.benchmark_frames // 2)
    print(f"[6/6] preview of one frame -> {preview}")
    status = max(statuses)  # 0 ok < 1 failed < 2 usage < 3 partial; 1 and 2 returned early
    print(f"demo finished in {time.time() - t0:.0f} s with status {status}; outputs under {os.path.abspath(out)}")
    return status


EPILOG = """examples:
  matting demo
  matting demo --out /tmp/demo --clips 200
  matting demo --model checkpoints/model.pt
"""


def add_parser(sub) -> None:
    """Register `matting demo`."""
    cfglib.add_command(sub, "demo", DemoConfig, run, help="run the whole pipeline on embedded defaults",
                       description=__doc__, epilog=EPILOG)


def run(args: argparse.Namespace) -> int:
    """CLI entry."""
    return run_demo(cfglib.from_args(DemoConfig, args))
