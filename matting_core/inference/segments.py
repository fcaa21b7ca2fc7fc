"""Splitting a long video into segments that are matted in parallel and joined without seams.

A segment writes frames `start..stop-1` and first runs the network (and the prior's smoother)
over `warmup` frames before `start`, so its recurrent state is settled at the seam. Boundaries
depend only on the video's length and the segment length, never on how many workers run, so a
resumed job finds the same segments.
"""
from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Segment", "plan_segments"]


@dataclass(frozen=True)
class Segment:
    """Frames `start..stop-1` of a video, decoded from `warmup_start` (<= start) for the warm-up."""

    index: int
    count: int  # segments of the video
    start: int
    stop: int
    warmup_start: int

    @property
    def name(self) -> str:
        """Folder name of the segment's partial outputs (`seg-0003-of-0010`)."""
        return f"seg-{self.index:04d}-of-{self.count:04d}"


def plan_segments(frames: int, segment_frames: int, warmup_frames: int) -> list[Segment]:
    """The segments of a video of `frames` frames; one segment when it is not longer than `segment_frames`.

    A last piece shorter than half a segment joins the one before it, so no segment is a
    handful of frames that costs a warm-up for almost nothing.
    """
    if frames <= 0:
        return []
    if segment_frames <= 0 or frames <= segment_frames:
        return [Segment(0, 1, 0, frames, 0)]
    bounds = list(range(0, frames, segment_frames)) + [frames]
    if len(bounds) > 2 and bounds[-1] - bounds[-2] < segment_frames // 2:
        del bounds[-2]
    count = len(bounds) - 1
    return [Segment(k, count, a, b, max(0, a - max(0, warmup_frames)))
            for k, (a, b) in enumerate(zip(bounds, bounds[1:]))]
