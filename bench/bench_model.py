"""Milliseconds per frame of MattingNet alone, streaming one frame per call (random weights, CPU).

    python bench/bench_model.py                 # 512x288 and 1920x1080 (downsample_ratio 0.25)
    python bench/bench_model.py --frames 50 --threads 2

Re-executes itself with GLIBC_TUNABLES set (see STACK.md: avoids page-fault storms that make CPU
timings swing); pass --no-tunables to measure without.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

TUNABLES = "glibc.malloc.mmap_threshold=33554432:glibc.malloc.trim_threshold=17179869184"


def bench(net, width: int, height: int, ratio: float, frames: int, warmup: int) -> list[float]:
    """Per-frame wall times (ms) of `net` streaming `frames` frames of `width` x `height`."""
    import torch

    src = torch.rand(1, 3, height, width)
    prior = torch.rand(1, 1, height, width)
    state = None
    times = []
    with torch.inference_mode():
        for i in range(warmup + frames):
            t0 = time.perf_counter()
            _, _, state = net(src, prior, state, ratio)
            if i >= warmup:
                times.append((time.perf_counter() - t0) * 1e3)
    return times


def main() -> int:
    """Print ms/frame and frames/s for each resolution."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-tunables", action="store_true")
    args = parser.parse_args()
    if not args.no_tunables and os.environ.get("GLIBC_TUNABLES") != TUNABLES:
        os.environ["GLIBC_TUNABLES"] = TUNABLES
        os.execv(sys.executable, [sys.executable, *sys.argv])

    import torch

    from matting_core.model import matting_net

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    net = matting_net().eval()
    print(f"MattingNet {sum(p.numel() for p in net.parameters()) / 1e6:.2f} M parameters, "
          f"{torch.get_num_threads()} threads, GLIBC_TUNABLES={'set' if os.environ.get('GLIBC_TUNABLES') else 'unset'}")
    # The bare encoder at the same size: a yardstick that shows how busy the machine was.
    from torchvision.models import mobilenet_v2

    encoder = mobilenet_v2(weights=None).features[:18].eval()
    x = torch.rand(1, 3, 288, 512)
    with torch.inference_mode():
        times = []
        for i in range(args.warmup + args.frames):
            t0 = time.perf_counter()
            encoder(x)
            if i >= args.warmup:
                times.append((time.perf_counter() - t0) * 1e3)
    print(f"reference: mobilenet_v2 features[:18] alone at 512x288: median {statistics.median(times):.1f} ms "
          f"(min {min(times):.1f})")
    for width, height, ratio in [(512, 288, 1.0), (1920, 1080, 0.25)]:
        times = bench(net, width, height, ratio, args.frames, args.warmup)
        med = statistics.median(times)
        print(f"{width}x{height} downsample_ratio={ratio}: median {med:.1f} ms/frame "
              f"(mean {statistics.mean(times):.1f}, min {min(times):.1f}) = {1e3 / med:.1f} frames/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
