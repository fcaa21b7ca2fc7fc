"""Throughput and memory of `matting generate` (T=8, 512x288) with 1 and 2 Ray CPUs.

    .venv/bin/python bench/bench_generate.py [--clips 200] [--memory]

Prints clips/s and frames/s (whole run, and warm: after every worker has started and decoded
its sources), where the time goes (decode, synthesis, encode, write), and with --memory the peak
RSS of a worker for 100 and 1,000 clips. Uses ../shared/data when present, else procedural sources.
Each configuration runs in a fresh process with its own Ray runtime of N CPUs.
Targets on a 2-core machine: >= 12 clips/s with 2 CPUs, >= 1.7x from 1 to 2 CPUs, flat memory.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"


def sources(tmp: str) -> tuple[list[str], list[str]]:
    """Real photos and backgrounds when available, else procedural ones."""
    if SHARED.exists():
        return ([str(SHARED / "photos" / "p3m"), str(SHARED / "photos" / "alphamatting")],
                [str(SHARED / "videos" / "backgrounds")])
    sys.path.insert(0, str(REPO))
    from matting_core.data.synthetic import write_sources

    d = write_sources(os.path.join(tmp, "sources"), photos=16, videos=3, frames=120)
    return [d["photos"]], [d["backgrounds"]]


def one_run(cpus: int, clips: int, out: str, photos: list[str], backgrounds: list[str]) -> dict:
    """Run generate in a fresh process with a local Ray of `cpus` CPUs; returns its manifest."""
    code = f"""
import json, os, sys, dataclasses
os.environ['RAY_AUTH_MODE'] = 'disabled'
sys.path.insert(0, {str(REPO)!r})
import ray
from pipelines.ray_runtime import ensure_ray
from matting_core.runtime import GLIBC_TUNABLES
ray.init(num_cpus={cpus}, include_dashboard=False, logging_level='ERROR',
         runtime_env={{'env_vars': {{'GLIBC_TUNABLES': GLIBC_TUNABLES}}}})
ensure_ray()
from pipelines.generate import GenerateConfig, run_generate
cfg = GenerateConfig(photos=tuple({photos!r}), backgrounds=tuple({backgrounds!r}), out={out!r},
                     clips={clips}, workers={cpus}, progress=False)
s = run_generate(cfg)
print('MANIFEST' + json.dumps(s.manifest))
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    for line in res.stdout.splitlines():
        if line.startswith("MANIFEST"):
            return json.loads(line[len("MANIFEST"):])
    raise RuntimeError(f"run failed:\n{res.stdout[-2000:]}\n{res.stderr[-4000:]}")


def main() -> None:
    """Run the benchmark and print its figures."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clips", type=int, default=200)
    ap.add_argument("--memory", action="store_true", help="also compare worker peak RSS for 100 vs 1,000 clips")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        photos, backgrounds = sources(tmp)
        print(f"sources: {photos} + {backgrounds}")
        rates = {}
        for cpus in (1, 2):
            m = one_run(cpus, args.clips, os.path.join(tmp, f"ds{cpus}"), photos, backgrounds)
            run = m["this_run"]
            st = run["stage_seconds"]
            busy = sum(st.values()) or 1.0
            rates[cpus] = run["steady_clips_per_s"] or run["clips_per_s"]
            print(f"{cpus} CPU(s): {args.clips} clips in {run['seconds']:.1f} s = {run['clips_per_s']:.2f} clips/s "
                  f"({run['clips_per_s'] * 8:.1f} frames/s); warm {rates[cpus]:.2f} clips/s "
                  f"({rates[cpus] * 8:.1f} frames/s); worker peak RSS {run['worker_peak_rss_mb']:.0f} MB")
            print("          time per clip: " + ", ".join(
                f"{k} {1000 * v / max(1, run['clips_made']):.1f} ms ({100 * v / busy:.0f}%)" for k, v in st.items()))
        print(f"scaling 1 -> 2 CPUs (warm): {rates[2] / rates[1]:.2f}x   target >= 1.7x; "
              f"2-CPU warm rate {rates[2]:.2f} clips/s, target >= 12")
        if args.memory:
            for n in (100, 1000):
                m = one_run(2, n, os.path.join(tmp, f"mem{n}"), photos, backgrounds)
                print(f"memory: {n} clips -> worker peak RSS {m['this_run']['worker_peak_rss_mb']:.0f} MB")


if __name__ == "__main__":
    main()
