"""Prints ms/frame at 512x288 for the priors, DIS flow, the temporal smoother, and the key-frame
experiment (prior on every k-th frame, carried by flow in between: cost and MAD vs per-frame prior).

Usage: python bench/bench_prior_flow.py [--frames N]
Reads the sample videos and the selfie model from ../shared (skips what is absent).
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import cv2
import numpy as np

from matting_core.flow import PRESETS, TemporalSmoother, dis_flow
from matting_core.prior import PriorStream, make_prior

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
SIZE = (512, 288)  # (W, H)


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, default=72)
    args = parser.parse_args()
    selfie_path = SHARED / "models" / "selfie_segmentation_landscape.tflite"
    people = SHARED / "data" / "videos" / "people"
    clips = {"street-two-people": people / "street-two-people" / "frames", "carphone": people / "carphone.mp4"}
    clips = {name: _frames(p, args.frames) for name, p in clips.items() if p.exists()}
    if not clips:
        raise SystemExit(f"no sample videos under {people}")
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

    print("\n# TemporalSmoother (two flows, confidence, cut test, blend; ms/frame)")
    value = np.full(frames[0].shape[:2], 0.5, np.float32)
    for preset in ("ultrafast", "fast"):
        smoother = TemporalSmoother(preset=preset)
        print(f"{preset:10s} flow_max_side={smoother.flow_max_side}  {_ms(lambda f: smoother(f, value), frames):7.2f}")

    if "selfie" in priors:
        print("\n# key frames: selfie prior every k-th frame, carried by flow (smoothed, default smoother)")
        print(f"{'clip':18s} {'k':>3s} {'ms/frame':>9s} {'prior calls':>12s} {'MAD vs per-frame prior':>24s}")
        prior = priors["selfie"]
        for name, clip in clips.items():
            per_frame = np.stack([prior(f) for f in clip])
            for k in (1, 2, 3, 5):
                for new_weight, label in ((0.3, ""), (1.0, " (no smoothing)")):
                    if k == 1 and new_weight == 1.0:
                        continue
                    stream = PriorStream(prior, TemporalSmoother(new_weight=new_weight), key_interval=k)
                    start = time.perf_counter()
                    out = np.stack([stream(f) for f in clip])
                    ms = (time.perf_counter() - start) / len(clip) * 1e3
                    mad = 1e3 * np.abs(out - per_frame).mean()
                    print(f"{name:18s} {k:3d} {ms:9.2f} {stream.prior_calls:12d} {mad:24.2f}{label}")


if __name__ == "__main__":
    main()
