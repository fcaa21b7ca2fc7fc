"""Training throughput of `matting train` (cpu-small recipe on T=8 clips of 512x288).

    .venv/bin/python bench/bench_train.py [--steps 40] [--warmup 8]

Runs the real job (Ray Train workers, DDP over gloo, MLflow in a temporary sqlite store) for
1 worker x 1 thread, 1 worker x 2 threads and 2 workers x 1 thread, each in a fresh process
with a local Ray of exactly that many CPUs and the same per-worker batch, and reads back the
per-step times every worker logged: `data_s` (what a step still waits for its batch: decoding,
augmentation, the prior; batches are made in a helper thread meanwhile) and `step_s` (forward,
backward, all-reduce, optimizer). Prints frames/s after `--warmup` steps and the share of step
time that is not compute. With a GPU it adds 1 GPU worker with the `gpu` preset (bf16).
Targets on a 2-core machine: non-compute share < 10%; 2x1 >= 1.6x the frames/s of 1x1 and no
slower than 1x2. A fourth run confines 1x1 to one core, batch thread included (Ray reserves one
CPU for it but does not pin it). Uses clips generated from ../shared/data when present, else procedural sources.
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


def make_clips(tmp: str, clips: int) -> str:
    """A small fake-motion dataset (T=8, 512x288) made by `matting generate`."""
    out = os.path.join(tmp, "clips")
    if SHARED.exists():
        photos, backgrounds = [str(SHARED / "photos" / "p3m")], [str(SHARED / "videos" / "backgrounds")]
    else:
        sys.path.insert(0, str(REPO))
        from matting_core.data.synthetic import write_sources

        d = write_sources(os.path.join(tmp, "sources"), photos=8, videos=2, frames=60)
        photos, backgrounds = [d["photos"]], [d["backgrounds"]]
    cmd = [sys.executable, "-m", "pipelines.cli", "generate", "--out", out, "--clips", str(clips),
           "--frames", "8", "--size", "512x288", "--no-progress"]
    for p in photos:
        cmd += ["--photos", p]
    for b in backgrounds:
        cmd += ["--backgrounds", b]
    subprocess.run(cmd, check=True, cwd=REPO, capture_output=True)
    return out


def one_run(tmp: str, data: str, workers: int, threads: int, gpus: int, steps: int, preset: str,
            cores: int | None = None) -> list[dict]:
    """Train `steps` steps in a fresh process (on its first `cores` cores only, when given); returns
    the per-step train metrics of every logged step."""
    name = f"w{workers}t{threads}g{gpus}c{cores or 0}"
    code = f"""
import json, os, sys
os.environ['RAY_AUTH_MODE'] = 'disabled'
sys.path.insert(0, {str(REPO)!r})
import ray
from matting_core.runtime import GLIBC_TUNABLES
ray.init(num_cpus={workers * threads}, num_gpus={workers * gpus}, include_dashboard=False, logging_level='ERROR',
         runtime_env={{'env_vars': {{'GLIBC_TUNABLES': GLIBC_TUNABLES}}}})
from pipelines.train import TrainConfig, run_train
from mlflow.tracking import MlflowClient
uri = 'sqlite:///' + {os.path.join(tmp, name + '.db')!r}
cfg = TrainConfig(data={data!r}, preset={preset!r}, steps={steps}, workers={workers},
                  cpus_per_worker={float(threads)}, gpus_per_worker={float(gpus)},
                  storage={os.path.join(tmp, 'runs')!r}, run_name={name!r}, tracking_uri=uri,
                  recipe={{'val_every': 0, 'val_clips': 2, 'checkpoint_every': 0, 'log_every': 1}})
s = run_train(cfg, out=open(os.devnull, 'w'))
c = MlflowClient(uri)
hist = {{k: {{m.step: m.value for m in c.get_metric_history(s.run_id, 'train/' + k)}}
        for k in ('data_s', 'step_s', 'frames_per_s')}}
print('HISTORY' + json.dumps(hist))
"""
    # Ray's processes inherit the affinity: the whole run, helper threads included, stays on those cores.
    confine = (lambda: os.sched_setaffinity(0, range(cores))) if cores else None
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                         preexec_fn=confine)
    for line in res.stdout.splitlines():
        if line.startswith("HISTORY"):
            hist = json.loads(line[len("HISTORY"):])
            return [{k: hist[k][s] for k in hist} | {"step": int(s)} for s in sorted(hist["step_s"], key=int)]
    raise RuntimeError(f"{name} failed:\n{res.stdout[-2000:]}\n{res.stderr[-4000:]}")


def figures(rows: list[dict], warmup: int, world: int, clip_frames: int) -> tuple[float, float]:
    """(frames/s, non-compute share) over the steps after `warmup`, from rank 0's step times."""
    rows = [r for r in rows if r["step"] > warmup]
    data = sum(r["data_s"] for r in rows)
    step = sum(r["step_s"] for r in rows)
    return world * clip_frames * len(rows) / (data + step), data / (data + step)


def main() -> None:
    """Run the benchmark and print its figures."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--warmup", type=int, default=8)
    ap.add_argument("--clips", type=int, default=32)
    args = ap.parse_args()
    sys.path.insert(0, str(REPO))
    import torch

    from matting_core.training.config import PRESETS

    with tempfile.TemporaryDirectory() as tmp:
        data = make_clips(tmp, args.clips)
        recipe = PRESETS["cpu-small"]
        per_step = recipe.batch_size * recipe.frames
        print(f"cpu-small: {recipe.batch_size} clips x {recipe.frames} frames of {recipe.augment.size[0]}x"
              f"{recipe.augment.size[1]} per worker and step, from {args.clips} clips of 8 frames at 512x288")
        rates = {}
        # The last run is 1x1 confined to one core: Ray reserves one CPU for a 1x1 worker, yet its
        # batch thread runs on the other core; confined, it is what one CPU's worth adds up from.
        for workers, threads, cores in ((1, 1, None), (1, 2, None), (2, 1, None), (1, 1, 1)):
            rows = one_run(tmp, data, workers, threads, 0, args.steps, "cpu-small", cores=cores)
            fps, share = figures(rows, args.warmup, workers, per_step)
            rates[(workers, threads, cores)] = fps
            where = f" on {cores} core" if cores else ""
            print(f"{workers} worker(s) x {threads} thread(s){where}: {fps:6.1f} frames/s   "
                  f"not compute {100 * share:4.1f}%")
        two = rates[(2, 1, None)]
        print(f"2x1 / 1x1 = {two / rates[(1, 1, None)]:.2f}x (target >= 1.6x); "
              f"2x1 / 1x2 = {two / rates[(1, 2, None)]:.2f}x (target >= 1.0x); "
              f"2x1 / 1x1 on 1 core = {two / rates[(1, 1, 1)]:.2f}x")
        if torch.cuda.is_available():
            gpu = PRESETS["gpu"]
            rows = one_run(tmp, data, 1, 4, 1, args.steps, "gpu")
            fps, share = figures(rows, args.warmup, 1, gpu.batch_size * gpu.frames)
            print(f"1 GPU worker ({torch.cuda.get_device_name(0)}, gpu preset, bf16): {fps:.1f} frames/s   "
                  f"not compute {100 * share:.1f}%")
        else:
            print("no GPU here: the GPU figure is not measured")


if __name__ == "__main__":
    main()
