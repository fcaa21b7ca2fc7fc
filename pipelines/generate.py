"""`matting generate`: the fake-motion clip dataset, made in parallel on Ray Data.

Stages: discover sources (driver, listing only) -> validate them (Ray Data tasks) -> plan clips
from the valid ones -> make missing shards (Ray Data actors, each caching decoded photos and
background chunks) -> manifest. Shards are published atomically and the manifest last, so a
rerun resumes by making only the shards that are not there, or whose footer records another
fingerprint or failed clips (so a clip that failed once is tried again).

A run holds the output's lock (`OUT/_lock.json`, matting_core.output_lock) from start to end: a
second run into the same output is refused (exit 2, naming the holder) and a killed run's lock is
taken over once it is stale. Holding it also proves that temporary files left under OUT are
abandoned, so they are removed.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import os
import re
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from matting_core import storage
from matting_core.data.fakemotion import GENERATOR_VERSION, FakeMotionConfig
from matting_core.redaction import redact_config
from matting_core.output_lock import OutputLock, OutputLocked
from pipelines import config as cfglib
from pipelines.config import Annotated, Interval, NonNegativeInt, PositiveInt, option

log = logging.getLogger("matting.generate")

MARKER = "_generate.json"
# Config fields that do not change what is written (so a rerun with other values resumes).
# The photo limits change content only through which photos are valid, and the sources are hashed.
_NOT_CONTENT = ("out", "workers", "overwrite", "cache_mb", "progress", "max_photo_pixels", "min_subject_px",
                "lock_stale_s")
# storage.open_atomic's temporary names: `.<name>.<8 hex>.tmp` beside the target
_TEMPORARY = re.compile(r"^\..+\.[0-9a-f]{8}\.tmp$")


@dataclass(frozen=True)
class GenerateConfig:
    """Configuration of `matting generate` (YAML keys = field names; CLI flags override)."""

    photos: tuple[str, ...] = option((), "photos: image/+alpha/ folders, RGBA images or a CSV/Parquet manifest",
                                     metavar="URI", repeat=True)
    backgrounds: tuple[str, ...] = option((), "background videos or frame folders", metavar="URI", repeat=True)
    out: str = option("", "output dataset (local path or s3://bucket/prefix)", metavar="URI")
    clips: PositiveInt = option(100, "number of clips", metavar="N")
    seed: NonNegativeInt = option(0, "job seed: the same sources and seed give the same clips", metavar="S")
    workers: PositiveInt = option(2, "parallel Ray Data workers", metavar="N")
    shard_size: PositiveInt = option(16, "clips per Parquet shard", metavar="N")
    jpeg_quality: Annotated[int, Interval(ge=1, le=100)] = option(95, "JPEG quality of frames, fgr and bgr",
                                                                  metavar="Q")
    overwrite: bool = option(False, "replace a dataset made with another configuration")
    cache_mb: PositiveInt = option(1024, "background frame cache per worker, in MiB", metavar="MB")
    progress: bool = option(True, "progress bar, when stderr is a terminal")
    max_photo_pixels: PositiveInt = option(50_000_000, "photos (or alphas) with more pixels are rejected, from "
                                                       "their header, before decoding", metavar="N")
    min_subject_px: PositiveInt = option(16, "photos whose subject (alpha bounding box) is narrower or shorter "
                                             "are rejected", metavar="PX")
    lock_stale_s: Annotated[float, Interval(gt=0)] = option(
        180.0, "an output lock whose heartbeat is older than this (a killed run's) is taken over", metavar="S")
    fakemotion: FakeMotionConfig = field(default_factory=FakeMotionConfig)


class GenerateRefused(Exception):
    """The output holds a dataset made with another configuration."""


@dataclass
class GenerateSummary:
    """What a run produced; `status` is the CLI exit status."""

    status: int
    message: str
    manifest: dict[str, Any] = field(default_factory=dict)


def fingerprint(cfg: GenerateConfig, sources: dict) -> str:
    """Hash of everything that decides the dataset's content: config, sources, generator version."""
    content = {k: v for k, v in cfglib.to_dict(cfg).items() if k not in _NOT_CONTENT}
    blob = json.dumps({"config": content, "sources": sources, "generator_version": GENERATOR_VERSION}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _read_json(uri: str) -> dict | None:
    try:
        return json.loads(storage.read_bytes(uri))
    except FileNotFoundError:
        return None


def _photo_max_height(cfg: GenerateConfig) -> int:
    return int(round(cfg.fakemotion.size[1] * cfg.fakemotion.motion.person_height[1] * 1.05))


def _cover(cfg: GenerateConfig) -> tuple[int, int]:
    w, h = cfg.fakemotion.size
    z = cfg.fakemotion.background_zoom
    return int(round(w * z)), int(round(h * z))


# --- Ray Data stages -------------------------------------------------------------------------

def _validate_row(row: dict) -> dict:
    """Validate one source (runs in a Ray task). Returns ok/reason and the probe as JSON."""
    import cv2

    from matting_core.data.sources import BackgroundSource, PhotoSource, SourceError, validate_background, validate_photo

    cv2.setNumThreads(1)
    cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_ERROR)  # rejections are reported by us
    try:
        if row["kind"] == "photo":
            info = validate_photo(PhotoSource(row["uri"], row["alpha"] or None), max_pixels=row["max_pixels"],
                                  min_subject=row["min_subject"])
        else:
            info = validate_background(BackgroundSource(row["uri"]))
        return {**row, "ok": True, "reason": "", "info": json.dumps(dataclasses.asdict(info))}
    except SourceError as exc:
        # the alpha file may be the culprit rather than the image: name the file at fault
        return {**row, "uri": exc.uri, "ok": False, "reason": exc.reason, "info": ""}
    except Exception as exc:  # noqa: BLE001 - any decoder failure rejects only this input
        return {**row, "ok": False, "reason": f"{exc.__class__.__name__}: {exc}", "info": ""}


class ShardMaker:
    """Ray Data actor: makes whole shards, keeping decoded sources cached between them."""

    def __init__(self, cfg: dict, photos: list[dict], backgrounds: list[dict], fp: str):
        import cv2

        from matting_core.data.sources import BackgroundReader, PhotoCache, PhotoInfo
        from matting_core.video import VideoInfo

        cv2.setNumThreads(1)  # one Ray CPU per actor: parallelism comes from actors
        # The same for pymatting's numba loops (foreground estimation), read when numba loads: one
        # OpenMP thread per core in every actor made the actors' threads fight over the cores; a
        # photo took 20-700 ms instead of 7-85 ms, and the demo's 48 clips 8.8 s instead of 6.7 s.
        os.environ["NUMBA_NUM_THREADS"] = "1"
        self.cfg = cfglib.from_dict(GenerateConfig, cfg)
        self.fp = fp
        self.photos = [PhotoInfo(**{**p, "bbox": tuple(p["bbox"])}) for p in photos]
        self.backgrounds = [VideoInfo(**{**b, "pts": tuple(b["pts"])}) for b in backgrounds]
        self.background_frames = [b.frames for b in self.backgrounds]
        self.photo_cache = PhotoCache(max_items=256, max_height=_photo_max_height(self.cfg),
                                      max_pixels=self.cfg.max_photo_pixels)
        self.bg_reader = BackgroundReader(budget_bytes=self.cfg.cache_mb << 20)

    def make_clip(self, plan, timings: dict) -> dict:
        """Synthesise and encode the clip of `plan` (a row of the clip schema)."""
        from matting_core.data.clips import encode_clip
        from matting_core.data.fakemotion import clip_rng, synthesize_clip

        cfg, fm = self.cfg, self.cfg.fakemotion
        index = plan.index
        photo_info, bg_info = self.photos[plan.photo], self.backgrounds[plan.background]
        t0 = time.perf_counter()
        photo = self.photo_cache.get(photo_info)
        background = self.bg_reader.read(bg_info, plan.start, fm.frames, _cover(cfg))
        t1 = time.perf_counter()
        clip = synthesize_clip(photo, background, fm, clip_rng(cfg.seed, index))
        t2 = time.perf_counter()
        row = encode_clip(clip, index, cfg.seed, photo_info.image, bg_info.uri, plan.start, cfg.jpeg_quality)
        t3 = time.perf_counter()
        timings["decode"] += t1 - t0
        timings["synthesis"] += t2 - t1
        timings["encode"] += t3 - t2
        return row

    def _failure(self, plan, uri: str, reason: str) -> dict:
        """The errors.jsonl entry of a clip that could not be made: the file at fault and both sources."""
        return {"clip_id": plan.index, "uri": uri, "reason": reason, "photo": self.photos[plan.photo].image,
                "background": self.backgrounds[plan.background].uri}

    def __call__(self, batch: dict) -> dict:
        from matting_core.data.clips import shard_name, write_shard
        from matting_core.data.plan import plan_clip
        from matting_core.data.sources import SourceError

        import resource

        out: dict[str, list] = {k: [] for k in ("shard", "clips", "failed", "decode", "synthesis", "encode", "write",
                                                "rss_mb")}
        for start, stop in zip(batch["start"], batch["stop"]):
            start, stop = int(start), int(stop)
            timings = {"decode": 0.0, "synthesis": 0.0, "encode": 0.0}
            rows, failed = [], []
            # Visit clips in background order so each worker reads frame chunks sequentially;
            # content depends only on the clip index, and rows are written in index order.
            plans = [plan_clip(self.cfg.seed, i, len(self.photos), self.background_frames, self.cfg.fakemotion.frames)
                     for i in range(start, stop)]
            for plan in sorted(plans, key=lambda p: (p.background, p.start)):
                try:
                    rows.append(self.make_clip(plan, timings))
                except SourceError as exc:
                    failed.append(self._failure(plan, exc.uri, exc.reason))
                except Exception as exc:  # noqa: BLE001 - one bad clip must not lose the shard
                    # no file is known to be at fault: name the clip's photo, and both sources below
                    failed.append(self._failure(plan, self.photos[plan.photo].image,
                                                f"{exc.__class__.__name__}: {exc}"))
            rows.sort(key=lambda r: r["clip_id"])
            t0 = time.perf_counter()
            name = shard_name(start, stop)
            write_shard(storage.join(self.cfg.out, "clips", name), rows,
                        {"fingerprint": self.fp, "start": start, "stop": stop, "failed": failed})
            out["shard"].append(name)
            out["clips"].append(len(rows))
            out["failed"].append(json.dumps(failed))
            for k, v in timings.items():
                out[k].append(v)
            out["write"].append(time.perf_counter() - t0)
            out["rss_mb"].append(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
        return out


# --- the job -----------------------------------------------------------------------------------

def _validate_all(cfg: GenerateConfig, photos, backgrounds) -> list[dict]:
    import ray

    limits = {"max_pixels": cfg.max_photo_pixels, "min_subject": cfg.min_subject_px}
    items = [{"kind": "photo", "uri": p.image, "alpha": p.alpha or "", **limits} for p in photos]
    items += [{"kind": "background", "uri": b.uri, "alpha": "", **limits} for b in backgrounds]
    if not items:
        return []
    ds = ray.data.from_items(items, override_num_blocks=min(len(items), 8 * max(1, cfg.workers)))
    rows = ds.map(_validate_row, num_cpus=1, compute=ray.data.TaskPoolStrategy(size=max(1, cfg.workers))).take_all()
    return sorted(rows, key=lambda r: (r["kind"], r["uri"]))


def _refusal(cfg: GenerateConfig, record: dict, fp: str) -> str:
    """Why the dataset recorded in `record` (its manifest or marker) cannot be resumed by this run."""
    version = record.get("generator_version", 1)  # datasets that record none predate versioning
    if version != GENERATOR_VERSION:
        made = f"by fake-motion generator version {version} (this code is version {GENERATOR_VERSION})"
    else:
        made = "with a different configuration or source set"
    return (f"{cfg.out} holds a dataset made {made} (fingerprint {record['fingerprint']}, this run {fp}); "
            f"pass --overwrite to replace it, or choose another --out")


def _prepare_output(cfg: GenerateConfig, fp: str) -> None:
    manifest = _read_json(storage.join(cfg.out, "manifest.json"))
    marker = _read_json(storage.join(cfg.out, MARKER))
    from matting_core.data.clips import list_shards

    only_marker = not (manifest or {}).get("fingerprint")
    record = (marker or {}) if only_marker else manifest
    recorded = record.get("fingerprint")
    if recorded and recorded != fp:
        if only_marker and not list_shards(cfg.out):
            # the run that wrote the marker failed before writing anything: nothing to protect
            log.info("%s: replacing the marker of an earlier run that wrote no shard", cfg.out)
        elif not cfg.overwrite:
            raise GenerateRefused(_refusal(cfg, record, fp))
        else:
            log.warning("--overwrite: removing the dataset in %s", cfg.out)
    if cfg.overwrite and (recorded or storage.exists(storage.join(cfg.out, "clips"))):
        for name in ("manifest.json", MARKER, "errors.jsonl"):
            storage.remove(storage.join(cfg.out, name))
        storage.remove(storage.join(cfg.out, "clips"), recursive=True)


def _package_versions() -> dict[str, str]:
    from importlib import metadata

    out = {}
    for name in ("matting", "numpy", "opencv-python-headless", "av", "pyarrow", "ray", "pymatting"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def _remove_abandoned_temporaries(out: str) -> int:
    """Delete atomic-write temporaries in a local `out` and `out/clips` (only while holding its lock); how many.

    Only the folders generate writes are looked at (`out` may be inside a large tree). Object stores
    publish on one final PUT and leave no temporary objects behind.
    """
    root = storage.local_path(out)
    if root is None:
        return 0
    removed = 0
    for folder in (root, os.path.join(root, "clips")):
        if not os.path.isdir(folder):
            continue
        for name in os.listdir(folder):
            if _TEMPORARY.match(name) and os.path.isfile(os.path.join(folder, name)):
                try:
                    os.remove(os.path.join(folder, name))
                    removed += 1
                except FileNotFoundError:
                    pass
    if removed:
        log.info("%s: removed %d temporary file(s) left by an interrupted run", out, removed)
    return removed


def _read_footers(uris: list[str]) -> dict[str, tuple[int, dict] | None]:
    """Shard name -> (rows, footer metadata), or None for a shard whose footer cannot be read."""
    from matting_core.data.clips import shard_metadata

    footers = {}
    for uri in uris:
        try:
            footers[uri.rsplit("/", 1)[-1]] = shard_metadata(uri)
        except (OSError, ValueError):  # a truncated or foreign file: remade
            footers[uri.rsplit("/", 1)[-1]] = None
    return footers


def _shard_done(footer: tuple[int, dict] | None, fp: str) -> bool:
    """Whether a shard can be kept: readable, of this run's fingerprint, with no failed clip."""
    return footer is not None and footer[1].get("fingerprint") == fp and not footer[1].get("failed")


def run_generate(cfg: GenerateConfig) -> GenerateSummary:
    """Run the whole job under the output's lock; returns the summary (never raises for bad inputs).

    Raises OutputLocked when another live run holds the output, GenerateRefused when the output
    holds a dataset of another configuration.
    """
    cfglib.require(cfg, {"--photos": "photos", "--backgrounds": "backgrounds", "--out": "out"})
    with OutputLock(cfg.out, stale_after_s=cfg.lock_stale_s):
        _remove_abandoned_temporaries(cfg.out)
        return _run_locked(cfg)


def _run_locked(cfg: GenerateConfig) -> GenerateSummary:
    from matting_core.data.clips import SCHEMA_VERSION, FLOW_SCALE, list_shards, shard_name
    from matting_core.data.sources import discover_backgrounds, discover_photos
    from pipelines.ray_runtime import ensure_ray

    started = time.time()
    photos, photo_rej = discover_photos(list(cfg.photos))
    backgrounds, bg_rej = discover_backgrounds(list(cfg.backgrounds))
    rejections = [r.to_dict() for r in photo_rej + bg_rej]
    ensure_ray(num_cpus=None)
    checked = _validate_all(cfg, photos, backgrounds)
    valid_photos = [json.loads(r["info"]) for r in checked if r["kind"] == "photo" and r["ok"]]
    valid_bgs = [json.loads(r["info"]) for r in checked if r["kind"] == "background" and r["ok"]]
    rejections += [{"uri": r["uri"], "reason": r["reason"]} for r in checked if not r["ok"]]
    sources = {"photos": [p["image"] for p in valid_photos], "backgrounds": [b["uri"] for b in valid_bgs]}
    fp = fingerprint(cfg, sources)
    _prepare_output(cfg, fp)
    errors_uri = storage.join(cfg.out, "errors.jsonl")
    storage.write_bytes_atomic(errors_uri, "".join(json.dumps(redact_config(r)) + "\n" for r in rejections).encode())
    if not valid_photos or not valid_bgs:
        what = "photo" if not valid_photos else "background"
        return GenerateSummary(1, f"no valid {what} remains after validation "
                                  f"({len(rejections)} input(s) rejected, see {errors_uri})")
    storage.write_bytes_atomic(storage.join(cfg.out, MARKER), json.dumps(redact_config(
        {"fingerprint": fp, "generator_version": GENERATOR_VERSION, "config": cfglib.to_dict(cfg),
         "sources": sources}), indent=1).encode())

    ranges = [(s, min(s + cfg.shard_size, cfg.clips)) for s in range(0, cfg.clips, cfg.shard_size)]
    wanted = {shard_name(*r) for r in ranges}
    footers = _read_footers([u for u in list_shards(cfg.out) if u.rsplit("/", 1)[-1] in wanted])
    todo = [r for r in ranges if not _shard_done(footers.get(shard_name(*r)), fp)]
    redo = sum(1 for r in todo if shard_name(*r) in footers)
    if redo:
        log.warning("%s: remaking %d shard(s) with failed clips, another fingerprint or an unreadable footer",
                    cfg.out, redo)
    totals = {"decode": 0.0, "synthesis": 0.0, "encode": 0.0, "write": 0.0}
    made, steady, peak_rss = 0, None, None
    t_make = time.time()
    if todo:
        made, steady, peak_rss = _make_shards(cfg, todo, valid_photos, valid_bgs, fp, totals)
    elapsed_make = time.time() - t_make

    # Count from the shards' footers, so a resumed run reports the whole dataset.
    made_names = {shard_name(*r) for r in todo}
    footers.update(_read_footers([u for u in list_shards(cfg.out) if u.rsplit("/", 1)[-1] in made_names]))
    written, failed = 0, []
    for name in sorted(wanted):
        rows, meta = footers.get(name) or (0, {})
        written += rows
        failed += meta.get("failed", [])
    rejections += failed
    storage.write_bytes_atomic(errors_uri, "".join(json.dumps(redact_config(r)) + "\n" for r in rejections).encode())
    fm = cfg.fakemotion
    manifest = {
        "schema_version": SCHEMA_VERSION, "generator_version": GENERATOR_VERSION,
        "fingerprint": fp, "seed": cfg.seed,
        "config": cfglib.to_dict(cfg),
        "counts": {"clips_requested": cfg.clips, "clips_written": written, "clips_failed": len(failed),
                   "frames_written": written * fm.frames, "shards": len(ranges),
                   "photos_valid": len(valid_photos), "backgrounds_valid": len(valid_bgs),
                   "inputs_rejected": len(rejections) - len(failed)},
        "sources": sources,
        "flow": {"dtype": "int16", "scale": FLOW_SCALE, "layout": "[T,H,W,2] (dx, dy)",
                 "convention": "backward: frame t's (x,y) was at (x+dx, y+dy) in frame t-1; zero where alpha_t == 0"},
        "frame_size": {"width": fm.size[0], "height": fm.size[1], "frames": fm.frames},
        "this_run": {"clips_made": made, "seconds": round(elapsed_make, 3),
                     "clips_per_s": round(made / elapsed_make, 3) if made and elapsed_make else None,
                     "steady_clips_per_s": steady, "worker_peak_rss_mb": peak_rss,
                     "stage_seconds": {k: round(v, 3) for k, v in totals.items()}},
        "versions": _package_versions(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    storage.write_bytes_atomic(storage.join(cfg.out, "manifest.json"), json.dumps(redact_config(manifest),
                                                                                  indent=1).encode())
    status = 0 if written == cfg.clips else (3 if written else 1)
    msg = _summary_text(cfg, manifest, rejections, time.time() - started)
    return GenerateSummary(status, msg, manifest)


def _make_shards(cfg, todo, photos, backgrounds, fp, totals) -> int:
    import ray

    from pipelines.progress import Progress

    ds = ray.data.from_items([{"start": a, "stop": b} for a, b in todo], override_num_blocks=len(todo))
    ds = ds.map_batches(ShardMaker, batch_size=1, num_cpus=1, compute=ray.data.ActorPoolStrategy(size=max(1, min(cfg.workers, len(todo)))),
                        fn_constructor_kwargs={"cfg": cfglib.to_dict(cfg), "photos": photos,
                                               "backgrounds": backgrounds, "fp": fp})
    made, arrivals, peak_rss = 0, [], 0.0
    with Progress(total=sum(b - a for a, b in todo), unit="clip", desc="generate", enabled=cfg.progress) as bar:
        for row in ds.iter_rows():
            made += int(row["clips"])
            for k in totals:
                totals[k] += float(row[k])
            peak_rss = max(peak_rss, float(row["rss_mb"]))
            arrivals.append((time.time(), int(row["clips"])))
            bar.update(int(row["clips"]) + len(json.loads(row["failed"])))
    # Throughput once every worker is warm (started, sources decoded): from the first finished
    # round of shards to the end, which is what a long job runs at.
    steady = None
    warm = max(1, cfg.workers)
    if len(arrivals) > 2 * warm:  # too few shards to tell warm from start-up otherwise
        span = arrivals[-1][0] - arrivals[warm - 1][0]
        steady = round(sum(n for _, n in arrivals[warm:]) / span, 3) if span > 0 else None
    return made, steady, round(peak_rss, 1)


def _summary_text(cfg: GenerateConfig, manifest: dict, rejections: list[dict], seconds: float) -> str:
    c, run = manifest["counts"], manifest["this_run"]
    lines = [
        f"dataset   {cfg.out}",
        f"clips     {c['clips_written']}/{c['clips_requested']} written "
        f"({c['frames_written']} frames of {cfg.fakemotion.size[0]}x{cfg.fakemotion.size[1]}), "
        f"{c['clips_failed']} failed, {c['shards']} shards",
        f"sources   {c['photos_valid']} photos, {c['backgrounds_valid']} backgrounds valid; "
        f"{c['inputs_rejected']} input(s) rejected",
    ]
    if run["clips_made"]:
        st = run["stage_seconds"]
        busy = sum(st.values()) or 1.0
        lines.append(f"this run  {run['clips_made']} clips in {run['seconds']:.1f} s = {run['clips_per_s']:.2f} clips/s, "
                     f"{run['clips_per_s'] * cfg.fakemotion.frames:.1f} frames/s with {cfg.workers} worker(s)"
                     + (f"; warm: {run['steady_clips_per_s']:.2f} clips/s" if run.get("steady_clips_per_s") else ""))
        lines.append("time      " + ", ".join(f"{k} {100 * v / busy:.0f}%" for k, v in st.items()))
    else:
        lines.append("this run  nothing to make: every shard was already there")
    for r in rejections[:8]:
        where = f"clip {r['clip_id']}: " if "clip_id" in r else ""
        also = f" (background {r['background']})" if r.get("background") not in (None, r["uri"]) else ""
        lines.append(f"rejected  {where}{r['uri']}{also}: {r['reason']}")
    if len(rejections) > 8:
        lines.append(f"rejected  ... and {len(rejections) - 8} more, see errors.jsonl")
    lines.append(f"total     {seconds:.1f} s")
    return "\n".join(lines)


# --- CLI -----------------------------------------------------------------------------------------

EPILOG = """examples:
  matting generate --photos data/photos --backgrounds data/videos --out clips/ --clips 1000
  matting generate --photos s3://bucket/photos --backgrounds s3://bucket/bg --out s3://bucket/clips --workers 8
  matting generate --config jobs/generate.yaml --clips 20000 --overwrite

exit status: 0 every clip written; 3 some clips failed (listed in OUT/errors.jsonl; a rerun tries
them again); 1 nothing usable; 2 usage error, or refused before any work: --out holds a dataset of
another configuration, or another run is writing it (its lock OUT/_lock.json names host and pid; a
killed run's lock is taken over once its heartbeat is older than --lock-stale-s).
"""

# the two fake-motion knobs most runs change; the rest are YAML keys under `fakemotion:`
_NESTED = (cfglib.Flag("--frames", "fakemotion.frames", "frames per clip", "T"),
           cfglib.Flag("--size", "fakemotion.size", "frame size", "WxH"))


def add_parser(sub) -> None:
    """Register `matting generate`."""
    cfglib.add_command(sub, "generate", GenerateConfig, run, help="make a fake-motion clip dataset on Ray Data",
                       description=__doc__, epilog=EPILOG, nested=_NESTED)


def run(args: argparse.Namespace) -> int:
    """CLI entry: run the job and print the summary."""
    cfg = cfglib.from_args(GenerateConfig, args)
    try:
        summary = run_generate(cfg)
    except (GenerateRefused, OutputLocked) as exc:  # refused before any work: exit 2, as a usage error
        print(f"matting generate: refused: {exc}", file=sys.stderr)
        return 2
    print(summary.message)
    return summary.status
