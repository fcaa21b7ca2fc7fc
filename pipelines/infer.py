"""`matting infer`: a whole archive of videos matted in parallel on Ray Data, resumable, surviving bad files.

Stages: resolve the model once (an alias is pinned to its version, the checkpoint is loaded on
the driver to prove it works, then shared with every actor through the object store) ->
discover the inputs (videos, frame folders, benchmark clips) -> skip the complete ones -> probe
the rest (Ray tasks) -> split long videos into segments -> matte every unit of work in a pool of
stateful actors, each running the per-video loop `matting matte` runs -> assemble split videos
(Ray tasks) -> `OUT/_runs/<run-id>.jsonl` and a summary. Outputs go from the actors to storage,
never through the driver.

Exit status: 0 every input ok or skipped, 3 some partial or failed (listed in the run log),
2 usage error, 1 nothing could be done (the model cannot be loaded, the input is missing, every
input failed).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from matting_core import storage
from matting_core.video.reader import VIDEO_EXTENSIONS
from pipelines import config as cfglib
from pipelines.cli import EXIT_FAILED, EXIT_OK, EXIT_PARTIAL, UsageError
from pipelines.config import NonNegativeFloat, NonNegativeInt, PositiveFloat, PositiveInt, option
from pipelines.matte import MattingOptions

log = logging.getLogger("matting.infer")

RUNS_DIR = "_runs"
SEGMENTS_DIR = "_segments"
COMPLETE = ("ok", "partial")


@dataclass(frozen=True)
class InferConfig(MattingOptions):
    """Configuration of `matting infer` (YAML keys = field names; CLI flags override); how frames
    are matted is `matte`'s `MattingOptions`."""

    model: str = option("", "checkpoint path or URI, models:/NAME@ALIAS or models:/NAME/VERSION", metavar="REF")
    input: str = option("", "archive: a folder or prefix of videos and frame folders, or one video", metavar="URI")
    out: str = option("", "output folder or prefix; results go to OUT/<relative path>/", metavar="URI")
    formats: tuple[str, ...] = option(("pha", "fgr", "rgba.webm"), "comma-separated subset of pha,fgr,rgba.mov,"
                                                                    "rgba.webm,composite.mp4", metavar="LIST")
    actors: PositiveInt = option(2, "matting actors (each holds one model)", metavar="N")
    cpus_per_actor: PositiveFloat = option(1.0, "CPUs each actor reserves (its torch threads)", metavar="C")
    gpus_per_actor: NonNegativeFloat | None = option(None, "GPUs each actor reserves (unset: 1 when the cluster "
                                                           "has GPUs, else 0)", metavar="G")
    segment_frames: NonNegativeInt = option(300, "split videos longer than this into segments matted in "
                                                 "parallel; 0: never split", metavar="N")
    warmup_frames: NonNegativeInt = option(16, "frames before a segment matted (not written) to settle the "
                                               "recurrent state at the seam", metavar="N")
    extensions: tuple[str, ...] = option(VIDEO_EXTENSIONS, "video file extensions to matte", metavar="LIST")
    run_id: str = option("", "name of this run's log OUT/_runs/<run-id>.jsonl (unset: time and a random suffix)",
                         metavar="ID")
    log_to_mlflow: bool = option(False, "record the batch run in MLflow (model, counts, throughput, run log)")
    experiment: str = option("matting-infer", "MLflow experiment of --log-to-mlflow", metavar="NAME")
    progress: bool | None = option(None, "progress bar (unset: when stderr is a terminal)")


@dataclass
class InferSummary:
    """What a run did; `status` is the exit status."""

    status: int
    message: str
    counts: dict[str, int] = field(default_factory=dict)
    run_log: str = ""


# --- work on the actors and tasks ------------------------------------------------------------

def _probe_row(row: dict) -> dict:
    """Probe one input (a Ray task): its VideoInfo as JSON, or the reason it cannot be read."""
    from matting_core.errors import InputError
    from matting_core.video import probe

    try:
        info = probe(row["uri"], strict=False)  # corrupt frames are reported by index while matting
        return {**row, "ok": True, "reason": "", "info": json.dumps(dataclasses.asdict(info))}
    except InputError as exc:
        return {**row, "ok": False, "reason": exc.reason, "info": ""}
    except Exception as exc:  # noqa: BLE001 - any reader failure loses only this input
        return {**row, "ok": False, "reason": f"{exc.__class__.__name__}: {exc}", "info": ""}


class InferActor:
    """A Ray Data actor holding one model: mattes units of work (a video, or one segment of it)."""

    def __init__(self, cfg: dict, checkpoint: list, record: dict):
        import ray

        from matting_core.model import load_checkpoint
        from matting_core.runtime import resolve_device, set_cpu_threads, tune_malloc

        self.cfg = cfglib.from_dict(InferConfig, cfg)
        self.record = record
        self.device = resolve_device(self.cfg.device)
        tune_malloc()
        if self.device.type == "cpu":
            set_cpu_threads(max(1, int(self.cfg.cpus_per_actor)))
        net = load_checkpoint(self.cfg.model, data=ray.get(checkpoint[0]))
        from pipelines.matte import build_matter

        self.matter, self.model_config = build_matter(net, self.cfg, self.device)

    def __call__(self, batch: dict) -> dict:
        import resource

        out: dict[str, list] = {k: [] for k in ("key", "segment", "status", "frames", "lost", "reason", "seconds",
                                                "peak_rss_mb")}
        for unit in (json.loads(u) for u in batch["unit"]):
            t0 = time.perf_counter()
            result = self._matte(unit)
            out["key"].append(unit["key"])
            out["segment"].append(unit["segment"]["index"] if unit["segment"] else -1)
            out["status"].append(result.status)
            out["frames"].append(result.frames)
            out["lost"].append(json.dumps(result.lost_frames))
            out["reason"].append(result.reason or "")
            out["seconds"].append(time.perf_counter() - t0)
            out["peak_rss_mb"].append(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)  # this actor's, so far
        return out

    def _matte(self, unit: dict):
        from matting_core.inference.loop import VideoResult, matte_video
        from matting_core.inference.outputs import MatteOutputs, default_encoder_threads
        from matting_core.inference.segments import Segment
        from matting_core.video import VideoInfo

        info = VideoInfo(**json.loads(unit["info"]))
        segment = Segment(**unit["segment"]) if unit["segment"] else None
        cfg = self.cfg
        size = (info.width, info.height)
        try:
            outputs = MatteOutputs(unit["out_dir"], unit["stem"], cfg.formats, info.fps, size,
                                   alpha_bits=cfg.alpha_bits, composite_bg=cfg.composite_bg, background=True,
                                   encoder_threads=default_encoder_threads(size, self.device.type == "cpu"))
        except (OSError, ValueError) as exc:
            return VideoResult("failed", reason=f"cannot write {storage.join(unit['out_dir'], unit['stem'])}: {exc}")
        record = {**self.record, "model_config": self.model_config, "input_key": unit["key"]}
        if segment is not None:
            record["segment"] = dataclasses.asdict(segment)
        with outputs:
            return matte_video(unit["uri"], info, self.matter, outputs, record=record, segment=segment)


def _assemble(key: str, segment_uris: list[str], out_dir: str, stem: str, formats: list[str],
              record: dict) -> dict:
    """Join a split video's segments and publish it (a Ray task); returns its status row."""
    from matting_core.inference.assemble import assemble_segments

    try:
        _, doc = assemble_segments(segment_uris, out_dir, stem, formats, record)
    except Exception as exc:  # noqa: BLE001 - a failed join loses only this video
        return {"key": key, "status": "failed", "reason": f"cannot assemble the segments: {exc}"}
    _remove_empty_parents(segment_uris[0], stop=SEGMENTS_DIR)
    return {"key": key, "status": doc["status"], "reason": ""}


def _remove_empty_parents(uri: str, stop: str) -> None:
    """Remove the empty local folders above `uri` up to and including the one named `stop`."""
    path = storage.local_path(uri)
    if path is None:
        return  # object stores have no folders to leave behind
    path = os.path.dirname(os.path.abspath(path))
    while True:
        try:
            os.rmdir(path)
        except OSError:  # not empty (other videos' segments) or already gone
            return
        if os.path.basename(path) == stop:
            return
        path = os.path.dirname(path)


# --- the driver ----------------------------------------------------------------------------------

def _new_run_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S", time.gmtime()) + "-" + uuid.uuid4().hex[:6]


def _result(uri: str) -> dict | None:
    from matting_core.inference.outputs import RESULT_FILE

    try:
        return json.loads(storage.read_bytes(storage.join(uri, RESULT_FILE)))
    except (OSError, ValueError):  # absent, unreadable, or a file where the folder would be: not complete
        return None


def _results(uris: list[str]) -> list[dict | None]:
    """`_result` of every output set, read concurrently: one request each, and on object storage an
    archive of thousands of videos would otherwise wait for them one after another."""
    from concurrent.futures import ThreadPoolExecutor

    if len(uris) < 2:
        return [_result(u) for u in uris]
    with ThreadPoolExecutor(max_workers=min(16, len(uris)), thread_name_prefix="infer-skip") as pool:
        return list(pool.map(_result, uris))


def _split_key(out: str, key: str) -> tuple[str, str]:
    """(parent URI, stem) of the output set of `key` (`a/b/clip` -> (`OUT/a/b`, `clip`))."""
    parent, _, stem = key.rpartition("/")
    return (storage.join(out, parent) if parent else out), stem


def _load_model(cfg: InferConfig) -> tuple[str, str | None, bytes]:
    """(pinned reference, registry version, checkpoint bytes), after proving the checkpoint loads."""
    from matting_core.model import load_checkpoint
    from pipelines.model_ref import checkpoint_bytes, pin_model

    pinned, version = pin_model(cfg.model)
    data = checkpoint_bytes(pinned)
    load_checkpoint(pinned, data=data)
    return pinned, version, data


def run_infer(cfg: InferConfig) -> InferSummary:
    """Run the whole job; returns the summary (bad inputs are listed, never raised)."""
    from matting_core.inference.archive import discover_archive
    from matting_core.inference.outputs import parse_formats
    from matting_core.redaction import redact, redact_config
    from pipelines.model_ref import ModelRefError

    cfglib.require(cfg, {"--model": "model", "--input": "input", "--out": "out"})
    try:
        cfg = dataclasses.replace(cfg, formats=parse_formats(cfg.formats))
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    started = time.time()
    run_id = cfg.run_id or _new_run_id()
    try:
        pinned, version, checkpoint = _load_model(cfg)
    except (ModelRefError, OSError, ValueError, RuntimeError, KeyError) as exc:
        return InferSummary(EXIT_FAILED, f"model {redact(cfg.model)} cannot be loaded: {exc}")
    try:
        archive = discover_archive(cfg.input, tuple(cfg.extensions))
    except FileNotFoundError as exc:
        return InferSummary(EXIT_FAILED, f"{redact(cfg.input)}: no such file or folder ({exc})")

    entries: dict[str, dict[str, Any]] = {}  # key -> its run-log line
    for uri, reason in archive.refused:
        entries[uri] = {"uri": uri, "key": None, "status": "failed", "error": reason}
    todo = []
    for item, done in zip(archive.inputs, _results([storage.join(cfg.out, i.key) for i in archive.inputs])):
        if done and done.get("status") in COMPLETE:
            entries[item.key] = {"uri": item.uri, "key": item.key, "status": "skipped", "frames": done.get("frames"),
                                 "lost_frames": done.get("lost_frames", [])}
        else:
            todo.append(item)
    record = redact_config({"model": pinned, "model_version": version, "requested_model": cfg.model,
                            "run_id": run_id, "config": cfglib.to_dict(cfg)})
    counts = {"frames": 0}
    if todo:
        _run_units(cfg, todo, checkpoint, record, entries, counts)
    seconds = time.time() - started
    return _finish(cfg, run_id, archive, entries, counts, seconds, pinned, version)


def _run_units(cfg, todo, checkpoint, record, entries, counts) -> None:
    import ray

    from matting_core.inference.segments import plan_segments
    from pipelines.progress import Progress
    from pipelines.ray_runtime import ensure_ray

    ensure_ray()
    rows = [{"uri": i.uri, "key": i.key} for i in todo]
    probed = ray.data.from_items(rows, override_num_blocks=min(len(rows), 8 * cfg.actors)).map(
        _probe_row, num_cpus=1, compute=ray.data.TaskPoolStrategy(size=cfg.actors)).take_all()
    units, splits = [], {}
    for row in sorted(probed, key=lambda r: r["key"]):
        key = row["key"]
        if not row["ok"]:
            entries[key] = {"uri": row["uri"], "key": key, "status": "failed", "error": row["reason"]}
            continue
        info = json.loads(row["info"])
        segments = plan_segments(info["frames"], cfg.segment_frames, cfg.warmup_frames)
        entries[key] = {"uri": row["uri"], "key": key, "status": "pending", "frames": 0, "lost_frames": [],
                        "source_frames": info["frames"], "segments": len(segments), "seconds": 0.0}
        parent, stem = _split_key(cfg.out, key)
        if len(segments) == 1:
            units.append({"uri": row["uri"], "key": key, "info": row["info"], "segment": None,
                          "out_dir": parent, "stem": stem, "frames": info["frames"]})
            continue
        seg_root = storage.join(cfg.out, SEGMENTS_DIR, key)
        splits[key] = {"parent": parent, "stem": stem, "uris": [storage.join(seg_root, s.name) for s in segments],
                       "done": {}}
        for s in segments:
            done = _result(storage.join(seg_root, s.name))
            if done and done.get("status") in COMPLETE:  # finished by an interrupted run
                splits[key]["done"][s.index] = done
                continue
            units.append({"uri": row["uri"], "key": key, "info": row["info"], "segment": dataclasses.asdict(s),
                          "out_dir": seg_root, "stem": s.name, "frames": s.stop - s.start})
    gpus = cfg.gpus_per_actor
    if gpus is None:
        gpus = 1.0 if ray.cluster_resources().get("GPU", 0) >= 1 else 0.0
    assembling = []

    def maybe_assemble(key: str) -> None:
        split = splits[key]
        if len(split["done"]) == len(split["uris"]):
            assembling.append(ray.remote(num_cpus=1)(_assemble).remote(
                key, split["uris"], split["parent"], split["stem"], list(cfg.formats), record))

    for key in splits:
        maybe_assemble(key)  # every segment finished earlier: only the join is missing
    if units:
        # Longest first, so the last actor to finish does not start a long video at the end.
        units.sort(key=lambda u: -u["frames"])
        ds = ray.data.from_items([{"unit": json.dumps(u)} for u in units], override_num_blocks=len(units))
        ds = ds.map_batches(InferActor, batch_size=1, num_cpus=cfg.cpus_per_actor, num_gpus=gpus,
                            compute=ray.data.ActorPoolStrategy(size=min(cfg.actors, len(units))),
                            fn_constructor_kwargs={"cfg": cfglib.to_dict(cfg), "checkpoint": [ray.put(checkpoint)],
                                                   "record": record})
        total = sum(u["frames"] for u in units)
        with Progress(total=total, unit="frame", desc="infer", enabled=_show_progress(cfg)) as bar:
            for row in ds.iter_rows():
                key = row["key"]
                entry = entries[key]
                entry["frames"] += int(row["frames"])
                entry["lost_frames"] += json.loads(row["lost"])
                entry["seconds"] += float(row["seconds"])
                peak = max(entry.get("actor_peak_rss_mb", 0.0), float(row["peak_rss_mb"]))
                entry["actor_peak_rss_mb"] = round(peak, 1)
                counts["frames"] += int(row["frames"])
                bar.update(int(row["frames"]))
                if row["status"] not in COMPLETE:
                    entry["status"], entry["error"] = "failed", row["reason"]
                elif key in splits:
                    splits[key]["done"][int(row["segment"])] = row
                    if entry["status"] == "pending":
                        maybe_assemble(key)
                else:
                    entry["status"] = row["status"]
                finished = sum(e["status"] != "pending" for e in entries.values())
                bar.set_postfix(videos=f"{finished}/{len(entries)}")
    for row in ray.get(assembling):
        entry = entries[row["key"]]
        if entry["status"] == "pending":
            entry["status"] = row["status"]
            if row["reason"]:
                entry["error"] = row["reason"]
    for entry in entries.values():
        if entry["status"] == "pending":  # a segment failed: the video is not published
            entry["status"] = "failed"
            entry.setdefault("error", "a segment could not be matted")
        if entry.get("seconds"):
            # actor-seconds: segments of one video run side by side, so this is per actor, not wall
            entry["fps"] = round(entry["frames"] / entry["seconds"], 2)
            entry["seconds"] = round(entry["seconds"], 2)


def _show_progress(cfg: InferConfig) -> bool:
    return cfg.progress if cfg.progress is not None else sys.stderr.isatty()


def _finish(cfg, run_id, archive, entries, counts, seconds, pinned, version) -> InferSummary:
    from matting_core.redaction import redact_config

    lines = [redact_config(e) for e in sorted(entries.values(), key=lambda e: e.get("key") or e["uri"])]
    run_log = storage.join(cfg.out, RUNS_DIR, f"{run_id}.jsonl")
    storage.write_bytes_atomic(run_log, "".join(json.dumps(line) + "\n" for line in lines).encode())
    by_status = {s: sum(e["status"] == s for e in lines) for s in ("ok", "partial", "failed", "skipped")}
    summary = {**by_status, "inputs": len(lines), "ignored": len(archive.ignored), "frames": counts["frames"]}
    fps = counts["frames"] / seconds if seconds > 0 else 0.0
    if cfg.log_to_mlflow:
        _log_to_mlflow(cfg, run_id, pinned, version, summary, fps, seconds, run_log)
    if by_status["partial"] or by_status["failed"]:
        status = EXIT_FAILED if not (by_status["ok"] or by_status["partial"] or by_status["skipped"]) else EXIT_PARTIAL
    else:
        status = EXIT_OK if lines else EXIT_FAILED
    text = [f"archive   {cfg.input} -> {cfg.out}",
            f"model     {pinned}" + (f" (registry version {version})" if version else ""),
            f"videos    {by_status['ok']} ok, {by_status['partial']} partial, {by_status['failed']} failed, "
            f"{by_status['skipped']} skipped; {summary['ignored']} other file(s) ignored",
            f"frames    {counts['frames']} in {seconds:.1f} s = {fps:.1f} frames/s with {cfg.actors} actor(s)"]
    for e in [e for e in lines if e["status"] in ("failed", "partial")][:8]:
        why = e.get("error") or f"frames lost: {e.get('lost_frames')}"
        text.append(f"{e['status']:<9} {e['uri']}: {why}")
    text.append(f"run log   {run_log}")
    if not lines:
        text.insert(1, "nothing to matte: no video or frame folder found")
    return InferSummary(status, "\n".join(text), summary, run_log)


def _log_to_mlflow(cfg, run_id, pinned, version, summary, fps, seconds, run_log) -> None:
    from mlflow.tracking import MlflowClient

    from matting_core.redaction import redact
    from pipelines.model_ref import tracking_uri
    from pipelines.train import absolute_tracking_uri

    uri = absolute_tracking_uri(tracking_uri())
    client = MlflowClient(uri, registry_uri=uri)
    experiment = client.get_experiment_by_name(cfg.experiment)
    experiment_id = experiment.experiment_id if experiment else client.create_experiment(cfg.experiment)
    run = client.create_run(experiment_id, run_name=run_id)
    for k, v in {"model": pinned, "model_version": version or "", "input": redact(cfg.input),
                 "out": redact(cfg.out), "actors": cfg.actors, "segment_frames": cfg.segment_frames,
                 "formats": ",".join(cfg.formats)}.items():
        client.log_param(run.info.run_id, k, str(v))
    for k, v in {**summary, "frames_per_s": fps, "seconds": seconds}.items():
        client.log_metric(run.info.run_id, f"infer/{k}", float(v))
    with tempfile.TemporaryDirectory() as tmp:
        local = os.path.join(tmp, os.path.basename(run_log))
        with open(local, "wb") as f:
            f.write(storage.read_bytes(run_log))
        client.log_artifact(run.info.run_id, local)
    client.set_terminated(run.info.run_id)


# --- CLI -----------------------------------------------------------------------------------------

EPILOG = """examples:
  matting infer --model models:/matting@champion --input s3://archive/2024 --out s3://mattes/2024
  matting infer --model checkpoints/model.pt --input videos/ --out mattes/ --formats pha,rgba.webm --actors 2
  matting infer --config jobs/infer.yaml --segment-frames 600 --log-to-mlflow

outputs: OUT/<path of the video without extension>/ (the mattes layout of `matting matte`), and
OUT/_runs/<run-id>.jsonl with one line per input (uri, status ok|partial|failed|skipped, frames,
lost frames, seconds, error). A rerun skips complete videos and finishes only what is missing.

exit status: 0 every input ok or skipped, 3 some partial or failed, 2 usage error,
1 nothing could be done.
"""


def add_parser(sub) -> None:
    """Register `matting infer`."""
    cfglib.add_command(sub, "infer", InferConfig, run, help="matte a whole archive of videos on Ray Data",
                       description=__doc__, epilog=EPILOG)


def run(args: argparse.Namespace) -> int:
    """CLI entry: run the job and print the summary."""
    cfg = cfglib.from_args(InferConfig, args)
    summary = run_infer(cfg)
    print(summary.message)
    return summary.status
