"""Streaming matting speed and memory on this machine: prints frames/s per stage and end to end.

    python bench/bench_matte.py                 # 512x288 and 1920x1080, memory at 100/1000 frames
    python bench/bench_matte.py --quick         # fewer frames, no 1000-frame memory run
    python bench/bench_matte.py --model CKPT    # a trained checkpoint instead of fresh weights
    python bench/bench_matte.py --ratio-only    # only the 1920x1080 / 512x288 end-to-end cost ratio

Stages at each size: the network alone (one frame per call, recurrent state carried), the prior
alone, optical flow alone (DIS as the smoother runs it) and the smoother (flow + blend), `Matter`
alone (frames already in memory), and end to end from an H.264 file (PyAV decode) to an alpha PNG
sequence plus a VP9-alpha `.webm` (encoded in the writer thread, as `matting matte` does; the
"encode" column is then the time matting waited for it). Targets (issue 3): end to end >= 16 frames/s at 512x288, and
decode + encode adding at most 15% to `Matter`'s per-frame cost. Peak memory (RSS) is measured in
child processes for a 100-frame and a 1,000-frame video: it must not grow with length.

The HD cost ratio (issue 11: at most 2.15) is end-to-end cost per frame at 1920x1080 over that at
512x288, both measured in the same run: `matting matte`'s loop on an H.264 of each size, runs of the
two sizes alternated (in turn first), several repetitions, the median of the per-repetition ratios,
so a load that changes during the run weighs on both sizes alike.

Frames come from the real sample clip `../shared/data/videos/people/street-two-people` (played
forward and backward to any length); without it, procedural frames are used. The prior is the
real selfie model (from the model cache, or `../shared/models`). The process re-executes itself
with glibc malloc tunables (STACK.md: without them large tensors fault pages back in every call
and timings swing) and OpenMP's short spin count, as `matting matte` runs; `--no-tunables`
measures without either.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHARED = ROOT.parent / "shared"
STREET = SHARED / "data" / "videos" / "people" / "street-two-people" / "frames"

import cv2  # noqa: E402
import numpy as np  # noqa: E402

from bench.model_cache import ensure_model_cache  # noqa: E402
from matting_core.runtime import GLIBC_TUNABLES as TUNABLES, GOMP_SPINCOUNT  # noqa: E402  (imports no torch)


def source_frames(count: int, size: tuple[int, int]) -> list[np.ndarray]:
    """`count` RGB frames uint8 [H,W,3] of `size` (W,H): the street clip ping-ponged, or procedural."""
    w, h = size
    if STREET.is_dir():
        files = sorted(STREET.glob("*.jpg"))
        base = [cv2.cvtColor(cv2.resize(cv2.imread(str(f)), (w, h), interpolation=cv2.INTER_AREA),
                             cv2.COLOR_BGR2RGB) for f in files[:min(len(files), count)]]
    else:
        yy, xx = np.mgrid[0:h, 0:w]
        base = []
        for i in range(min(count, 48)):
            img = np.dstack([(xx + 4 * i) % 256, (yy * 2) % 256, np.full_like(xx, 90)]).astype(np.uint8)
            cv2.ellipse(img, (w // 3 + 3 * i, h // 2), (w // 8, h // 3), 0, 0, 360, (200, 150, 120), -1)
            base.append(img)
    cycle = base + base[-2:0:-1] if len(base) > 2 else base
    return [cycle[i % len(cycle)] for i in range(count)]


def write_h264(path: str, frames: list[np.ndarray], fps: int = 25) -> None:
    """Encode frames to an H.264 .mp4 (crf 18) with PyAV."""
    from matting_core.video.writers import AvVideoWriter

    h, w = frames[0].shape[:2]
    with AvVideoWriter(path, fps, (w, h), "libx264", "yuv420p", {"crf": "18", "preset": "veryfast"}) as v:
        for f in frames:
            v.write(f)


def _timed(fn, items, warmup: int = 2) -> float:
    """ms per item of fn over items, after `warmup` untimed items."""
    for x in items[:warmup]:
        fn(x)
    t0 = time.perf_counter()
    for x in items[warmup:]:
        fn(x)
    return 1e3 * (time.perf_counter() - t0) / max(len(items) - warmup, 1)


def build_net(model: str | None):
    """A checkpoint's network, or a fresh MattingNet (same cost as a trained one)."""
    import torch

    from matting_core.model import matting_net

    if model:
        from pipelines.model_ref import load_model
        return load_model(model, device="cpu")
    torch.manual_seed(0)
    return matting_net(backbone_weights="none").eval()


def bench_size(net, size: tuple[int, int], frames_n: int, workdir: str) -> dict:
    """Per-stage and end-to-end ms/frame at `size` (W,H)."""
    import torch

    from matting_core.flow import dis_flow
    from matting_core.runtime import set_cpu_threads
    from matting_core.inference.matter import Matter, auto_downsample_ratio
    from matting_core.prior import prior_stream_from_spec
    from matting_core.model.optimize import optimize_for_inference

    w, h = size
    frames = source_frames(frames_n, size)
    stream = prior_stream_from_spec(net.config.get("prior"))
    ratio = auto_downsample_ratio(h, w)
    out: dict = {"size": f"{w}x{h}", "frames": frames_n, "downsample_ratio": round(ratio, 4)}

    set_cpu_threads()  # as `matting matte` does on the CPU
    priors = [stream.prior(f) for f in frames[:4]]
    state = None
    fast = optimize_for_inference(net)  # as Matter runs it

    def net_step(i):
        nonlocal state
        src = torch.from_numpy(frames[i]).permute(2, 0, 1)[None].float().div_(255)
        pri = torch.from_numpy(priors[i % 4])[None, None]
        with torch.inference_mode():
            _, _, state = fast(src, pri, state, downsample_ratio=ratio)
    out["net_ms"] = _timed(net_step, list(range(len(frames))))
    out["prior_ms"] = _timed(stream.prior, frames)
    preset = stream.smoother.preset if stream.smoother else "fast"
    max_side = stream.smoother.flow_max_side if stream.smoother else 0
    out["flow_ms"] = _timed(lambda i: dis_flow(frames[i], frames[i - 1], preset=preset, max_side=max_side or None),
                            list(range(1, len(frames))))
    if stream.smoother is not None:
        stream.smoother.reset()
        out["smoother_ms"] = _timed(lambda f: stream.smoother(f, priors[0]), frames)

    matter = Matter(net, stream, device="cpu")
    matter.reset()
    out["matter_ms"] = _timed(matter.step, frames)
    out["matter_stages_ms"] = matter.timer.summary()["ms_per_frame"]

    video = os.path.join(workdir, f"src-{w}x{h}.mp4")
    write_h264(video, frames)
    result = end_to_end(matter, video, workdir)
    timings, n = result.timings, result.frames
    out["e2e_ms"] = timings["ms_per_frame"]["wall"]
    out["e2e_fps"] = timings["fps"]
    out["decode_ms"] = timings["ms_per_frame"]["decode"]
    out["encode_ms"] = timings["ms_per_frame"]["encode"]
    out["e2e_matter_ms"] = 1e3 * sum(matter.timer.seconds.values()) / n
    # Encoding runs in a writer thread beside matting, so its cost shows only in the wall time:
    # the overhead is end-to-end time per frame over Matter's alone (frames already in memory).
    out["io_overhead"] = out["e2e_ms"] / out["matter_ms"] - 1
    return out


def end_to_end(matter, video: str, workdir: str):
    """`matting matte`'s loop on `video` (prefetching decoder, writer thread) to `pha` + `rgba.webm`: its VideoResult."""
    from matting_core.inference.loop import matte_video
    from matting_core.inference.outputs import MatteOutputs, default_encoder_threads
    from matting_core.video import probe

    info = probe(video)
    size = (info.width, info.height)
    with MatteOutputs(os.path.join(workdir, "out"), f"e2e-{info.width}x{info.height}", ("pha", "rgba.webm"),
                      info.fps, size, background=True,
                      encoder_threads=default_encoder_threads(size, True)) as outputs:
        result = matte_video(video, info, matter, outputs)
    assert result.status == "ok", result.reason
    return result


def bench_ratio(net, reps: int, frames: dict[tuple[int, int], int], workdir: str) -> dict:
    """End-to-end ms/frame at each size of `frames` ({(W,H): count}), sizes alternated, `reps` times; median ratio of the last to the first."""
    from matting_core.inference.matter import Matter
    from matting_core.prior import prior_stream_from_spec
    from matting_core.runtime import set_cpu_threads

    set_cpu_threads()
    sizes = list(frames)
    videos = {}
    for size, n in frames.items():
        videos[size] = os.path.join(workdir, f"ratio-{size[0]}x{size[1]}.mp4")
        write_h264(videos[size], source_frames(n, size))
    matter = Matter(net, prior_stream_from_spec(net.config.get("prior")), device="cpu")
    end_to_end(matter, videos[sizes[0]], workdir)  # warm-up: first-call allocations and model loading
    runs: dict[tuple[int, int], list[float]] = {size: [] for size in sizes}
    loads = []
    for rep in range(reps):
        order = sizes if rep % 2 == 0 else sizes[::-1]  # each size first in turn
        for size in order:
            runs[size].append(end_to_end(matter, videos[size], workdir).timings["ms_per_frame"]["wall"])
        loads.append(os.getloadavg()[0])
    small, big = runs[sizes[0]], runs[sizes[-1]]
    ratios = [b / a for a, b in zip(small, big)]
    return {"sizes": [f"{w}x{h}" for w, h in sizes], "frames": [frames[s] for s in sizes],
            "ms_per_frame": {f"{w}x{h}": runs[(w, h)] for w, h in sizes}, "ratios": ratios,
            "ratio": float(np.median(ratios)), "load": loads}


def _rss_mb(field: str = "VmRSS") -> float:
    """Current (VmRSS) or peak (VmHWM) resident memory of this process in MB.

    VmHWM, unlike getrusage's ru_maxrss, starts afresh at exec, so a child does not inherit the
    peak of the (large) parent it was forked from.
    """
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return 0.0


def memory_child(video: str, outdir: str, model: str | None) -> None:
    """Matte `video` to pha + rgba.webm and print peak and per-stage RSS as JSON (child process)."""
    ensure_model_cache()
    from matting_core.inference.matter import Matter
    from matting_core.inference.outputs import MatteOutputs
    from matting_core.video import iter_frames, probe

    net = build_net(model)
    info = probe(video)
    matter = Matter(net, device="cpu")
    samples = []
    with MatteOutputs(outdir, "mem", ("pha", "rgba.webm"), info.fps, (info.width, info.height),
                      background=True, encoder_threads=1) as outputs:
        for i, frame in enumerate(iter_frames(video)):
            res = matter.step(frame)
            outputs.write(i, res.pha, res.fgr)
            if i in (20, info.frames // 2, info.frames - 1):
                samples.append((i, round(_rss_mb(), 1)))
        outputs.commit({"status": "ok"})
    peak = _rss_mb("VmHWM")
    print(json.dumps({"frames": info.frames, "peak_rss_mb": round(peak, 1), "rss_mb_at_frame": samples}))


def bench_memory(lengths: list[int], size: tuple[int, int], workdir: str, model: str | None) -> list[dict]:
    """Peak RSS of a child process matting videos of each length."""
    rows = []
    base = source_frames(max(lengths), size)
    for n in lengths:
        video = os.path.join(workdir, f"mem-{n}.mp4")
        write_h264(video, base[:n])
        cmd = [sys.executable, __file__, "--memory-child", video, os.path.join(workdir, f"mem-out-{n}")]
        if model:
            cmd += ["--model", model]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy())
        if proc.returncode != 0:
            raise RuntimeError(f"memory child failed: {proc.stderr[-2000:]}")
        row = json.loads(proc.stdout.strip().splitlines()[-1])
        row["seconds"] = round(time.perf_counter() - t0, 1)
        rows.append(row)
    return rows


def stages(net, args: argparse.Namespace, work: str, figures: dict) -> None:
    """Per-stage and end-to-end figures at 512x288 and 1920x1080, then peak memory, printed and added to `figures`."""
    mem_w, mem_h = (int(v) for v in args.memory_size.split("x"))
    print(f"{'size':>10} {'net':>7} {'prior':>7} {'flow':>7} {'smooth':>7} {'Matter':>7} "
          f"{'decode':>7} {'encode':>7} {'e2e':>7} {'io +%':>6}   (ms/frame; fps in brackets)", flush=True)
    for size, n in (((512, 288), args.frames), ((1920, 1080), args.hd_frames)):
        r = bench_size(net, size, n, work)
        figures["sizes"].append(r)
        print(f"{r['size']:>10} {r['net_ms']:7.1f} {r['prior_ms']:7.2f} {r['flow_ms']:7.2f} "
              f"{r.get('smoother_ms', float('nan')):7.2f} {r['matter_ms']:7.1f} {r['decode_ms']:7.2f} "
              f"{r['encode_ms']:7.2f} {r['e2e_ms']:7.1f} {100 * r['io_overhead']:6.1f}")
        print(f"{'':>10} [{1e3 / r['net_ms']:5.1f}] [{1e3 / r['prior_ms']:5.0f}] [{1e3 / r['flow_ms']:5.0f}] "
              f"{'':>7} [{1e3 / r['matter_ms']:5.1f}] {'':>7} {'':>7} [{r['e2e_fps']:5.1f}]"
              f"   downsample_ratio {r['downsample_ratio']}; Matter stages {r['matter_stages_ms']}",
              flush=True)
    for n in (int(v) for v in args.memory_lengths.split(",")):
        m = bench_memory([n], (mem_w, mem_h), work, args.model)[0]
        figures["memory"].append(m)
        print(f"peak RSS {m['peak_rss_mb']:7.1f} MB for {m['frames']:5d} frames at {args.memory_size} "
              f"(RSS MB at frame {m['rss_mb_at_frame']}, {m['seconds']} s)", flush=True)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print a table (and JSON with --json)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="checkpoint path or models:/ ref (default: fresh weights)")
    p.add_argument("--frames", type=int, default=80, help="frames per 512x288 measurement")
    p.add_argument("--hd-frames", type=int, default=20, help="frames per 1920x1080 measurement")
    p.add_argument("--memory-lengths", default="100,1000", help="video lengths for the peak-RSS runs")
    p.add_argument("--memory-size", default="256x144", help="frame size of the peak-RSS runs")
    p.add_argument("--quick", action="store_true", help="60/8 frames, memory at 100 and 300 frames")
    p.add_argument("--no-tunables", action="store_true", help="do not set glibc malloc tunables nor GOMP_SPINCOUNT")
    p.add_argument("--ratio-reps", type=int, default=5, help="repetitions of the HD / 512x288 ratio (0: none)")
    p.add_argument("--ratio-frames", default="48,48", help="frames per 512x288 and per 1920x1080 run of the ratio")
    p.add_argument("--ratio-only", action="store_true", help="only the HD / 512x288 end-to-end cost ratio")
    p.add_argument("--json", default=None, help="also write the figures to this JSON file")
    p.add_argument("--memory-child", nargs=2, metavar=("VIDEO", "OUT"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if not args.no_tunables and (os.environ.get("GLIBC_TUNABLES") != TUNABLES or "GOMP_SPINCOUNT" not in os.environ):
        # The allocator reads its tunables at process start only; OpenMP's spin count as
        # `matting matte` sets it (pipelines.ray_runtime.tune_openmp), before torch loads.
        os.environ["GLIBC_TUNABLES"] = TUNABLES
        os.environ.setdefault("GOMP_SPINCOUNT", GOMP_SPINCOUNT)
        os.execv(sys.executable, [sys.executable, __file__] + (argv if argv is not None else sys.argv[1:]))
    if args.memory_child:
        memory_child(*args.memory_child, args.model)
        return 0
    if args.quick:
        args.frames, args.hd_frames, args.memory_lengths = 60, 8, "100,300"
        args.ratio_reps = min(args.ratio_reps, 3)
    ensure_model_cache()
    net = build_net(args.model)
    figures: dict = {"tunables": os.environ.get("GLIBC_TUNABLES") == TUNABLES,
                     "gomp_spincount": os.environ.get("GOMP_SPINCOUNT"),
                     "threads": len(os.sched_getaffinity(0)), "load_before": os.getloadavg()[0]}
    # Other processes on these 2 cores distort every figure: the load average is printed with them.
    print(f"threads {figures['threads']}, glibc malloc tunables {'on' if figures['tunables'] else 'off'}, "
          f"GOMP_SPINCOUNT {os.environ.get('GOMP_SPINCOUNT', 'default')}, "
          f"load average {figures['load_before']:.1f}", flush=True)
    figures["sizes"], figures["memory"] = [], []
    with tempfile.TemporaryDirectory(prefix="bench-matte-") as work:
        if not args.ratio_only:
            stages(net, args, work, figures)
        if args.ratio_reps > 0:
            sd_n, hd_n = (int(v) for v in args.ratio_frames.split(","))
            r = bench_ratio(net, args.ratio_reps, {(512, 288): sd_n, (1920, 1080): hd_n}, work)
            figures["hd_ratio"] = r
            for k, (a, b, load) in enumerate(zip(r["ms_per_frame"]["512x288"], r["ms_per_frame"]["1920x1080"], r["load"])):
                print(f"ratio run {k + 1}: 512x288 {a:6.1f} ms/frame, 1920x1080 {b:6.1f} ms/frame, "
                      f"ratio {b / a:.2f} (load average {load:.1f})", flush=True)
            print(f"HD / 512x288 end-to-end cost per frame: median {r['ratio']:.2f} over {args.ratio_reps} runs "
                  f"(range {min(r['ratios']):.2f}-{max(r['ratios']):.2f}; medians 512x288 "
                  f"{np.median(r['ms_per_frame']['512x288']):.1f}, 1920x1080 "
                  f"{np.median(r['ms_per_frame']['1920x1080']):.1f} ms/frame; {sd_n}/{hd_n} frames); "
                  f"target <= 2.15: {'met' if r['ratio'] <= 2.15 else 'MISSED'}", flush=True)
    figures["load_after"] = os.getloadavg()[0]
    if figures["sizes"]:
        small = figures["sizes"][0]
        ok_fps = small["e2e_fps"] >= 16
        ok_io = small["io_overhead"] <= 0.15
        print(f"target end to end >= 16 fps at 512x288: {'met' if ok_fps else 'MISSED'} ({small['e2e_fps']:.1f}); "
              f"decode+encode <= 15% of Matter: {'met' if ok_io else 'MISSED'} ({100 * small['io_overhead']:.1f}%); "
              f"load average after {figures['load_after']:.1f}")
    else:
        print(f"load average after {figures['load_after']:.1f}")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
