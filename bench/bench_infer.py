"""Batch matting throughput and actor memory of `matting infer` against `matting matte`, on this machine.

    python bench/bench_infer.py                 # 4 real videos, 1,555 frames; memory at 100/2,000 frames
    python bench/bench_infer.py --quick         # short videos, memory at 100/300 frames (about 3 minutes)
    python bench/bench_infer.py --model CKPT    # a trained checkpoint instead of fresh weights

Measured (issue 11, "Performance"), every figure the wall time of a whole command in a subprocess,
start-up included, formats `pha,rgba.webm`, the same checkpoint throughout:
  1. `matting infer` over a folder of videos, with `--actors 1` and `--actors 2`: frames/s;
  2. `matting matte` once per video, sequentially, on the same videos: total frames / total seconds;
  3. infer over matte for each actor count. Target: >= 0.85x.
  4. the peak RSS of the one actor (`actor_peak_rss_mb` in the run log, `--actors 1
     --segment-frames 0`) matting a 100-frame and a 2,000-frame 512x288 video, each in its own
     run. Target: flat in length, the long video's within 10% or 100 MB of the short one's.

The videos are real captures from `../shared/data` re-encoded with PyAV to H.264 into a temporary
folder: bikes (250 frames), vtest (795, split into segments by infer's default 300), carphone
(120, played forward and backward to 360) at 512x288, and the street-two-people frames ping-ponged
to 150 at 1920x1080. The selfie prior comes from the model cache or `../shared/models`. Both
commands tune malloc and OpenMP themselves, so they run here with the environment as a user's
shell has it (RAY_ADDRESS removed: each infer starts its own local Ray runtime). Other processes
on these 2 cores distort every figure: the load average is printed before and after.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHARED = ROOT.parent / "shared"
DATA = SHARED / "data" / "videos"
MATTING = Path(sys.executable).with_name("matting")  # the console script of this interpreter's environment
FORMATS = "pha,rgba.webm"
SMALL, HD = (512, 288), (1920, 1080)
TARGET_RATIO = 0.85
TARGET_MEM_FRACTION, TARGET_MEM_MB = 0.10, 100.0

from bench.model_cache import ensure_model_cache  # noqa: E402


@dataclass(frozen=True)
class VideoSpec:
    """One benchmark video: `frames` frames of `source` (ping-ponged when longer) at `size` (W,H)."""

    name: str
    source: Path
    frames: int
    size: tuple[int, int]


def throughput_videos(quick: bool) -> list[VideoSpec]:
    """The archive both commands matte."""
    n = (80, 100, 40, 16) if quick else (250, 795, 360, 150)
    return [VideoSpec("bikes", DATA / "backgrounds" / "bikes.mp4", n[0], SMALL),
            VideoSpec("vtest", DATA / "backgrounds" / "vtest.avi", n[1], SMALL),
            VideoSpec("carphone", DATA / "people" / "carphone.mp4", n[2], SMALL),
            VideoSpec("street-hd", DATA / "people" / "street-two-people" / "frames", n[3], HD)]


def _pingpong(n: int, count: int) -> list[int]:
    """Source positions for `count` frames of an `n`-frame clip played forward, backward, forward..."""
    cycle = list(range(n)) + list(range(n - 2, 0, -1)) if n > 2 else list(range(n))
    return [cycle[i % len(cycle)] for i in range(count)]


def _source_frames(spec: VideoSpec):
    """The spec's frames, uint8 RGB [H,W,3] at its size, streamed (a clip is held only when it loops)."""
    import cv2

    from matting_core.video import iter_frames, probe

    def fit(frame):
        shrink = frame.shape[1] > spec.size[0]
        return cv2.resize(frame, spec.size, interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)

    if spec.source.is_dir():  # a JPEG sequence: read each file when its turn comes
        files = sorted(spec.source.glob("*.jpg"))
        for i in _pingpong(len(files), spec.frames):
            yield fit(cv2.cvtColor(cv2.imread(str(files[i])), cv2.COLOR_BGR2RGB))
        return
    n = probe(str(spec.source), strict=False).frames
    if spec.frames <= n:
        for _, frame in zip(range(spec.frames), iter_frames(str(spec.source))):
            yield fit(frame)
        return
    clip = [fit(f) for f in iter_frames(str(spec.source))]
    for i in _pingpong(len(clip), spec.frames):
        yield clip[i]


def write_video(spec: VideoSpec, folder: str) -> str:
    """Encode the spec to `folder/<name>.mp4` (H.264, crf 18, 25 fps) with PyAV; returns its path."""
    from matting_core.video.writers import AvVideoWriter

    path = os.path.join(folder, f"{spec.name}.mp4")
    with AvVideoWriter(path, 25, spec.size, "libx264", "yuv420p", {"crf": "18", "preset": "veryfast"}) as v:
        for frame in _source_frames(spec):
            v.write(frame)
    return path


def fresh_checkpoint(path: str) -> str:
    """A fresh MattingNet saved to `path` (the same cost per frame as a trained one)."""
    import torch

    from matting_core.model import matting_net, save_checkpoint

    torch.manual_seed(0)
    save_checkpoint(matting_net(backbone_weights="none"), path)
    return path


def _command(args: list[str]) -> tuple[float, str]:
    """Run a `matting` command to completion: (wall seconds, stdout); exits the bench when it fails."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    t0 = time.perf_counter()
    proc = subprocess.run([str(MATTING), *args], capture_output=True, text=True, env=env, cwd=ROOT)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"`matting {' '.join(args)}` exited {proc.returncode}:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return seconds, proc.stdout


def run_matte(videos: list[str], frames: list[int], model: str, out: str) -> dict:
    """`matting matte` once per video, one after the other."""
    per_video = [_command(["matte", v, "-o", out, "--model", model, "--formats", FORMATS, "--no-progress"])[0]
                 for v in videos]
    seconds = sum(per_video)
    return {"frames": sum(frames), "seconds": seconds, "fps": sum(frames) / seconds, "per_video_s": per_video}


def run_infer(archive: str, model: str, out: str, actors: int, segment_frames: int | None = None) -> dict:
    """`matting infer` over `archive`; its frames (from the run log), wall time and run-log lines."""
    args = ["infer", "--input", archive, "--out", out, "--model", model, "--formats", FORMATS,
            "--actors", str(actors), "--run-id", "bench", "--no-progress"]
    if segment_frames is not None:
        args += ["--segment-frames", str(segment_frames)]
    seconds, stdout = _command(args)
    lines = [json.loads(s) for s in Path(out, "_runs", "bench.jsonl").read_text().splitlines() if s.strip()]
    bad = [e for e in lines if e["status"] != "ok"]
    if bad:
        sys.exit(f"infer did not matte every video: {bad}")
    frames = sum(e["frames"] for e in lines)
    # The command's own figure excludes interpreter, Ray and model start-up: printed beside the wall one.
    m = re.search(r"frames\s+\d+ in ([\d.]+) s", stdout)
    return {"actors": actors, "frames": frames, "seconds": seconds, "fps": frames / seconds,
            "in_run_s": float(m.group(1)) if m else None, "videos": lines}


def bench_memory(lengths: list[int], model: str, work: str) -> list[dict]:
    """Peak RSS of the single actor matting one bikes video of each length, unsplit, in its own run."""
    rows = []
    for n in lengths:
        folder = os.path.join(work, f"mem-{n}")
        os.makedirs(folder)
        write_video(VideoSpec(f"bikes-{n}", DATA / "backgrounds" / "bikes.mp4", n, SMALL), folder)
        r = run_infer(folder, model, os.path.join(work, f"mem-out-{n}"), actors=1, segment_frames=0)
        rows.append({"frames": r["frames"], "seconds": r["seconds"],
                     "actor_peak_rss_mb": r["videos"][0]["actor_peak_rss_mb"]})
    return rows


def _entry(run: dict, name: str) -> dict:
    """The run-log line of the video `name`.mp4."""
    return next(e for e in run["videos"] if os.path.basename(e["uri"]) == f"{name}.mp4")


def _verdict(ok: bool) -> str:
    return "met" if ok else "MISSED"


def report(specs, matte: dict, infers: list[dict], memory: list[dict]) -> dict:
    """Print the table and the targets; returns the figures."""
    print(f"\n{'run':<34} {'frames':>6} {'wall s':>8} {'frames/s':>9} {'in-run s':>9} {'vs matte':>9}")
    print(f"{'matte, once per video (sequential)':<34} {matte['frames']:6d} {matte['seconds']:8.1f} "
          f"{matte['fps']:9.2f} {'':>9} {'1.00x':>9}")
    verdicts = {}
    for r in infers:
        r["ratio"] = r["fps"] / matte["fps"]
        verdicts[f"infer_{r['actors']}_actor_ratio"] = r["ratio"] >= TARGET_RATIO
        in_run = f"{r['in_run_s']:9.1f}" if r["in_run_s"] is not None else f"{'?':>9}"
        print(f"{'infer --actors ' + str(r['actors']):<34} {r['frames']:6d} {r['seconds']:8.1f} {r['fps']:9.2f} "
              f"{in_run} {r['ratio']:8.2f}x")
    print(f"\n{'video':<10} {'frames':>6} {'size':>10} {'matte s':>8}" +
          "".join(f" {'actor s (' + str(r['actors']) + ')':>12}" for r in infers) + "   (actor s: matting time summed"
          " over segments)")
    for i, s in enumerate(specs):
        cells = "".join(f" {_entry(r, s.name)['seconds']:12.1f}" for r in infers)
        print(f"{s.name:<10} {s.frames:6d} {s.size[0]:>5}x{s.size[1]:<4} {matte['per_video_s'][i]:8.1f}{cells}")
    print("\nactor peak RSS (--actors 1 --segment-frames 0, 512x288):")
    for m in memory:
        print(f"  {m['frames']:5d} frames: {m['actor_peak_rss_mb']:7.1f} MB  (run {m['seconds']:.1f} s)")
    short, long_ = memory[0]["actor_peak_rss_mb"], memory[-1]["actor_peak_rss_mb"]
    growth = long_ - short
    verdicts["memory_flat"] = growth <= max(TARGET_MEM_FRACTION * short, TARGET_MEM_MB)
    print("\ntargets:")
    for r in infers:
        ok = verdicts[f"infer_{r['actors']}_actor_ratio"]
        print(f"  infer --actors {r['actors']} >= {TARGET_RATIO}x sequential matte: {_verdict(ok)} ({r['ratio']:.2f}x)")
    print(f"  actor memory flat ({memory[-1]['frames']} vs {memory[0]['frames']} frames within "
          f"{100 * TARGET_MEM_FRACTION:.0f}% or {TARGET_MEM_MB:.0f} MB): {_verdict(verdicts['memory_flat'])} "
          f"({growth:+.1f} MB, {100 * growth / short:+.1f}%)")
    return {"matte": matte, "infer": infers, "memory": memory, "targets_met": verdicts}


def main(argv: list[str] | None = None) -> int:
    """Make the videos, run the commands and print the figures (and JSON with --json)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="checkpoint path or models:/ ref (default: fresh weights)")
    p.add_argument("--quick", action="store_true", help="232 frames of the 4 videos, memory at 100 and 300 frames")
    p.add_argument("--actors", default="1,2", help="actor counts of the infer runs")
    p.add_argument("--memory-lengths", default=None, help="video lengths of the peak-RSS runs (default 100,2000)")
    p.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = p.parse_args(argv)
    if not MATTING.is_file():
        sys.exit(f"{MATTING} absent: run the bench with the project's virtualenv Python")
    missing = [str(s.source) for s in throughput_videos(False) if not s.source.exists()]
    if missing:
        sys.exit(f"sample data absent: {missing}")
    lengths = [int(v) for v in (args.memory_lengths or ("100,300" if args.quick else "100,2000")).split(",")]
    ensure_model_cache()
    specs = throughput_videos(args.quick)
    print(f"cores {len(os.sched_getaffinity(0))}, load average {os.getloadavg()[0]:.1f}; formats {FORMATS}", flush=True)
    with tempfile.TemporaryDirectory(prefix="bench-infer-") as work:
        model = args.model or fresh_checkpoint(os.path.join(work, "fresh.pt"))
        archive = os.path.join(work, "archive")
        os.makedirs(archive)
        videos = [write_video(s, archive) for s in specs]
        print(f"model {args.model or 'fresh MattingNet (backbone_weights=none)'}; archive "
              + ", ".join(f"{s.name} {s.frames} f {s.size[0]}x{s.size[1]}" for s in specs)
              + f" = {sum(s.frames for s in specs)} frames", flush=True)
        matte = run_matte(videos, [s.frames for s in specs], model, os.path.join(work, "matte-out"))
        print(f"matte done: {matte['fps']:.2f} frames/s", flush=True)
        infers = []
        for n in (int(v) for v in args.actors.split(",")):
            infers.append(run_infer(archive, model, os.path.join(work, f"infer-out-{n}"), n))
            print(f"infer --actors {n} done: {infers[-1]['fps']:.2f} frames/s", flush=True)
        memory = bench_memory(lengths, model, work)
    figures = report(specs, matte, infers, memory)
    figures["load_after"] = os.getloadavg()[0]
    print(f"load average after {figures['load_after']:.1f}")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
