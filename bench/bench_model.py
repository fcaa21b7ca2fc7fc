"""Milliseconds per frame of MattingNet alone, streaming one frame per call (random weights, CPU).

    python bench/bench_model.py                 # 512x288 and 1920x1080 (downsample_ratio 0.25)
    python bench/bench_model.py --frames 50 --threads 2

Compares, interleaved in one process (the machine is shared; rounds alternate so that load hits
every variant alike): architecture version 1 as built before (`arch=1, head_channels=12`), the
default version 2, and version 2 after `optimize_for_inference` (what the streaming Matter runs).
Frames are fed with the channels-last strides a frame converted from an HWC image has.

Re-executes itself with GLIBC_TUNABLES set (see STACK.md: avoids page-fault storms that make CPU
timings swing); pass --no-tunables to measure without.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from matting_core.runtime import GLIBC_TUNABLES as TUNABLES  # noqa: E402  (imports no torch)


def bench(nets: dict, width: int, height: int, ratio: float, frames: int, warmup: int, rounds: int = 5
          ) -> dict[str, list[float]]:
    """Per-frame wall times (ms) of each net streaming `frames` frames of `width` x `height`, in interleaved rounds."""
    import torch

    frame = torch.randint(0, 256, (height, width, 3), dtype=torch.uint8)
    src = frame.permute(2, 0, 1)[None].float().div_(255)  # [1,3,H,W], channels-last strides
    prior = torch.rand(1, 1, height, width)
    states: dict = {name: None for name in nets}
    times: dict[str, list[float]] = {name: [] for name in nets}
    per_round = max(1, frames // rounds)
    with torch.inference_mode():
        for name, net in nets.items():
            for _ in range(warmup):
                _, _, states[name] = net(src, prior, states[name], ratio)
        for _ in range(rounds):
            for name, net in nets.items():
                for _ in range(per_round):
                    t0 = time.perf_counter()
                    _, _, states[name] = net(src, prior, states[name], ratio)
                    times[name].append((time.perf_counter() - t0) * 1e3)
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
    from matting_core.model.optimize import optimize_for_inference

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    net = matting_net().eval()
    nets = {"arch 1 (before)": matting_net(arch=1, head_channels=12).eval(), "arch 2": net,
            "arch 2 optimized": optimize_for_inference(net)}
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
        for name, times in bench(nets, width, height, ratio, args.frames, args.warmup).items():
            med = statistics.median(times)
            print(f"{width}x{height} downsample_ratio={ratio} {name:17s}: median {med:.1f} ms/frame "
                  f"(mean {statistics.mean(times):.1f}, min {min(times):.1f}) = {1e3 / med:.1f} frames/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
