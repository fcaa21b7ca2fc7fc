"""The per-video loop `matting matte` and `matting infer` share: decode -> Matter -> outputs -> result.json.

Frames are decoded one to three ahead in a thread, matted by `Matter.run` (on CUDA several per
network call, the prior computed ahead in a thread of its own: see `Matter`), and keep their
source numbers (a frame folder's file numbers, a video's decoded indices) in the outputs'
names; gaps in the numbering are listed in `result.json`. A corrupt frame is reported by its
source number and skipped; a frame of another size than the stream's first is resized to it and
reported (it is delivered). The outputs are published with `result.json` only when every frame
that could be read is written, and nothing is published when no frame could be.
"""
from __future__ import annotations

import collections
import contextlib
import datetime
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Iterator

import cv2
import numpy as np

from matting_core.inference.matter import Matter
from matting_core.inference.segments import Segment
from matting_core.inference.outputs import MatteOutputs
from matting_core.redaction import redact, redact_config
from matting_core.video import COUNT_TOLERANCE, VideoInfo, iter_frames, prefetch

__all__ = ["VideoResult", "matte_video", "fit_frame"]

log = logging.getLogger(__name__)


@dataclass
class VideoResult:
    """What became of one video: status `ok|partial|failed`, frames written, lost frames with reasons, timings.

    `resized_frames` lists the frames delivered at the stream's size from another one
    (`{"index", "width", "height"}` with their original size).
    """

    status: str
    frames: int = 0
    lost_frames: list[int] = field(default_factory=list)
    errors: list[dict[str, Any]] = field(default_factory=list)
    resized_frames: list[dict[str, int]] = field(default_factory=list)
    timings: dict[str, Any] = field(default_factory=dict)
    where: str | None = None  # the published folder's URI (None when nothing was published)
    reason: str | None = None  # why a failed video failed


def matte_video(video: str, info: VideoInfo, matter: Matter, outputs: MatteOutputs, *,
                record: dict[str, Any] | None = None, progress: bool = False,
                segment: Segment | None = None) -> VideoResult:
    """Matte every frame of `video` into `outputs` and publish them with result.json (plus `record`), or publish nothing.

    `record` adds the caller's fields to result.json (model reference, job config, ...). A
    failure while decoding, matting or encoding aborts the outputs and comes back as a `failed`
    result with its reason; it is not raised. With `segment`, only its frames are written, after
    a warm-up over the frames from `segment.warmup_start` (matted, not written).
    """
    try:
        result = _matte_frames(video, info, matter, outputs, progress, segment)
    except Exception as exc:  # decoding, matting or encoding: report it, publish nothing
        outputs.abort()
        return VideoResult("failed", reason=f"failed: {exc}")
    if result.frames == 0:
        outputs.abort()
        result.status, result.reason = "failed", "no frame could be read"
        return result
    if segment is None or segment.index == segment.count - 1:
        _note_truncation(info, result)
    result.status = "partial" if result.lost_frames else "ok"
    numbers = info.frame_numbers
    document = {
        "status": result.status, "video": redact(video), "stem": outputs.stem,
        "frames": result.frames, "source_frames": info.frames,
        "first_frame": numbers[0], "last_frame": numbers[-1],
        # Source numbers absent from a frame folder (inclusive ranges): not lost, never there.
        "gaps": [list(g) for g in info.gaps],
        "lost_frames": result.lost_frames, "errors": result.errors,
        "resized_frames": result.resized_frames,
        "fps": float(outputs.fps), "width": info.width, "height": info.height,
        "formats": list(outputs.formats),
        "prior": matter.prior_stream.spec, "matter": matter.spec, "timings": result.timings,
        **redact_config(record or {}),
        "finished": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    try:
        result.where = outputs.commit(document)
    except Exception as exc:  # commit aborts the outputs itself
        return VideoResult("failed", result.frames, result.lost_frames, result.errors, result.resized_frames,
                           result.timings, reason=f"cannot publish {outputs.final_uri}: {exc}")
    return result


def _matte_frames(video: str, info: VideoInfo, matter: Matter, outputs: MatteOutputs,
                  progress: bool, segment: Segment | None = None) -> VideoResult:
    """Decode, matte and write every frame (of `segment`), then finish the outputs (not committed)."""
    from tqdm import tqdm

    errors: list[dict[str, Any]] = []
    resized: list[dict[str, int]] = []

    def on_error(index: int, message: str) -> None:
        errors.append({"index": index, "message": message})
        log.warning("%s: frame %d skipped: %s", video, index, message)

    numbers = info.frame_numbers
    if segment is None:
        frames = prefetch(iter_frames(video, on_error=on_error, numbered=True))
        first_written, total = numbers[0], info.frames
    else:
        frames = prefetch(iter_frames(video, segment.warmup_start, segment.stop, on_error=on_error,
                                      info=info, numbered=True))
        first_written, total = numbers[segment.start], segment.stop - segment.start
    bar = tqdm(total=total, unit="frame", desc=outputs.stem, disable=not progress, dynamic_ncols=True)
    decode_s = encode_s = 0.0
    written = 0
    numbers_in_flight: collections.deque[int] = collections.deque()  # source numbers of the frames Matter holds

    def source() -> Iterator[np.ndarray]:
        # Read by Matter.run: in its prior thread when it computes priors ahead, so "decode" is
        # then the time that thread waited for decoded frames.
        nonlocal decode_s
        while True:
            t0 = time.perf_counter()
            item = next(frames, None)
            decode_s += time.perf_counter() - t0
            if item is None:
                return
            index, frame = item  # the source number: the outputs' file names keep it
            if frame.shape[:2] != (info.height, info.width):
                if index >= first_written:
                    resized.append({"index": index, "width": frame.shape[1], "height": frame.shape[0]})
                log.warning("%s: frame %d is %dx%d, resized to the stream's %dx%d", video, index,
                            frame.shape[1], frame.shape[0], info.width, info.height)
                frame = fit_frame(frame, (info.width, info.height))
            numbers_in_flight.append(index)
            yield frame

    start = time.perf_counter()
    try:
        # closing: a failure here stops Matter's prior thread before the next video starts one
        with contextlib.closing(matter.run(source())) as results:
            for res in results:  # one per frame read, in order
                index = numbers_in_flight.popleft()
                if index < first_written:  # warm-up before a segment: settles the state, written by the one before
                    continue
                t0 = time.perf_counter()
                outputs.write(index, res.pha, res.fgr)
                encode_s += time.perf_counter() - t0
                written += 1
                bar.update(1)
        t0 = time.perf_counter()
        outputs.finish()
        encode_s += time.perf_counter() - t0
    finally:
        bar.close()
    wall = time.perf_counter() - start
    errors = [e for e in errors if e["index"] >= first_written]  # the warm-up's belong to the segment before
    return VideoResult("", written, sorted(e["index"] for e in errors), errors, resized,
                       _timings(matter, written, decode_s, encode_s, wall, outputs.background))


def _note_truncation(info: VideoInfo, result: VideoResult) -> None:
    """A video that decodes fewer frames than its container declares lost the rest: say so (partial)."""
    if info.kind == "video" and info.declared_frames > info.frames + COUNT_TOLERANCE:
        missing = list(range(info.frames, info.declared_frames))
        result.errors.append({"index": info.frames, "message": f"truncated: declares {info.declared_frames} frames "
                                                               f"but only {info.frames} decode"})
        result.lost_frames = sorted(set(result.lost_frames) | set(missing))


def fit_frame(frame: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """`frame` uint8 `[h,w,3]` resized to `size` (W,H): area averaging to shrink, bilinear to enlarge."""
    shrink = frame.shape[1] * frame.shape[0] > size[0] * size[1]
    return cv2.resize(frame, size, interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)


def _timings(matter: Matter, written: int, decode_s: float, encode_s: float, wall: float,
             writer_thread: bool) -> dict[str, Any]:
    """Matter's per-stage timings plus decoding, encoding and wall time, totals and per frame."""
    timings = matter.timer.summary()
    n = max(written, 1)
    timings["total_s"].update({"decode": round(decode_s, 4), "encode": round(encode_s, 4),
                               "wall": round(wall, 4)})
    timings["ms_per_frame"].update({"decode": round(1e3 * decode_s / n, 3),
                                    "encode": round(1e3 * encode_s / n, 3),
                                    "wall": round(1e3 * wall / n, 3)})
    timings["fps"] = round(written / wall, 3) if wall > 0 else 0.0
    # With the writer thread, "encode" is the time matting waited for the encoders, not their cost.
    timings["writer_thread"] = bool(writer_thread)
    return timings
