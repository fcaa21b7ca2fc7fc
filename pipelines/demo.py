"""`matting demo`: the whole trained chain on embedded defaults, offline, on a laptop, in minutes.

1. procedural sources: person-like photos with soft hair edges, moving backgrounds; two more sets
   of people and scenes held out, one to validate on, one for the benchmark;
2. `generate`: a fake-motion clip dataset on a local Ray runtime, and validation clips of the
   validation people over their scenes (at the benchmark's size);
3. `train`: the `cpu-small` recipe with `DEMO_RECIPE`'s changes for a few minutes on Ray Train
   (2 workers), tracked in a local MLflow store and registered with alias `candidate`;
4. `promote`: that version becomes `champion`;
5. `make-benchmark`: clips of the held-out people with exact alpha and motion unlike the generator's;
6. `infer`: the benchmark, as an archive, matted with `models:/NAME@champion`;
7. `evaluate`: the trained model beside the prior-only baselines (JSON, CSV, HTML), then a
   one-screen summary, the loss curve (`loss.png`) and one frame's outputs (`preview.png`).
Everything lands under --out (the MLflow store too, unless MLFLOW_TRACKING_URI is set).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
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
    clips: PositiveInt = option(192, "training clips to generate", metavar="N")
    val_clips: PositiveInt = option(16, "validation clips to generate (of people of their own)", metavar="N")
    workers: PositiveInt = option(2, "Ray workers (generate, train)", metavar="N")
    seed: NonNegativeInt = option(0, "seed of the sources, the dataset and the benchmark", metavar="S")
    photos: PositiveInt = option(96, "procedural photos to train on", metavar="N")
    held_out: PositiveInt = option(4, "procedural photos held out for the benchmark (as many for validation)",
                                   metavar="N")
    videos: PositiveInt = option(8, "procedural background videos to train on", metavar="N")
    held_out_videos: PositiveInt = option(3, "procedural background videos held out for the benchmark "
                                          "(as many for validation)", metavar="N")
    steps: PositiveInt = option(400, "training steps (cpu-small preset with DEMO_RECIPE)", metavar="K")
    benchmark_clips: PositiveInt = option(12, "benchmark clips", metavar="N")
    benchmark_frames: Annotated[int, Interval(ge=2)] = option(16, "frames per benchmark clip", metavar="T")
    model_name: str = option("demo-matting", "registered model name", metavar="NAME")
    model: str = option("", "matte with this checkpoint or models:/ reference instead of training one",
                        metavar="REF")


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
        # The halo is the thin text shifted around, not thick text: a thicker stroke widens each
        # glyph's advance, so a long label's halo would drift away from its letters.
        for dx, dy in ((-1, -1), (-1, 1), (1, -1), (1, 1), (0, 2), (0, -2), (2, 0), (-2, 0)):
            cv2.putText(tile, label, (8 + dx, 22 + dy), cv2.FONT_HERSHEY_SIMPLEX, 0.6, (255, 255, 255), 1,
                        cv2.LINE_AA)
        cv2.putText(tile, label, (8, 22), cv2.FONT_HERSHEY_SIMPLEX, 0.6, (0, 0, 0), 1, cv2.LINE_AA)
    sheet = np.concatenate([np.concatenate(tiles[:2], 1), np.concatenate(tiles[2:], 1)], 0)
    cv2.imwrite(out_png, sheet)
    return out_png


def _loss_curve(run_id: str, out: str) -> str:
    """The loss curve `matting train` logged with its run, copied to `out/loss.png`."""
    import shutil
    import tempfile

    from mlflow.tracking import MlflowClient

    from pipelines.model_ref import tracking_uri

    with tempfile.TemporaryDirectory() as tmp:
        local = MlflowClient(tracking_uri()).download_artifacts(run_id, "loss_curve.png", tmp)
        return shutil.copy(local, os.path.join(out, "loss.png"))


def run_demo(cfg: DemoConfig) -> int:
    """Run every stage; returns the exit status (the worst of the stages')."""
    from matting_core.data.fakemotion import FakeMotionConfig
    from matting_core.data.synthetic import write_sources
    from pipelines.cli import main as cli
    from pipelines.generate import GenerateConfig, run_generate

    t0 = time.time()
    out = os.path.abspath(cfg.out)
    refusal = _claim_output(out)
    if refusal:
        print(f"matting demo: {refusal}", file=sys.stderr)
        return 2
    # The demo's own MLflow store (absolute: Ray workers log to it too), unless one is configured;
    # set in the environment because every stage (train, promote, infer) reads it from there.
    os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{os.path.join(out, 'mlflow.db')}")
    stages = 7 if not cfg.model else 5
    step = iter(range(1, stages + 1))
    print(f"[{next(step)}/{stages}] procedural sources -> {out}/sources")
    src = write_sources(os.path.join(out, "sources", "train"), photos=cfg.photos, videos=cfg.videos, seed=cfg.seed)
    held = write_sources(os.path.join(out, "sources", "held-out"), photos=cfg.held_out, videos=cfg.held_out_videos,
                         seed=cfg.seed + 1000)
    # Validation has people and scenes of its own: what it fits at the end (the output settings)
    # is then measured on the benchmark's people without ever having seen them.
    val_src = write_sources(os.path.join(out, "sources", "val"), photos=cfg.held_out, videos=cfg.held_out_videos,
                            seed=cfg.seed + 2000)

    print(f"[{next(step)}/{stages}] matting generate -> {out}/clips")
    gen = GenerateConfig(photos=(src["photos"],), backgrounds=(src["backgrounds"],),
                         out=os.path.join(out, "clips"), clips=cfg.clips, workers=cfg.workers,
                         seed=cfg.seed, progress=sys.stderr.isatty(),
                         fakemotion=FakeMotionConfig(size=DEMO_CLIP_SIZE))
    summary = run_generate(gen)
    print(summary.message)
    statuses = [summary.status]
    if summary.status == 1:
        return 1
    # Validation watches people and scenes no training clip has, so every training clip trains
    # (the final model is registered whatever validation says); its clips are made at the
    # benchmark's size, where the fit after the last step sees the refiner upsample as it will.
    val = run_generate(dataclasses.replace(gen, photos=(val_src["photos"],), backgrounds=(val_src["backgrounds"],),
                                           out=os.path.join(out, "val-clips"), clips=cfg.val_clips,
                                           seed=cfg.seed + 1, fakemotion=FakeMotionConfig(size=BENCHMARK_SIZE)))
    statuses.append(val.status)
    if val.status == 1:
        print(val.message)
        return 1

    facts: dict = {"clips": summary.manifest.get("counts", {}).get("clips_written", 0)}
    model = cfg.model
    if not model:
        model, status = _train_and_promote(cfg, out, next(step), stages, facts)
        statuses.append(status)
        if status != 0:
            return status

    bench = os.path.join(out, "benchmark")
    print(f"[{next(step)}/{stages}] matting make-benchmark (held-out people) -> {bench}")
    statuses.append(cli(["make-benchmark", "--photos", held["photos"], "--backgrounds", held["backgrounds"],
                         "--out", bench, "--clips", str(cfg.benchmark_clips),
                         "--frames", str(cfg.benchmark_frames), "--size", "x".join(map(str, BENCHMARK_SIZE)),
                         "--seed", str(cfg.seed)]))
    if statuses[-1] == 1:
        return 1
    facts["coverage"] = benchmark_coverage(bench)

    mattes = os.path.join(out, "mattes")
    print(f"[{next(step)}/{stages}] matting infer {model} over the benchmark -> {mattes}")
    statuses.append(cli(["infer", "--model", model, "--input", bench, "--out", mattes, "--actors", str(cfg.workers),
                         "--formats", "pha,fgr,rgba.webm,composite.mp4", "--no-progress"]))
    if statuses[-1] == 1:
        return 1

    report = os.path.join(out, "report", "evaluation.json")
    print(f"[{next(step)}/{stages}] matting evaluate -> {report} (+ .csv, .html)")
    statuses.append(cli(["evaluate", "--true", bench, "--pred", f"model={mattes}", "--out", report]))

    clips = sorted(d for d in os.listdir(bench) if os.path.isdir(os.path.join(bench, d, "com")))
    preview = write_preview(os.path.join(bench, clips[0]), os.path.join(mattes, clips[0]),
                            os.path.join(out, "preview.png"), index=cfg.benchmark_frames // 2)
    status = max(statuses)  # 0 ok < 1 failed < 2 usage < 3 partial; 1 and 2 returned early
    print(summary_text(cfg, out, facts, report, preview, time.time() - t0, status))
    return status


MARKER = ".matting-demo"
# what a demo run makes under --out: a rerun starts afresh (its own registry included)
_STAGES = ("sources", "clips", "val-clips", "runs", "benchmark", "mattes", "report", "mlflow.db", "mlartifacts",
           "preview.png", "loss.png")


def _claim_output(out: str) -> str | None:
    """Make `out` the demo's: empty a previous demo's outputs; refuse (returns why) a folder of something else."""
    import shutil

    # a folder holding only what demos make (this one's, or the untrained checkpoint of older ones)
    known = set(_STAGES) | {MARKER, "model-untrained.pt"}
    if os.path.isdir(out) and not os.path.exists(os.path.join(out, MARKER)) and set(os.listdir(out)) - known:
        return f"{out} is not empty and was not made by matting demo: choose another --out"
    for name in (*_STAGES, "model-untrained.pt"):
        path = os.path.join(out, name)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        elif os.path.lexists(path):
            os.remove(path)
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, MARKER), "w") as f:
        f.write("made by matting demo: a rerun replaces what is here\n")
    return None


# What the demo changes in `cpu-small`. Its people are procedural and unlimited, so the guards
# `cpu-small` keeps for a handful of real people (an encoder that learns at a tenth of the lr with
# its first stages frozen, frozen batch-norm statistics) only slow down learning what a person is
# from a random encoder: here every layer learns at one lr, with batch statistics (per worker on
# CPUs). Frames of 192x96 buy more steps in the demo's minutes than 256x144, and keep the smaller
# people that 128x72 loses; the network pads to multiples of 32, so 192x108 would cost 192x128.
# (The README's demo section has the measurements.)
# The first half of the steps train on the frames alone (`prior_off_steps`, set from --steps by
# `demo_recipe`), with an alpha squared error beside L1 (`loss.mse`): seeded with the prior from the
# start, the net only grew and trimmed what the prior found, and returned an empty matte on a
# held-out scene where the prior sees nobody; L1 alone keeps a net that must find people itself
# at an empty matte for all of a demo's steps. After those steps 30% of the samples keep an empty
# prior: without them the net kept calling bright patches of the background a person where the
# prior is empty (README, the demo).
DEMO_RECIPE = {"bn": "sync", "augment": {"size": [192, 96]}, "loss": {"mse": 10.0}, "prior_off_share": 0.3,
               "optim": {"lr": 2e-3, "encoder_lr_scale": 1.0, "freeze_stages": 0, "head_lr_scale": 1.0,
                         "calibration_lr_scale": 1.0, "warmup_steps": 30}}
# The demo's clips are made at (W, H) 256x144, not generate's 512x288: training crops them to
# 192x96 anyway, and every sample decodes its frames and runs the prior stream at the clip's size
# (nearer the 192x108 the model's prior runs at when it mattes). The benchmark and the
# validation clips are (W, H) BENCHMARK_SIZE.
DEMO_CLIP_SIZE = (256, 144)
BENCHMARK_SIZE = (512, 288)


def demo_recipe(steps: int) -> dict:
    """DEMO_RECIPE for a run of `steps` steps: the first half of them on the frames alone."""
    return {**DEMO_RECIPE, "prior_off_steps": steps // 2}


def _train_and_promote(cfg: DemoConfig, out: str, k: int, stages: int, facts: dict) -> tuple[str, int]:
    """Train on the demo's clips, register and promote; returns (`models:/NAME@champion`, status)."""
    from pipelines.promote import PromoteConfig, promote
    from pipelines.train import TrainConfig, TrainRefused, run_train

    print(f"[{k}/{stages}] matting train (cpu-small + DEMO_RECIPE, {cfg.steps} steps, {cfg.workers} workers) "
          f"-> models:/{cfg.model_name}@candidate")
    train = TrainConfig(data=os.path.join(out, "clips"), val_data=os.path.join(out, "val-clips"), preset="cpu-small",
                        steps=cfg.steps, workers=cfg.workers, storage=os.path.join(out, "runs"), experiment="demo",
                        run_name=f"demo-{cfg.steps}", register_as=cfg.model_name, recipe=demo_recipe(cfg.steps))
    try:
        result = run_train(train, out=sys.stdout)
    except TrainRefused as exc:
        print(f"matting demo: training refused: {exc}", file=sys.stderr)
        return "", 1
    if not result.registered:
        print("matting demo: training registered no model", file=sys.stderr)
        return "", 1
    version = result.registered.rsplit("/", 1)[-1]
    promote(PromoteConfig(name=cfg.model_name, version=version, alias="champion"))
    facts.update(steps=result.steps, train_seconds=result.seconds, val=result.metrics, version=version,
                 loss_png=_loss_curve(result.run_id, out))
    print(f"[{k}/{stages}] promoted {cfg.model_name} version {version} to champion")
    return f"models:/{cfg.model_name}@champion", 0


def benchmark_coverage(bench: str) -> tuple[int, int]:
    """(people, scenes): how many distinct photos and background videos the benchmark's clips show."""
    with open(os.path.join(bench, "benchmark.json")) as f:
        clips = json.load(f)["clips"]
    return len({c["photo"] for c in clips}), len({c["background"] for c in clips})


def summary_text(cfg: DemoConfig, out: str, facts: dict, report: str, preview: str, seconds: float,
                 status: int) -> str:
    """The one-screen summary of a demo run."""
    with open(report) as f:
        methods = {m["name"]: m["overall"] for m in json.load(f)["methods"]}
    model = methods.get("model", {})
    baselines = {k: v for k, v in methods.items() if k != "model" and "mad" in v}
    best = min(baselines, key=lambda k: baselines[k]["mad"]) if baselines else None
    lines = [f"demo summary ({seconds:.0f} s, status {status}); outputs under {out}",
             f"  data       {facts['clips']} fake-motion clips from {cfg.photos} procedural photos and "
             f"{cfg.videos} background videos"]
    if "steps" in facts:
        val = facts["val"]
        curve = (f" ({val['val/fitted_mad']:.1f} at full size through the refiner radius "
                 f"{val['val/refine_radius']:g} and output curve gain {val['val/curve_gain']:g} fitted there)"
                 if "val/fitted_mad" in val else "")
        lines.append(f"  training   {facts['steps']} steps in {facts['train_seconds']:.0f} s; validation MAD "
                     f"{val.get('val/mad', float('nan')):.1f}{curve}, dtSSD {val.get('val/dtssd', float('nan')):.2f}; "
                     f"loss curve {facts['loss_png']}")
        lines.append(f"  registry   models:/{cfg.model_name}/{facts['version']} (aliases candidate, champion)")
    if model:
        # A few clips may miss some of the held-out people and scenes: the line says which share it shows.
        people, scenes = facts["coverage"]  # set when the benchmark is made, before anything is evaluated
        lines.append(f"  benchmark  {cfg.benchmark_clips} clips x {cfg.benchmark_frames} frames ({people} of "
                     f"{cfg.held_out} held-out people, {scenes} of {cfg.held_out_videos} scenes): "
                     f"model MAD {model['mad']:.1f}, MSE {model['mse']:.1f}, dtSSD {model['dtssd']:.2f}")
    if best:
        lines.append(f"             best prior-only baseline {best}: MAD {baselines[best]['mad']:.1f}")
    lines.append(f"  report     {os.path.splitext(report)[0]}.html; preview {preview}")
    return "\n".join(lines)


EPILOG = """examples:
  matting demo
  matting demo --out /tmp/demo --clips 200 --steps 600
  matting demo --model checkpoints/model.pt     # skip training: matte with this model
"""


def add_parser(sub) -> None:
    """Register `matting demo`."""
    cfglib.add_command(sub, "demo", DemoConfig, run, help="run the whole pipeline on embedded defaults",
                       description=__doc__, epilog=EPILOG)


def run(args: argparse.Namespace) -> int:
    """CLI entry."""
    return run_demo(cfglib.from_args(DemoConfig, args))
