"""Prints ms/frame at 512x288 for the priors, DIS flow, the temporal smoother, and the key-frame
experiment (prior on every k-th frame, carried by flow in between: cost and MAD vs per-frame prior);
then smoothing quality on still-part make-benchmark clips: raw selfie prior, flow-free average
(s_t = 0.5 p_t + 0.5 s_t-1) and the smoother (default and legacy settings) side by side, dtSSD,
MAD and ms/frame, on the benchmark the smoother was tuned on and on a held-out one (other
portraits, other seed), both built into a temporary folder.

Usage: python bench/bench_prior_flow.py [--frames N] [--clips N] [--clip-frames T] [--smoothing-only]
Reads the sample data and the selfie model from ../shared (skips what is absent). Applies the
malloc tuning that `matting matte` applies (matting_core.runtime.tune_malloc) before timing.
"""
from __future__ import annotations

import argparse
import csv
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

from matting_core.data.benchmark import BenchmarkConfig, make_benchmark
from matting_core.evaluation.evaluate import StreamMethod, evaluate, scan_benchmark
from matting_core.flow import PRESETS, SMOOTHER_PRESETS, TemporalSmoother, dis_flow
from matting_core.prior import PriorStream, make_prior
from matting_core.runtime import tune_malloc

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
SIZE = (512, 288)  # (W, H)
P3M = SHARED / "data" / "photos" / "p3m"
BACKGROUNDS = SHARED / "data" / "videos" / "backgrounds"
# Disjoint portraits and seeds: tuned on the first, reported on both (tests/test_flow.py checks the second).
SPLITS = {"tuning": (slice(0, 4), 1), "held-out": (slice(4, None), 2)}
FLOW_FREE_WEIGHT = 0.5


def _frames(path: Path, limit: int) -> list[np.ndarray]:
    import av

    if path.is_dir():
        files = sorted(path.glob("*.jpg"))[:limit]
        return [cv2.resize(cv2.cvtColor(cv2.imread(str(f)), cv2.COLOR_BGR2RGB), SIZE,
                           interpolation=cv2.INTER_AREA) for f in files]
    out = []
    with av.open(str(path)) as container:
        for frame in container.decode(video=0):
            out.append(cv2.resize(frame.to_ndarray(format="rgb24"), SIZE, interpolation=cv2.INTER_AREA))
            if len(out) >= limit:
                break
    return out


def _ms(fn, items, warmup: int = 2) -> float:
    for item in items[:warmup]:
        fn(item)
    start = time.perf_counter()
    for item in items:
        fn(item)
    return (time.perf_counter() - start) / len(items) * 1e3


def split_photos(split: str) -> list[Path]:
    """The p3m portraits of a split (sorted by name)."""
    return sorted((P3M / "image").glob("*.jpg"))[SPLITS[split][0]]


def build_still_benchmark(out: Path, split: str, clips: int, frames: int) -> Path:
    """make-benchmark of one split's portraits over the background videos (still_share 0.3) into `out`."""
    out.mkdir(parents=True, exist_ok=True)
    manifest = out / "photos.csv"
    with open(manifest, "w", newline="") as f:
        rows = csv.writer(f)
        rows.writerow(["image", "alpha"])
        rows.writerows([str(p), str(P3M / "alpha" / f"{p.stem}.png")] for p in split_photos(split))
    cfg = BenchmarkConfig(clips=clips, frames=frames, size=SIZE, seed=SPLITS[split][1], still_share=0.3)
    summary = make_benchmark([str(manifest)], [str(BACKGROUNDS)], str(out / "bench"), cfg)
    if summary.failed or not summary.written:
        raise RuntimeError(f"{split} benchmark: {summary.failed or 'nothing written'}")
    return out / "bench"


class _Timed:
    """Calls a function and adds up the seconds it takes."""

    def __init__(self):
        self.seconds, self.calls = 0.0, 0

    def __call__(self, fn, *args):
        start = time.perf_counter()
        out = fn(*args)
        self.seconds += time.perf_counter() - start
        self.calls += 1
        return out

    @property
    def ms(self) -> float:
        return self.seconds / max(self.calls, 1) * 1e3


def _flow_free():
    """s_t = w p_t + (1 - w) s_t-1, no flow: the baseline a motion-compensated smoother must beat."""
    state = []

    def step(_frame, p):
        state[:] = [p if not state else FLOW_FREE_WEIGHT * p + (1 - FLOW_FREE_WEIGHT) * state[0]]
        return state[0]
    return step


# name -> a fresh per-clip smoothing step(frame, prior map) -> map
SMOOTHINGS = {"raw prior": lambda: (lambda _frame, p: p), "flow-free average": _flow_free,
              **{f"smoother ({k})": (lambda v=v: TemporalSmoother(**v)) for k, v in SMOOTHER_PRESETS.items()}}


def smoothing_figures(bench: Path, prior) -> tuple[list[tuple[str, float, float, float]], float]:
    """([(method, dtSSD, MAD, smoothing ms/frame)], prior ms/frame) on a benchmark folder."""
    prior_timer, timers = _Timed(), {name: _Timed() for name in SMOOTHINGS}

    def method(name: str) -> StreamMethod:
        def start(_clip):
            step, timer = SMOOTHINGS[name](), timers[name]
            return lambda com: (timer(step, com, prior_timer(prior, com)), None)
        return StreamMethod(name, start)

    result = evaluate(scan_benchmark(str(bench)), [method(name) for name in SMOOTHINGS],
                      metrics=("mad", "dtssd"), worst_frames=1)
    rows = [(m.name, m.overall["dtssd"], m.overall["mad"], timers[m.name].ms) for m in result.methods]
    return rows, prior_timer.ms


def report_smoothing(clips: int, frames: int) -> None:
    """Build both still-part benchmarks and print the smoothing figures side by side."""
    print(f"\n# smoothing on still-part make-benchmark clips ({clips} clips x {frames} frames, "
          f"{SIZE[0]}x{SIZE[1]}, still_share 0.3, p3m portraits over {BACKGROUNDS.name}/)")
    prior = make_prior("selfie")
    with tempfile.TemporaryDirectory() as tmp:
        for split, (_, seed) in SPLITS.items():
            bench = build_still_benchmark(Path(tmp) / split, split, clips, frames)
            rows, prior_ms = smoothing_figures(bench, prior)
            print(f"\n{split}: seed {seed}, portraits {', '.join(p.stem for p in split_photos(split))}; "
                  f"the prior itself {prior_ms:.2f} ms/frame")
            print(f"{'method':22s} {'dtSSD':>7s} {'vs raw':>7s} {'MAD':>7s} {'vs raw':>7s} {'smoothing ms/frame':>19s}")
            raw_dt, raw_mad = rows[0][1], rows[0][2]
            for name, dt, mad, ms in rows:
                print(f"{name:22s} {dt:7.3f} {100 * (dt / raw_dt - 1):+6.1f}% {mad:7.2f} "
                      f"{100 * (mad / raw_mad - 1):+6.1f}% {ms:19.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, default=72, help="frames per speed measurement (default 72)")
    parser.add_argument("--clips", type=int, default=8, help="clips per still-part benchmark (default 8)")
    parser.add_argument("--clip-frames", type=int, default=60, help="frames per benchmark clip (default 60)")
    parser.add_argument("--smoothing-only", action="store_true", help="only the still-part benchmarks")
    args = parser.parse_args()
    tune_malloc()
    if not args.smoothing_only:
        report_speed(args.frames)
    if P3M.is_dir() and BACKGROUNDS.is_dir():
        report_smoothing(args.clips, args.clip_frames)
    else:
        print(f"\nno still-part benchmarks: {P3M} or {BACKGROUNDS} absent")


def report_speed(limit: int) -> None:
    """Priors, DIS flow, smoother cost and the key-frame experiment on the sample people videos."""
    selfie_path = SHARED / "models" / "selfie_segmentation_landscape.tflite"
    people = SHARED / "data" / "videos" / "people"
    clips = {"street-two-people": people / "street-two-people" / "frames", "carphone": people / "carphone.mp4"}
    clips = {name: _frames(p, limit) for name, p in clips.items() if p.exists()}
    if not clips:
        print(f"no sample videos under {people}")
        return
    frames = next(iter(clips.values()))
    print(f"frames: {SIZE[0]}x{SIZE[1]}, {len(frames)} per measurement, cv2 threads {cv2.getNumThreads()}")

    print("\n# priors (ms/frame)")
    priors = {}
    if selfie_path.is_file():
        priors["selfie"] = make_prior("selfie", weights=str(selfie_path))
    priors["deeplabv3 mobilenet_v3_large weights=none size=256"] = make_prior("deeplabv3", weights="none")
    for name, prior in priors.items():
        print(f"{name:55s} {_ms(prior, frames[:24] if 'deeplab' in name else frames):7.2f}")

    print("\n# DIS backward flow (ms/frame)")
    pairs = list(zip(frames[1:], frames[:-1]))
    for preset in PRESETS:
        for max_side in (None, 320):
            ms = _ms(lambda pair: dis_flow(pair[0], pair[1], preset, max_side), pairs)
            print(f"{preset:10s} flow at {'full' if max_side is None else f'max side {max_side}':14s} {ms:7.2f}")

    print("\n# TemporalSmoother (flow, confidence, cut test, blend; ms/frame)")
    value = np.full(frames[0].shape[:2], 0.5, np.float32)
    for name, settings in SMOOTHER_PRESETS.items():
        smoother = TemporalSmoother(**settings)
        print(f"{name:10s} preset={smoother.preset} flow_max_side={smoother.flow_max_side}  "
              f"{_ms(lambda f: smoother(f, value), frames):7.2f}")

    if "selfie" in priors:
        print("\n# key frames: selfie prior every k-th frame, carried by flow (smoothed, default smoother)")
        print(f"{'clip':18s} {'k':>3s} {'ms/frame':>9s} {'prior calls':>12s} {'MAD vs per-frame prior':>24s}")
        prior = priors["selfie"]
        for name, clip in clips.items():
            per_frame = np.stack([prior(f) for f in clip])
            for k in (1, 2, 3, 5):
                for smoothing, label in ((True, ""), (False, " (no smoothing)")):
                    if k == 1 and not smoothing:
                        continue
                    # new weight 1 everywhere: the flow only carries the map between key frames
                    settings = {} if smoothing else {"new_weight": 1.0, "fallback_weight": 1.0}
                    stream = PriorStream(prior, TemporalSmoother(**settings), key_interval=k)
                    start = time.perf_counter()
                    out = np.stack([stream(f) for f in clip])
                    ms = (time.perf_counter() - start) / len(clip) * 1e3
                    mad = 1e3 * np.abs(out - per_frame).mean()
                    print(f"{name:18s} {k:3d} {ms:9.2f} {stream.prior_calls:12d} {mad:24.2f}{label}")


if __name__ == "__main__":
    main()
