"""The clip plan: which photo, background segment and seed each clip index uses.

Drawn from the job seed and the clip index alone, over the valid sources sorted by URI, so a
clip's content never depends on how many workers ran or in which order clips were made.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["ClipPlan", "plan_clip"]


@dataclass(frozen=True)
class ClipPlan:
    """Clip `index` uses photo `photo`, background `background` from frame `start`."""

    index: int
    photo: int
    background: int
    start: int


def plan_clip(seed: int, index: int, n_photos: int, background_frames: list[int], frames: int) -> ClipPlan:
    """The plan of clip `index` (its own random stream, separate from the synthesis stream)."""
    if n_photos <= 0 or not background_frames:
        raise ValueError("planning needs at least one photo and one background")
    rng = np.random.default_rng([int(seed), int(index), 0x9E37])
    photo = int(rng.integers(n_photos))
    background = int(rng.integers(len(background_frames)))
    length = background_frames[background]
    # Short backgrounds are played ping-pong from frame 0; long ones from a random segment.
    start = int(rng.integers(0, length - frames + 1)) if length >= frames else 0
    return ClipPlan(int(index), photo, background, start)
