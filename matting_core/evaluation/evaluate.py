"""Evaluation of one or more methods against ground truth: pairing, per-frame/clip/overall, ranking.

Truth comes as clips of frames (the benchmark layout `DIR/<clip>/{com,pha,fgr}/0000.png`, or
in-memory clips such as a clip dataset's records). A method either has predictions on storage
(`FolderMethod`: the Mattes or benchmark layout, paired by clip name and by the integer in the
file stem, so `0007.png` pairs with `000007.png`) or computes them while the truth streams by
(`StreamMethod`: a model or a baseline run on the composites). Problems (missing or extra clips
and frames, wrong sizes, unreadable files) are collected, never silently skipped, and the rest is
still evaluated. Overall values are the mean over clips of each clip's mean (as the field's tables).
Temporal metrics (dtSSD, MESSDdt) pair frame n only with frame n-1 of both truth and prediction: a
gap in either numbering starts a new temporal chain, as frame 0 does.
"""
from __future__ import annotations

import heapq
import os
import re
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, Protocol

import cv2
import numpy as np

from matting_core.evaluation import metrics as M
from matting_core import storage
from matting_core.video.reader import IMAGE_EXTENSIONS, decode_image

__all__ = [
    "Problem", "FrameProblem", "TrueFrame", "TruthClip", "BenchmarkClip", "ArrayClip", "scan_benchmark",
    "Method", "FolderMethod", "StreamMethod", "WorstFrame", "ClipResult", "MethodResult",
    "EvaluationResult", "evaluate", "rank", "read_alpha", "read_rgb", "frame_index",
]

_DIGITS = re.compile(r"(\d+)")


@dataclass(frozen=True)
class Problem:
    """Something that could not be evaluated: which method, clip and frame, what kind, why."""

    method: str
    clip: str
    frame: int | None
    kind: str  # missing clip | extra clip | missing frame | extra frame | wrong size | unreadable | no truth
    message: str

    def __str__(self) -> str:
        where = self.clip + (f" frame {self.frame}" if self.frame is not None else "")
        return f"[{self.method}] {where}: {self.kind}: {self.message}"


class FrameProblem(Exception):
    """Raised by a method when it has no usable prediction for a frame."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind, self.message = kind, message


def frame_index(uri: str) -> int | None:
    """The integer in a frame file's stem (the last run of digits), or None."""
    stem = os.path.splitext(os.path.basename(uri))[0]
    digits = _DIGITS.findall(stem)
    return int(digits[-1]) if digits else None


def _numbered(folder: str) -> dict[int, str]:
    """{frame index: uri} of the numbered images directly in `folder` (empty when absent)."""
    fs, path = storage.filesystem(folder)
    try:
        names = fs.ls(path, detail=False) if fs.isdir(path) else []
    except (FileNotFoundError, NotADirectoryError):
        names = []
    out: dict[int, str] = {}
    for name in names:
        base = os.path.basename(name.rstrip("/"))
        if os.path.splitext(base)[1].lower() in IMAGE_EXTENSIONS and not base.startswith("."):
            idx = frame_index(base)
            if idx is not None:
                out[idx] = storage.join(folder, base)
    return dict(sorted(out.items()))


def read_alpha(uri: str) -> np.ndarray:
    """Alpha float32 `[H,W]` in [0,1] from an 8/16-bit grey, RGB (first channel) or RGBA (alpha) image."""
    img = decode_image(storage.read_bytes(uri), uri, cv2.IMREAD_UNCHANGED)
    if img.ndim == 3:
        img = img[..., 3] if img.shape[2] == 4 else img[..., 0]
    scale = 65535.0 if img.dtype == np.uint16 else 255.0
    return (img.astype(np.float32) / scale).astype(np.float32)


def read_rgb(uri: str) -> np.ndarray:
    """RGB uint8 `[H,W,3]` from an image file."""
    img = decode_image(storage.read_bytes(uri), uri, cv2.IMREAD_COLOR)
    if img.dtype == np.uint16:
        img = (img // 257).astype(np.uint8)
    return np.ascontiguousarray(cv2.cvtColor(img, cv2.COLOR_BGR2RGB))


# ---------------------------------------------------------------------------------------------- truth

@dataclass
class TrueFrame:
    """One ground-truth frame: alpha float32 `[H,W]`, fgr/com uint8 `[H,W,3]` (None when absent), flow `[H,W,2]`."""

    index: int
    pha: np.ndarray
    fgr: np.ndarray | None = None
    com: np.ndarray | None = None
    flow: np.ndarray | None = None


class TruthClip(Protocol):
    """A ground-truth clip: its name, frame indices and frames in order."""

    name: str

    def indices(self) -> list[int]: ...

    def frames(self, on_problem: Callable[[int, str, str], None]) -> Iterator[TrueFrame]: ...


@dataclass
class BenchmarkClip:
    """A clip folder of the benchmark layout: `<clip>/pha/`, optional `com/`, `fgr/`."""

    name: str
    uri: str
    pha: dict[int, str]
    fgr: dict[int, str] = field(default_factory=dict)
    com: dict[int, str] = field(default_factory=dict)

    def indices(self) -> list[int]:
        """Frame indices that have a true alpha."""
        return list(self.pha)

    def frames(self, on_problem: Callable[[int, str, str], None]) -> Iterator[TrueFrame]:
        """Decode the frames in order; an unreadable one is reported through `on_problem` and skipped."""
        for idx, uri in self.pha.items():
            try:
                pha = read_alpha(uri)
                fgr = read_rgb(self.fgr[idx]) if idx in self.fgr else None
                com = read_rgb(self.com[idx]) if idx in self.com else None
            except (OSError, ValueError) as exc:
                on_problem(idx, "unreadable", f"ground truth: {exc}")
                continue
            yield TrueFrame(idx, pha, fgr, com)


@dataclass
class ArrayClip:
    """An in-memory truth clip: alpha `[T,H,W]`, optional fgr/com `[T,H,W,3]` uint8 and flow `[T,H,W,2]`."""

    name: str
    pha: np.ndarray
    fgr: np.ndarray | None = None
    com: np.ndarray | None = None
    flow: np.ndarray | None = None

    def indices(self) -> list[int]:
        """0..T-1."""
        return list(range(len(self.pha)))

    def frames(self, on_problem: Callable[[int, str, str], None]) -> Iterator[TrueFrame]:
        """The frames in order."""
        for i in range(len(self.pha)):
            yield TrueFrame(i, np.asarray(self.pha[i], np.float32),
                            None if self.fgr is None else self.fgr[i],
                            None if self.com is None else self.com[i],
                            None if self.flow is None or i == 0 else self.flow[i])


def _clip_folders(root: str) -> dict[str, str]:
    """{clip name: folder} for every folder under `root` holding a `pha/` folder of frames.

    The clip name is the folder's path relative to `root`, with a trailing `com` dropped (so
    `matte DIR/<clip>/com -o OUT` outputs and `OUT/<clip>/com/pha` both pair with `<clip>`).
    """
    fs, base = storage.filesystem(root)
    if not fs.isdir(base):
        raise FileNotFoundError(f"{root}: no such folder")
    base = base.rstrip("/")
    out: dict[str, str] = {}
    for dirpath, dirnames, _files in fs.walk(base):
        if os.path.basename(dirpath.rstrip("/")) == "pha":
            parent = os.path.dirname(dirpath.rstrip("/"))
            rel = os.path.relpath(parent, base) if parent != base else os.path.basename(base)
            parts = [p for p in rel.replace("\\", "/").split("/") if p not in ("", ".")]
            if parts and parts[-1] == "com" and len(parts) > 1:
                parts = parts[:-1]
            name = "/".join(parts)
            out[name] = storage.join(root, os.path.relpath(parent, base)) if parent != base else root
        dirnames[:] = [d for d in dirnames if not d.startswith((".", "_"))]
    return dict(sorted(out.items()))


def scan_benchmark(root: str) -> list[BenchmarkClip]:
    """The clips of a benchmark folder `root/<clip>/{com,pha,fgr}/`, sorted by name."""
    clips = []
    for name, folder in _clip_folders(root).items():
        clips.append(BenchmarkClip(name, folder, _numbered(storage.join(folder, "pha")),
                                   _numbered(storage.join(folder, "fgr")),
                                   _numbered(storage.join(folder, "com"))))
    return clips


# -------------------------------------------------------------------------------------------- methods

class Method(Protocol):
    """Something that predicts alpha (and maybe foreground) for truth frames."""

    name: str

    def clip_names(self) -> set[str] | None: ...

    def begin_clip(self, clip: str, indices: list[int]) -> list[tuple[int | None, str, str]]: ...

    def predict(self, clip: str, frame: TrueFrame) -> tuple[np.ndarray, np.ndarray | None]: ...


@dataclass
class FolderMethod:
    """Predictions on storage in the Mattes (`<clip>/pha/000000.png`) or benchmark layout."""

    name: str
    uri: str
    _clips: dict[str, tuple[dict[int, str], dict[int, str]]] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        for clip, folder in _clip_folders(self.uri).items():
            self._clips[clip] = (_numbered(storage.join(folder, "pha")), _numbered(storage.join(folder, "fgr")))

    def clip_names(self) -> set[str]:
        """Clip names found in the prediction folder."""
        return set(self._clips)

    def begin_clip(self, clip: str, indices: list[int]) -> list[tuple[int | None, str, str]]:
        """Frames predicted that have no ground truth (reported as `extra frame`)."""
        pha, _ = self._clips.get(clip, ({}, {}))
        extra = sorted(set(pha) - set(indices))
        if not extra:
            return []
        return [(None, "extra frame", f"{len(extra)} predicted frame(s) without ground truth: {_ranges(extra)}")]

    def predict(self, clip: str, frame: TrueFrame) -> tuple[np.ndarray, np.ndarray | None]:
        """Read the predicted alpha (and foreground when present) of `frame`."""
        pha_files, fgr_files = self._clips.get(clip, ({}, {}))
        if frame.index not in pha_files:
            raise FrameProblem("missing frame", f"no predicted alpha for frame {frame.index} in {self.uri}/{clip}/pha")
        try:
            pha = read_alpha(pha_files[frame.index])
            fgr = read_rgb(fgr_files[frame.index]) if frame.index in fgr_files else None
        except (OSError, ValueError) as exc:
            raise FrameProblem("unreadable", str(exc)) from exc
        return pha, fgr


@dataclass
class StreamMethod:
    """Predictions computed on the composites as they stream by (a model or a baseline).

    `start(clip)` returns a callable mapping the composite (uint8 `[H,W,3]`) to (alpha float32
    `[H,W]`, fgr uint8 `[H,W,3]` or None); it is called on consecutive frames of one clip.
    """

    name: str
    start: Callable[[str], Callable[[np.ndarray], tuple[np.ndarray, np.ndarray | None]]]
    source: str = ""
    _current: tuple[str, Callable] | None = field(default=None, repr=False)

    def clip_names(self) -> None:
        """Any clip."""
        return None

    def begin_clip(self, clip: str, indices: list[int]) -> list[tuple[int | None, str, str]]:
        """Start a fresh stream for `clip`."""
        self._current = (clip, self.start(clip))
        return []

    def predict(self, clip: str, frame: TrueFrame) -> tuple[np.ndarray, np.ndarray | None]:
        """Run the stream on the frame's composite."""
        if frame.com is None:
            raise FrameProblem("no input", f"frame {frame.index} has no composite to run {self.name} on")
        assert self._current is not None and self._current[0] == clip
        pha, fgr = self._current[1](frame.com)
        return np.asarray(pha, np.float32), fgr


def _ranges(values: list[int]) -> str:
    """'0-3, 7, 9-10' for sorted integers."""
    parts, start, prev = [], None, None
    for v in values:
        if start is None:
            start = prev = v
        elif v == prev + 1:
            prev = v
        else:
            parts.append(f"{start}-{prev}" if prev != start else str(start))
            start = prev = v
    if start is not None:
        parts.append(f"{start}-{prev}" if prev != start else str(start))
    return ", ".join(parts)


# -------------------------------------------------------------------------------------------- results

@dataclass
class WorstFrame:
    """Thumbnails of a badly predicted frame: composite, predicted, true, error (uint8 `[h,w,3]`)."""

    method: str
    clip: str
    frame: int
    value: float
    metric: str
    images: dict[str, np.ndarray]


@dataclass
class ClipResult:
    """Per-frame metric values (with `frame` index) and the clip's means."""

    name: str
    frames: list[dict] = field(default_factory=list)
    mean: dict[str, float] = field(default_factory=dict)
    expected_frames: int = 0


@dataclass
class MethodResult:
    """A method's clips, overall means and worst frames."""

    name: str
    source: str
    clips: dict[str, ClipResult] = field(default_factory=dict)
    overall: dict[str, float] = field(default_factory=dict)
    worst: list[WorstFrame] = field(default_factory=list)
    evaluated_frames: int = 0


@dataclass
class EvaluationResult:
    """Everything `evaluate` found; `to_dict()` is the JSON report."""

    truth: str
    metrics: tuple[str, ...]
    methods: list[MethodResult]
    problems: list[Problem]
    clips: list[str]
    ranks: dict[str, dict[str, int]] = field(default_factory=dict)

    def to_dict(self) -> dict:
        """A JSON-safe report: config, overall/per-clip/per-frame values, ranks and problems."""
        return {
            "schema": 1,
            "truth": self.truth,
            "metrics": list(self.metrics),
            "notes": {m: M.METRIC_NOTES[m] for m in self.metrics},
            "clips": self.clips,
            "ranks": self.ranks,
            "methods": [{
                "name": m.name, "source": m.source, "evaluated_frames": m.evaluated_frames,
                "overall": m.overall,
                "clips": {c.name: {"mean": c.mean, "expected_frames": c.expected_frames,
                                   "evaluated_frames": len(c.frames), "frames": c.frames}
                          for c in m.clips.values()},
                "worst_frames": [{"clip": w.clip, "frame": w.frame, "metric": w.metric, "value": w.value}
                                 for w in m.worst],
            } for m in self.methods],
            "problems": [p.__dict__ for p in self.problems],
        }


def rank(values: dict[str, float]) -> dict[str, int]:
    """Competition ranks (1 = lowest value = best; ties share a rank) of {name: value}."""
    ordered = sorted(values.items(), key=lambda kv: kv[1])
    ranks, prev, current = {}, None, 0
    for i, (name, v) in enumerate(ordered, start=1):
        if prev is None or v != prev:
            current, prev = i, v
        ranks[name] = current
    return ranks


def _heat(err: np.ndarray) -> np.ndarray:
    """|error| `[H,W]` in [0,1] as an RGB heat map."""
    u8 = np.clip(err * 255.0 * 2.0, 0, 255).astype(np.uint8)  # x2: small errors stay visible
    return cv2.cvtColor(cv2.applyColorMap(u8, cv2.COLORMAP_INFERNO), cv2.COLOR_BGR2RGB)


def _thumbs(frame: TrueFrame, pred: np.ndarray, width: int) -> dict[str, np.ndarray]:
    h, w = frame.pha.shape
    size = (width, max(1, round(h * width / w)))

    def small(img: np.ndarray) -> np.ndarray:
        return cv2.resize(img, size, interpolation=cv2.INTER_AREA)

    grey = lambda a: cv2.cvtColor(np.clip(np.rint(a * 255), 0, 255).astype(np.uint8), cv2.COLOR_GRAY2RGB)
    com = frame.com if frame.com is not None else np.full((h, w, 3), 128, np.uint8)
    return {"composite": small(com), "predicted": small(grey(pred)), "true": small(grey(frame.pha)),
            "error": small(_heat(np.abs(pred.astype(np.float32) - frame.pha)))}


class _Worst:
    """The k frames with the highest value of one metric, with thumbnails."""

    def __init__(self, k: int, metric: str):
        self.k, self.metric, self.heap, self.count = k, metric, [], 0

    def offer(self, value: float, make: Callable[[], WorstFrame]) -> None:
        self.count += 1
        if self.k <= 0:
            return
        if len(self.heap) < self.k:
            heapq.heappush(self.heap, (value, self.count, make()))
        elif value > self.heap[0][0]:
            heapq.heapreplace(self.heap, (value, self.count, make()))

    def result(self) -> list[WorstFrame]:
        return [w for _, _, w in sorted(self.heap, key=lambda e: -e[0])]


# ----------------------------------------------------------------------------------------- evaluate

def evaluate(truth: Iterable[TruthClip], methods: list[Method], metrics: tuple[str, ...] = M.ALL_METRICS,
             truth_name: str = "", worst_frames: int = 6, worst_metric: str = "mad", thumb_width: int = 192,
             on_problem: Callable[[Problem], None] | None = None,
             on_frame: Callable[[str, int], None] | None = None) -> EvaluationResult:
    """Evaluate every method on every truth clip, reading each truth frame once.

    Missing/extra clips, missing/extra frames, wrong sizes and unreadable files become `Problem`s
    (also passed to `on_problem` as they are found); the other frames are still evaluated.
    """
    if not methods:
        raise ValueError("no method to evaluate")
    names = [m.name for m in methods]
    if len(set(names)) != len(names):
        raise ValueError(f"method names must be unique: {names}")
    problems: list[Problem] = []

    def report(p: Problem) -> None:
        problems.append(p)
        if on_problem:
            on_problem(p)

    truth = list(truth)
    clip_names = [c.name for c in truth]
    results = {m.name: MethodResult(m.name, getattr(m, "uri", "") or getattr(m, "source", "")) for m in methods}
    worst = {m.name: _Worst(worst_frames, worst_metric if worst_metric in metrics else metrics[0]) for m in methods}
    for m in methods:
        known = m.clip_names()
        if known is None:
            continue
        for clip in sorted(set(clip_names) - known):
            report(Problem(m.name, clip, None, "missing clip", f"no prediction folder for clip {clip!r} in {getattr(m, 'uri', m.name)}"))
        for clip in sorted(known - set(clip_names)):
            report(Problem(m.name, clip, None, "extra clip", f"predicted clip {clip!r} has no ground truth in {truth_name}"))

    want_flow = "messddt" in metrics
    for clip in truth:
        indices = clip.indices()
        if not indices:
            report(Problem("truth", clip.name, None, "no truth", "clip has no ground-truth alpha frames"))
            continue
        active = [m for m in methods if m.clip_names() is None or clip.name in m.clip_names()]
        seqs, last_index = {}, {}
        for m in active:
            for frame_no, kind, message in m.begin_clip(clip.name, indices):
                report(Problem(m.name, clip.name, frame_no, kind, message))
            seqs[m.name] = M.SequenceMetrics(metrics=tuple(metrics))
            results[m.name].clips[clip.name] = ClipResult(clip.name, expected_frames=len(indices))
            last_index[m.name] = None
        prev_truth: TrueFrame | None = None

        def truth_problem(idx: int, kind: str, message: str) -> None:
            report(Problem("truth", clip.name, idx, kind, message))

        for frame in clip.frames(truth_problem):
            if on_frame:
                on_frame(clip.name, frame.index)
            flow = frame.flow
            # Temporal terms pair a frame only with the one numbered just before it: not one further
            # back (an unreadable truth frame) nor the last before a gap in the numbering (0,1,2,4).
            truth_continues = (prev_truth is not None and prev_truth.index == frame.index - 1
                               and prev_truth.pha.shape == frame.pha.shape)
            if want_flow and flow is None and truth_continues:
                flow = M.alpha_flow(frame.pha, prev_truth.pha)
            for m in active:
                try:
                    pha, fgr = m.predict(clip.name, frame)
                except FrameProblem as exc:
                    report(Problem(m.name, clip.name, frame.index, exc.kind, exc.message))
                    continue
                if pha.shape != frame.pha.shape:
                    report(Problem(m.name, clip.name, frame.index, "wrong size",
                                   f"predicted alpha is {pha.shape[1]}x{pha.shape[0]}, "
                                   f"ground truth {frame.pha.shape[1]}x{frame.pha.shape[0]}"))
                    continue
                if fgr is not None and fgr.shape[:2] != frame.pha.shape:
                    report(Problem(m.name, clip.name, frame.index, "wrong size",
                                   f"predicted foreground is {fgr.shape[1]}x{fgr.shape[0]}; foreground metrics skipped"))
                    fgr = None
                continues = truth_continues and last_index[m.name] == (prev_truth.index if prev_truth else None)
                values = seqs[m.name].update(pha, frame.pha, fgr, frame.fgr, flow if continues else None,
                                             continues=continues)
                last_index[m.name] = frame.index
                results[m.name].clips[clip.name].frames.append({"frame": frame.index, **values})
                results[m.name].evaluated_frames += 1
                key = worst[m.name].metric
                if key in values:
                    worst[m.name].offer(values[key], lambda m=m, f=frame, p=pha, v=values[key]: WorstFrame(
                        m.name, clip.name, f.index, v, key, _thumbs(f, p, thumb_width)))
            prev_truth = frame
        for m in active:
            results[m.name].clips[clip.name].mean = seqs[m.name].summary()

    for res in results.values():
        for name in metrics:
            per_clip = [c.mean[name] for c in res.clips.values() if name in c.mean]
            if per_clip:
                res.overall[name] = float(np.mean(per_clip))
        res.worst = worst[res.name].result()
    ranks = {name: rank({r.name: r.overall[name] for r in results.values() if name in r.overall})
             for name in metrics}
    return EvaluationResult(truth_name, tuple(metrics), list(results.values()), problems, clip_names,
                            {k: v for k, v in ranks.items() if v})
