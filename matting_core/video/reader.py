"""Reading videos with PyAV, and folders of numbered frames as if they were videos.

Frames are numpy uint8 `[H,W,3]` RGB. A video is probed by decoding it fully, because the only
reliable frame count is the decoded one (a truncated AVI declares 795 frames and decodes 194).
Every frame has a source number: the integer in its file name for a frame folder (so a folder
holding 0,1,2,4,5 keeps its gap), its decoded index for a video. A stream's size is its first
frame's; later frames may differ (a spliced recording), which the caller decides how to handle.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Callable, Iterator

import av
import cv2
import numpy as np

from matting_core import storage
from matting_core.threads import iterate_ahead
from matting_core.errors import InputError

__all__ = ["VideoError", "VideoInfo", "probe", "iter_frames", "video_stem", "is_frame_folder",
           "frame_files", "numbered_frame_files", "numbering_gaps", "frame_number", "COUNT_TOLERANCE",
           "decode_image", "prefetch", "VIDEO_EXTENSIONS", "IMAGE_EXTENSIONS"]

VIDEO_EXTENSIONS = (".mp4", ".avi", ".mov", ".webm", ".mkv", ".m4v")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
_NUMBERED = re.compile(r"^(?:.*?[^0-9])?(\d+)$")
# A decoder may legitimately emit a frame or two fewer than the container declares.
COUNT_TOLERANCE = 2

ErrorCallback = Callable[[int, str], None]


class VideoError(InputError):
    """A video (or frame folder) that cannot be read, naming the file and the reason."""


class ImageDecodeError(InputError, ValueError):
    """Bytes that are not a decodable image (a ValueError too, for callers that catch those)."""


@dataclass(frozen=True)
class VideoInfo:
    """What probing a video found.

    `width`/`height` are the first decoded frame's; `frames` is the decoded count; `pts` one per
    decoded frame; `numbers` the source number of each frame (empty: 0..frames-1).
    """

    uri: str
    width: int
    height: int
    fps: float
    declared_frames: int
    frames: int
    kind: str  # "video" or "frames"
    pts: tuple[int, ...] = field(default=(), repr=False)
    numbers: tuple[int, ...] = field(default=(), repr=False)

    def __post_init__(self) -> None:
        # Infos travel as JSON between processes (lists come back); keep them hashable tuples.
        object.__setattr__(self, "pts", tuple(self.pts))
        object.__setattr__(self, "numbers", tuple(self.numbers))

    @property
    def frame_numbers(self) -> tuple[int, ...]:
        """The source number of every frame, in order."""
        return self.numbers or tuple(range(self.frames))

    @property
    def gaps(self) -> tuple[tuple[int, int], ...]:
        """Inclusive ranges of source numbers missing between the first and the last frame."""
        return numbering_gaps(self.frame_numbers)


def numbering_gaps(numbers) -> tuple[tuple[int, int], ...]:
    """Inclusive (first, last) ranges missing from sorted integers: (0,1,2,4,5) -> ((3,3),)."""
    return tuple((a + 1, b - 1) for a, b in zip(numbers, numbers[1:]) if b > a + 1)


def decode_image(data: bytes, uri: str = "<bytes>", flags: int = cv2.IMREAD_UNCHANGED) -> np.ndarray:
    """Decode image bytes with OpenCV; raises ImageDecodeError naming `uri` when they are not an image."""
    arr = cv2.imdecode(np.frombuffer(data, np.uint8), flags)
    if arr is None or arr.size == 0:
        raise ImageDecodeError(uri, f"not a decodable image ({len(data)} bytes)")
    return arr


def _to_rgb(img: np.ndarray) -> np.ndarray:
    if img.ndim == 2:
        img = cv2.cvtColor(img, cv2.COLOR_GRAY2RGB)
    elif img.shape[2] == 4:
        img = cv2.cvtColor(img, cv2.COLOR_BGRA2RGB)
    else:
        img = cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
    if img.dtype == np.uint16:
        img = (img // 257).astype(np.uint8)
    return np.ascontiguousarray(img)


def frame_files(uri: str) -> list[str]:
    """Numbered image files of a frame folder, in frame order (empty if `uri` is not one)."""
    return [u for _, u in numbered_frame_files(uri)]


def numbered_frame_files(uri: str) -> list[tuple[int, str]]:
    """(source number, uri) of the numbered image files of a frame folder, by number (empty if not one)."""
    fs, path = storage.filesystem(uri)
    try:
        if not fs.isdir(path):
            return []
        names = fs.ls(path, detail=False)
    except (FileNotFoundError, NotADirectoryError):
        return []
    numbered = []
    for name in names:
        base = os.path.basename(name.rstrip("/"))
        number = frame_number(base)
        if number is not None:
            numbered.append((number, storage.join(uri, base)))
    numbered.sort()
    return numbered


def frame_number(name: str) -> int | None:
    """The frame number of a PNG/JPEG file name (`0007.png`, `frame12.jpg`), or None when it is not a numbered frame."""
    stem, ext = os.path.splitext(name)
    m = _NUMBERED.match(stem)
    return int(m.group(1)) if m and ext.lower() in IMAGE_EXTENSIONS else None


def is_frame_folder(uri: str) -> bool:
    """True when `uri` is a folder holding numbered PNG/JPEG frames."""
    return bool(frame_files(uri))


def video_stem(uri: str) -> str:
    """Output name of a video: file stem, folder name, or the clip name for a benchmark `com` folder.

    A local path is made absolute first, so `.`, `..` and `clip/` name the folder they mean.
    """
    local = storage.local_path(uri)
    p = os.path.abspath(local) if local is not None else uri.rstrip("/")
    base = os.path.basename(p)
    if base == "com":
        return os.path.basename(os.path.dirname(p))
    stem, ext = os.path.splitext(base)
    return stem if ext.lower() in VIDEO_EXTENSIONS else base


def _open(uri: str):
    """An open PyAV container for a local or remote video; VideoError when it cannot be opened."""
    local = storage.local_path(uri)
    if local is not None and not os.path.isfile(local):
        raise VideoError(uri, "no such file")
    try:
        if local is not None:
            return av.open(local, "r")
        fs, path = storage.filesystem(uri)
        return av.open(fs.open(path, "rb"), "r")
    except (av.error.FFmpegError, OSError, ValueError) as exc:
        raise VideoError(uri, f"cannot open as a video: {getattr(exc, 'strerror', None) or exc}") from exc


def probe(uri: str, strict: bool = True) -> VideoInfo:
    """Open and fully decode a video (or a frame folder's first frame) to learn its true shape.

    `strict` (for training sources) rejects a video with any undecodable packet or fewer frames
    than it declares; otherwise (for matting) those are left to `iter_frames(on_error=...)` to
    report frame by frame, and only a video with no decodable frame at all is an error.
    """
    numbered = numbered_frame_files(uri)
    if numbered:
        _check_unique_numbers(uri, numbered)
        first = _to_rgb(decode_image(storage.read_bytes(numbered[0][1]), numbered[0][1]))
        h, w = first.shape[:2]
        n = len(numbered)
        return VideoInfo(uri, w, h, 25.0, n, n, "frames", tuple(range(n)), tuple(k for k, _ in numbered))
    with _open(uri) as container:
        if not container.streams.video:
            raise VideoError(uri, "has no video stream")
        stream = container.streams.video[0]
        declared = int(stream.frames or 0)
        fps = float(stream.average_rate or stream.guessed_rate or 25.0)
        pts: list[int] = []
        width = height = 0
        for packet in container.demux(stream):
            try:
                frames = packet.decode()
            except av.error.FFmpegError as exc:
                if strict:
                    raise VideoError(uri, f"undecodable data after frame {len(pts)}: {exc}") from exc
                continue
            for frame in frames:
                if not pts:  # the first frame's size: taking a later one cost every frame before a size change
                    width, height = frame.width, frame.height
                pts.append(frame.pts if frame.pts is not None else len(pts))
    if not pts:
        raise VideoError(uri, "decodes no frames")
    if strict and declared and len(pts) + COUNT_TOLERANCE < declared:
        raise VideoError(uri, f"truncated: declares {declared} frames but only {len(pts)} decode")
    return VideoInfo(uri, width, height, fps, declared, len(pts), "video", tuple(pts), tuple(range(len(pts))))


def _check_unique_numbers(uri: str, numbered: list[tuple[int, str]]) -> None:
    """VideoError when two files of a frame folder carry one number (`1.png`, `0001.jpg`)."""
    for (a, first), (b, second) in zip(numbered, numbered[1:]):
        if a == b:
            raise VideoError(uri, f"frames {os.path.basename(first)} and {os.path.basename(second)} "
                                  f"share the number {a}")


def iter_frames(uri: str, start: int = 0, stop: int | None = None,
                on_error: ErrorCallback | None = None, info: VideoInfo | None = None,
                numbered: bool = False) -> Iterator:
    """Frames at positions `start..stop-1` of a video or frame folder as uint8 `[H,W,3]` RGB.

    With `numbered`, yields (source number, frame) pairs instead. A corrupt frame is reported
    through `on_error(source number, message)` and skipped (without a callback it raises
    VideoError). With `info` from `probe`, a video seeks to `start` instead of decoding from the
    beginning.
    """
    files = numbered_frame_files(uri)
    frames = _iter_folder(files, start, stop, on_error) if files else _iter_video(uri, start, stop, on_error, info)
    if numbered:
        yield from frames
    else:
        for _, frame in frames:
            yield frame


def _iter_folder(files, start, stop, on_error):
    for number, path in files[start:stop]:
        try:
            yield number, _to_rgb(decode_image(storage.read_bytes(path), path))
        except (ValueError, OSError) as exc:
            if on_error is None:
                raise VideoError(path, str(exc)) from exc
            on_error(number, str(exc))


def _iter_video(uri, start, stop, on_error, info):
    with _open(uri) as container:
        if not container.streams.video:
            raise VideoError(uri, "has no video stream")
        stream = container.streams.video[0]
        # No frame threads: the caller's own work (a network, or another worker) owns the cores,
        # and frame-threaded decoding measured 2-3x slower per frame than plain decoding here.
        index_of = None
        if info is not None and start > 0 and len(set(info.pts)) == len(info.pts):
            index_of = {p: i for i, p in enumerate(info.pts)}
            container.seek(info.pts[start], stream=stream, backward=True, any_frame=False)
        index = 0
        for packet in container.demux(stream):
            try:
                frames = packet.decode()
            except av.error.FFmpegError as exc:
                if on_error is None:
                    raise VideoError(uri, f"frame {index}: {exc}") from exc
                on_error(index, f"{uri}: frame {index}: {exc}")
                index += 1
                continue
            for frame in frames:
                if index_of is not None:
                    index = index_of.get(frame.pts, index)
                if index >= start and (stop is None or index < stop):
                    yield index, frame.to_ndarray(format="rgb24")
                index += 1
                if stop is not None and index >= stop:
                    return


def prefetch(frames: Iterator, skipped: list[int] | None = None,
             depth: int = 3) -> Iterator[tuple[int, np.ndarray]]:
    """Decode in a background thread, `depth` frames ahead, yielding (source number, frame).

    `frames` yields (source number, frame) pairs (`iter_frames(..., numbered=True)`), passed on
    as they are; or, with `skipped`, bare frames numbered by position plus the count of
    undecodable frames skipped so far (`skipped[0]`, exact in the decoding thread). PyAV
    decodes without the GIL, so decoding the next frame overlaps the network's serial parts
    instead of adding to every frame's time.
    """
    if skipped is not None:
        # Numbered in the decoding thread, where skipped[0] is exact for the frame just decoded.
        frames = ((position + skipped[0], frame) for position, frame in enumerate(frames))
    # Low priority: decoding ahead can wait; the network's threads cannot.
    return iterate_ahead(frames, depth, "matte-decoder", low_priority=True)
