"""`matting evaluate`: metrics over the benchmark layout, several methods ranked side by side.

Either predictions on storage (`--true DIR --pred [NAME=]DIR ...`) or a model run over a
benchmark folder or clip dataset in the same pass (`--model REF --data DIR_OR_URI`). Prior-only
baselines (each available prior, soft and thresholded, with and without motion-compensated
smoothing) run on the composites beside them. Writes PATH.json, PATH.csv and PATH.html.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
import tempfile
from dataclasses import dataclass
from typing import Literal

from matting_core.evaluation.metrics import ALL_METRICS
from matting_core.redaction import redact_config
from pipelines import config as cfglib
from pipelines.config import Annotated, Interval, NonNegativeInt, option

log = logging.getLogger("matting.evaluate")

EPILOG = """\
examples:
  # one method: mattes written by `matting matte DIR/<clip>/com -o mattes/`
  matting evaluate --true bench/ --pred mattes/ --out eval/report.json
  # several methods side by side (best, second, third marked per metric), no baselines
  matting evaluate --true bench/ --pred ours=mattes/ --pred rvm=rvm_out/ --baselines none
  # run a model over a benchmark (or a clip dataset) and evaluate it in one go
  matting evaluate --model models:/matting@candidate --data bench/ --out eval/candidate.json
  matting evaluate --model ckpt/model.pt --data s3://bucket/val-clips --log-to-mlflow 3f2a9c...

Prediction folders may use the Mattes layout (<clip>/pha/000000.png) or the benchmark layout
(<clip>/pha/0000.png): frames pair by clip name and by the integer in the file stem.
Exit status: 0 all evaluated, 3 something could not be evaluated (listed), 2 usage, 1 failure.
"""


@dataclass(frozen=True)
class EvaluateConfig:
    """Settings of one evaluation (YAML keys match the field names)."""

    true: str = option("", "ground truth in the benchmark layout DIR/<clip>/{com,pha,fgr}/", metavar="DIR")
    pred: tuple[str, ...] = option((), "predictions of one method; NAME defaults to the "
                                       "folder name", metavar="[NAME=]DIR", repeat=True)
    model: str = option("", "model to run: models:/NAME@ALIAS, models:/NAME/VERSION or a checkpoint", metavar="REF")
    data: str = option("", "benchmark folder or clip dataset to run --model on", metavar="DIR_OR_URI")
    out: str = option("evaluation.json", "report path; PATH.csv and PATH.html go beside it", metavar="PATH.json")
    metrics: tuple[str, ...] = option(ALL_METRICS, "comma-separated metrics to compute", metavar="LIST")
    baselines: tuple[str, ...] = option(("auto",), "priors to evaluate alone beside the methods: auto (every "
                                                   "available one), none, or a list of selfie,deeplabv3",
                                        metavar="LIST")
    prior_weights: str = option("default", "weights of the baseline priors: default|none|PATH", metavar="W")
    threshold: Annotated[float, Interval(gt=0.0, lt=1.0)] = option(0.5, "threshold of the thresholded baselines", metavar="T")
    device: Literal["auto", "cpu", "cuda"] = option("auto", "where the model runs")
    worst_frames: NonNegativeInt = option(6, "worst frames per method in the contact sheet", metavar="N")
    max_clips: NonNegativeInt = option(0, "evaluate only the first N clips; 0: all", metavar="N")
    log_to_mlflow: str = option("", "MLflow run id to attach metrics and report files to", metavar="RUN")
    tracking_uri: str = option("", "MLflow tracking URI (unset: $MLFLOW_TRACKING_URI or sqlite:///mlflow.db)",
                               metavar="URI")


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register `matting evaluate`."""
    return cfglib.add_command(subparsers, "evaluate", EvaluateConfig, run,
                              help="metrics over a benchmark layout; several methods ranked side by side",
                              description=__doc__, epilog=EPILOG)


def _parse_pred(spec: str) -> tuple[str, str]:
    """`NAME=DIR` or `DIR` (name = the folder's name)."""
    if "=" in spec and "://" not in spec.split("=", 1)[0]:
        name, uri = spec.split("=", 1)
    else:
        name, uri = os.path.basename(spec.rstrip("/")) or spec, spec
    return name, uri


def _baseline_priors(cfg: EvaluateConfig) -> tuple[list[str], bool]:
    """(prior backends to try, whether they were asked for explicitly)."""
    requested = [b.strip() for b in cfg.baselines if b.strip()]
    if not requested or requested == ["none"]:
        return [], False
    if requested == ["auto"]:
        return ["selfie", "deeplabv3"], False
    unknown = set(requested) - {"selfie", "deeplabv3"}
    if unknown:
        from pipelines.cli import UsageError

        raise UsageError(f"--baselines: unknown prior(s) {sorted(unknown)}; use auto, none or selfie,deeplabv3")
    return requested, True


def prior_baselines(backends: list[str], weights: str, threshold: float, device: str,
                    on_skip) -> list:
    """StreamMethods for each available prior: soft, thresholded, smoothed, smoothed+thresholded."""
    import numpy as np

    from matting_core.evaluation.evaluate import StreamMethod
    from matting_core.flow import TemporalSmoother
    from matting_core.prior import PriorStream, make_prior

    methods = []
    for backend in backends:
        try:
            prior = make_prior(backend, weights=weights, device="cpu" if device == "auto" else device)
        except Exception as exc:  # noqa: BLE001 - any failure to build a prior means "not available"
            on_skip(backend, f"{type(exc).__name__}: {exc}")
            continue
        for smooth in (False, True):
            for thresholded in (False, True):
                name = backend + ("-smooth" if smooth else "") + ("-thr" if thresholded else "")

                def start(clip, prior=prior, smooth=smooth, thresholded=thresholded):
                    stream = PriorStream(prior, TemporalSmoother() if smooth else None)

                    def predict(com):
                        p = stream(com)
                        if thresholded:
                            p = (p >= threshold).astype(np.float32)
                        return p, None
                    return predict
                methods.append(StreamMethod(name, start, source=f"prior {backend} alone"
                                            + (" + motion-compensated smoothing" if smooth else "")
                                            + (f", thresholded at {threshold}" if thresholded else "")))
    return methods


def model_method(ref: str, device: str):
    """A StreamMethod running the streaming matter of the model `ref` (with its recorded prior)."""
    from matting_core.evaluation.evaluate import StreamMethod
    from matting_core.inference.matter import Matter
    from matting_core.runtime import resolve_device, set_cpu_threads
    from pipelines.model_ref import load_model

    dev = resolve_device(device)
    if dev.type == "cpu":
        set_cpu_threads()  # the command's process: Matter itself leaves thread counts alone
    matter = Matter(load_model(ref, device=str(dev)), device=dev)

    def start(clip):
        matter.reset()

        def predict(com):
            frame = matter.step(com)
            return frame.pha, frame.fgr
        return predict
    name = os.path.basename(ref.rstrip("/")) if "://" not in ref else ref.split("://", 1)[1]
    return StreamMethod(name or "model", start, source=ref)


def truth_clips(uri: str, max_clips: int = 0) -> list:
    """Truth clips of a benchmark folder, or of a clip dataset (`manifest.json` + `clips/`)."""
    from matting_core import storage
    from matting_core.evaluation.evaluate import ArrayClip, scan_benchmark

    if storage.exists(storage.join(uri, "manifest.json")) and storage.exists(storage.join(uri, "clips")):
        from matting_core.data.clips import iter_clips

        clips = []
        for rec in iter_clips(uri):
            clips.append(ArrayClip(f"clip{rec.clip_id}" if not isinstance(rec.clip_id, str) else rec.clip_id,
                                   rec.alpha, rec.fgr, rec.frames, rec.flow))
            if max_clips and len(clips) >= max_clips:
                break
        return clips
    clips = scan_benchmark(uri)
    return clips[:max_clips] if max_clips else clips


def log_to_mlflow(run_id: str, tracking_uri: str, result, paths: dict[str, str]) -> None:
    """Attach overall metrics (`eval/<metric>` or `eval/<method>/<metric>`) and the report files to a run."""
    import re
    import time

    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    from matting_core import storage

    client = MlflowClient(tracking_uri=tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///mlflow.db")
    client.get_run(run_id)  # fails clearly for an unknown run before anything is logged
    safe = lambda s: re.sub(r"[^A-Za-z0-9_\-. /]", "_", s)
    now = int(time.time() * 1000)
    metrics = [Metric(f"eval/{k}" if len(result.methods) == 1 else f"eval/{safe(m.name)}/{k}", float(v), now, 0)
               for m in result.methods for k, v in m.overall.items()]
    for i in range(0, len(metrics), 900):  # MLflow caps a batch at 1000 metrics
        client.log_batch(run_id, metrics=metrics[i:i + 900])
    with tempfile.TemporaryDirectory() as tmp:
        for uri in paths.values():
            local = storage.local_path(uri)
            if local is None:  # artifacts are uploaded from local files
                local = os.path.join(tmp, os.path.basename(uri))
                with open(local, "wb") as f:
                    f.write(storage.read_bytes(uri))
            client.log_artifact(run_id, local, artifact_path="evaluation")


def run(args: argparse.Namespace) -> int:
    """Evaluate; print the table; write the reports; exit 0, 3 (something not evaluated) or 1."""
    from pipelines.cli import EXIT_FAILED, EXIT_OK, EXIT_PARTIAL, UsageError

    cfg = cfglib.from_args(EvaluateConfig, args)
    if bool(cfg.true) == bool(cfg.data):
        raise UsageError("give either --true DIR --pred [NAME=]DIR ... or --model REF --data DIR_OR_URI")
    if cfg.true and not cfg.pred:
        raise UsageError("--true needs at least one --pred [NAME=]DIR")
    if cfg.data and cfg.pred:
        raise UsageError("--pred goes with --true; with --data the methods are --model and the baselines")
    if cfg.model and not cfg.data:
        raise UsageError("--model needs --data DIR_OR_URI (a benchmark folder or a clip dataset)")
    metrics = tuple(m.strip() for m in cfg.metrics if m.strip())
    unknown = set(metrics) - set(ALL_METRICS)
    if unknown or not metrics:
        raise UsageError(f"--metrics: unknown metric(s) {sorted(unknown)}; known: {','.join(ALL_METRICS)}")
    backends, explicit = _baseline_priors(cfg)

    from matting_core import storage
    from matting_core.evaluation.evaluate import FolderMethod, evaluate
    from matting_core.evaluation.report import format_table, write_reports

    truth_uri = cfg.true or cfg.data
    if not storage.exists(truth_uri):
        raise UsageError(f"{truth_uri}: no such folder")
    try:
        clips = truth_clips(truth_uri, cfg.max_clips)
    except (OSError, ValueError) as exc:
        print(f"matting evaluate: {truth_uri}: cannot read the ground truth: {exc}", file=sys.stderr)
        return EXIT_FAILED
    if not clips:
        print(f"matting evaluate: {truth_uri}: no clip with a pha/ folder found", file=sys.stderr)
        return EXIT_FAILED

    methods, skipped = [], []
    if cfg.model:
        try:
            methods.append(model_method(cfg.model, cfg.device))
        except (OSError, ValueError, RuntimeError) as exc:
            print(f"matting evaluate: cannot load model {cfg.model}: {exc}", file=sys.stderr)
            return EXIT_FAILED
    for spec in cfg.pred:
        name, uri = _parse_pred(spec)
        if not storage.exists(uri):
            raise UsageError(f"--pred {spec}: {uri}: no such folder")
        methods.append(FolderMethod(name, uri))

    def on_skip(backend, reason):
        skipped.append({"baseline": backend, "reason": reason})
        print(f"matting evaluate: baseline {backend} not available: {reason}", file=sys.stderr)

    methods += prior_baselines(backends, cfg.prior_weights, cfg.threshold, cfg.device, on_skip)
    if not methods:
        print("matting evaluate: nothing to evaluate: no --model, no --pred and no available baseline",
              file=sys.stderr)
        return EXIT_FAILED
    names = [m.name for m in methods]
    if len(set(names)) != len(names):
        raise UsageError(f"method names must be unique (use NAME=DIR): {names}")

    def on_problem(p):
        print(f"matting evaluate: {p}", file=sys.stderr)

    current = {"clip": None}

    def on_frame(clip, index):
        if clip != current["clip"]:
            current["clip"] = clip
            log.info("evaluating clip %s (%d method(s))", clip, len(methods))

    result = evaluate(clips, methods, metrics=metrics, truth_name=truth_uri, worst_frames=cfg.worst_frames,
                      on_problem=on_problem, on_frame=on_frame)
    print(format_table(result))
    extra = redact_config({"config": dataclasses.asdict(cfg), "skipped_baselines": skipped})
    paths = write_reports(result, cfg.out, extra=extra)
    print(f"report: {paths['json']} {paths['csv']} {paths['html']}")
    if cfg.log_to_mlflow:
        log_to_mlflow(cfg.log_to_mlflow, cfg.tracking_uri, result, paths)
        print(f"logged to MLflow run {cfg.log_to_mlflow}")
    if not any(m.evaluated_frames for m in result.methods):
        return EXIT_FAILED
    return EXIT_PARTIAL if result.problems or (explicit and skipped) else EXIT_OK
