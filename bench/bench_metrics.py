"""Time per metric on one 1080p frame (ms, median of N runs); prints a table.

    python bench/bench_metrics.py [--size 1920x1080] [--repeat 5]
"""
from __future__ import annotations

import argparse
import statistics
import time

import cv2
import numpy as np

from matting_core.evaluation import metrics as M


def frames(width: int, height: int, seed: int = 0):
    """A person-like soft matte, a noisy prediction, the next frame of both and RGB foregrounds."""
    rng = np.random.default_rng(seed)
    true = np.zeros((height, width), np.float32)
    cv2.ellipse(true, (width // 2, height * 2 // 3), (width // 6, height // 2), 0, 0, 360, 1.0, -1)
    cv2.circle(true, (width // 2, height // 4), height // 8, 1.0, -1)
    true = cv2.GaussianBlur(true, (0, 0), 3)
    pred = np.clip(true + cv2.GaussianBlur(rng.normal(0, 0.2, true.shape).astype(np.float32), (0, 0), 4), 0, 1)
    true_next, pred_next = np.roll(true, 4, axis=1), np.roll(pred, 5, axis=1)
    fgr_t = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    fgr_p = np.clip(fgr_t.astype(np.int16) + rng.integers(-10, 11, fgr_t.shape), 0, 255).astype(np.uint8)
    src = cv2.GaussianBlur(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), (0, 0), 2)
    return true, pred, true_next, pred_next, fgr_t, fgr_p, src, np.roll(src, 4, axis=1)


def timed(fn, repeat: int) -> float:
    fn()  # warm up (allocations, OpenCV dispatch)
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="1920x1080")
    ap.add_argument("--repeat", type=int, default=5)
    a = ap.parse_args()
    w, h = (int(v) for v in a.size.lower().split("x"))
    true, pred, true_n, pred_n, fgr_t, fgr_p, src, src_n = frames(w, h)
    flow = np.zeros((h, w, 2), np.float32)
    flow[..., 0] = -4.0
    cases = {
        "mad": lambda: M.mad(pred, true),
        "sad": lambda: M.sad(pred, true),
        "mse": lambda: M.mse(pred, true),
        "grad": lambda: M.grad(pred, true),
        "conn": lambda: M.conn(pred, true),
        "dtssd": lambda: M.dtssd(pred_n, pred, true_n, true),
        "messddt (given flow)": lambda: M.messddt(pred_n, pred, true_n, true, flow),
        "alpha_flow (DIS on true alphas)": lambda: M.alpha_flow(true_n, true),
        "fgr_mad": lambda: M.fgr_mad(fgr_p, fgr_t, true),
        "fgr_mse": lambda: M.fgr_mse(fgr_p, fgr_t, true),
        "flow_warp_error (no reference)": lambda: M.flow_warp_error(pred_n, pred, src_n, src),
    }

    def sequence_frame():
        seq = M.SequenceMetrics()
        seq.update(pred, true, fgr_p, fgr_t)
        seq.update(pred_n, true_n, fgr_p, fgr_t)
    cases["SequenceMetrics: 2 frames, all metrics"] = sequence_frame
    print(f"metrics on {w}x{h}, median of {a.repeat} runs, {cv2.getNumThreads()} OpenCV threads")
    for name, fn in cases.items():
        print(f"  {name:42s} {timed(fn, a.repeat):9.1f} ms")


if __name__ == "__main__":
    main()
