"""Finding, pairing, validating and decoding training sources: photos with alpha, background videos.

Photos come as `image/` + `alpha/` folders paired by file stem, as RGBA images, or as a CSV/Parquet
manifest with `image` and `alpha` columns. Backgrounds are video files or folders of numbered
frames. Every rejected input becomes a `Rejection(uri, reason)`; nothing here stops on bad input.

Photos are bounded before they are decoded: the pixel count is read from the file's header and a
photo (or alpha) above `max_pixels` is rejected, so a small file that decodes to gigabytes never
reaches the decoder, in validation or in a worker loading it later.
"""
from __future__ import annotations

import io
import os
import posixpath
import warnings
from collections import OrderedDict
from dataclasses import dataclass

import cv2
import numpy as np
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from matting_core import storage
from matting_core.errors import InputError
from matting_core.video import (IMAGE_EXTENSIONS, VIDEO_EXTENSIONS, VideoError, VideoInfo,
                                decode_image, frame_files, iter_frames, probe)

__all__ = ["SourceError", "Rejection", "PhotoSource", "PhotoInfo", "Photo", "BackgroundSource",
           "discover_photos", "discover_backgrounds", "validate_photo", "validate_background", "validate_all",
           "load_photo", "PhotoCache", "BackgroundReader", "pingpong_indices", "image_size",
           "DEFAULT_MAX_PIXELS", "DEFAULT_MIN_SUBJECT"]

IMAGE_DIRS = ("image", "images", "img", "fg")
ALPHA_DIRS = ("alpha", "alphas", "matte", "mattes", "pha")
IGNORED_DIRS = ("trimap", "trimap1", "trimap2", "trimaps")
PHOTO_EXTENSIONS = IMAGE_EXTENSIONS + (".webp", ".tif", ".tiff", ".bmp")
# Real photos are at most a few tens of megapixels; 50 MP decodes to 150 MB RGB (+200 MB float alpha).
DEFAULT_MAX_PIXELS = 50_000_000
# Below this the subject is no person a model could learn from (and 1 px breaks foreground estimation).
DEFAULT_MIN_SUBJECT = 16


class SourceError(InputError):
    """A photo or background that cannot be used, naming the file and the reason."""


@dataclass(frozen=True)
class Rejection:
    """One rejected input, as written to errors.jsonl."""

    uri: str
    reason: str

    def to_dict(self) -> dict:
        return {"uri": self.uri, "reason": self.reason}


@dataclass(frozen=True)
class PhotoSource:
    """A photo and where its alpha comes from (`alpha=None`: the image's own alpha channel)."""

    image: str
    alpha: str | None

    @property
    def uri(self) -> str:
        return self.image


@dataclass(frozen=True)
class PhotoInfo:
    """A validated photo: its source, size and the alpha's bounding box (x0, y0, x1, y1)."""

    image: str
    alpha: str | None
    width: int
    height: int
    bbox: tuple[int, int, int, int]


@dataclass
class Photo:
    """A decoded photo cropped around its subject. image/fgr uint8 [H,W,3] RGB; alpha float32 [H,W].

    `touches_bottom` says the subject is cut by the photo's lower edge (a portrait), so it should
    stand on the frame's lower edge rather than float.
    """

    uri: str
    image: np.ndarray
    alpha: np.ndarray
    fgr: np.ndarray
    touches_bottom: bool


@dataclass(frozen=True)
class BackgroundSource:
    """A background video file or frame folder."""

    uri: str


def _stem(uri: str) -> str:
    return os.path.splitext(posixpath.basename(uri))[0]


def _parent_name(uri: str) -> str:
    return posixpath.basename(posixpath.dirname(uri.replace("\\", "/")))


def _manifest_pairs(uri: str) -> list[PhotoSource]:
    data = storage.read_bytes(uri)
    table = pq.read_table(io.BytesIO(data)) if uri.endswith(".parquet") else pacsv.read_csv(io.BytesIO(data))
    missing = {"image", "alpha"} - set(table.column_names)
    if missing:
        raise SourceError(uri, f"manifest lacks column(s) {sorted(missing)}")
    base = uri.rsplit("/", 1)[0] if "/" in uri else "."

    def resolve(u: str | None) -> str | None:
        if not u:
            return None
        return u if ("://" in u or os.path.isabs(u)) else storage.join(base, u)

    rows = table.select(["image", "alpha"]).to_pylist()
    return [PhotoSource(resolve(r["image"]), resolve(r["alpha"])) for r in rows]


def _list_or_reject(uri: str, rejected: list[Rejection]) -> list[str] | None:
    """Files under `uri`, or None with the reason added to `rejected` when it does not exist."""
    try:
        return storage.list_files(uri)
    except FileNotFoundError as exc:
        rejected.append(Rejection(uri, str(exc)))
        return None


def discover_photos(uris: list[str] | str) -> tuple[list[PhotoSource], list[Rejection]]:
    """Pair photos with alphas under each URI; sorted, deduplicated sources and rejections."""
    uris = [uris] if isinstance(uris, str) else list(uris)
    found: dict[str, PhotoSource] = {}
    rejected: list[Rejection] = []
    for uri in uris:
        if uri.endswith((".csv", ".parquet")):
            try:
                for src in _manifest_pairs(uri):
                    if src.alpha is None:
                        rejected.append(Rejection(src.image, "missing alpha: manifest row has no alpha"))
                    else:
                        found[src.image] = src
            except (OSError, SourceError, ValueError) as exc:
                rejected.append(Rejection(uri, f"unreadable manifest: {exc}"))
            continue
        files = _list_or_reject(uri, rejected)
        if files is None:
            continue
        images = [f for f in files if f.lower().endswith(PHOTO_EXTENSIONS)]
        alphas: dict[tuple[str, str], str] = {}
        for f in images:
            if _parent_name(f).lower() in ALPHA_DIRS:
                alphas[(posixpath.dirname(posixpath.dirname(f)), _stem(f))] = f
        for f in images:
            parent = _parent_name(f).lower()
            if parent in ALPHA_DIRS or parent in IGNORED_DIRS:
                continue
            if parent in IMAGE_DIRS:
                alpha = alphas.get((posixpath.dirname(posixpath.dirname(f)), _stem(f)))
                if alpha is None:
                    rejected.append(Rejection(f, "missing alpha: no file with this stem in a sibling alpha/ folder"))
                else:
                    found[f] = PhotoSource(f, alpha)
            else:
                found[f] = PhotoSource(f, None)  # must be RGBA; validation checks
    return [found[k] for k in sorted(found)], rejected


def discover_backgrounds(uris: list[str] | str) -> tuple[list[BackgroundSource], list[Rejection]]:
    """Background video files and frame folders under each URI, sorted."""
    uris = [uris] if isinstance(uris, str) else list(uris)
    found: set[str] = set()
    rejected: list[Rejection] = []
    for uri in uris:
        if frame_files(uri):
            found.add(uri.rstrip("/"))
            continue
        files = _list_or_reject(uri, rejected)
        if files is None:
            continue
        folders: dict[str, int] = {}
        for f in files:
            low = f.lower()
            if low.endswith(VIDEO_EXTENSIONS):
                found.add(f)
            elif low.endswith(IMAGE_EXTENSIONS):
                folders[posixpath.dirname(f)] = folders.get(posixpath.dirname(f), 0) + 1
        for folder, count in folders.items():
            if count >= 2 and frame_files(folder):
                found.add(folder)
    return [BackgroundSource(u) for u in sorted(found)], rejected


def _read_alpha(uri: str, data: bytes) -> np.ndarray:
    img = decode_image(data, uri)
    if img.ndim == 3:
        img = img[:, :, 3] if img.shape[2] == 4 else img[:, :, 0]  # 3-channel alphas: one channel
    scale = 65535.0 if img.dtype == np.uint16 else 255.0
    return img.astype(np.float32) / scale


def image_size(data: bytes, uri: str = "") -> tuple[int, int] | None:
    """(width, height) from an image file's header (PNG, JPEG, WebP, TIFF, BMP) without decoding
    its pixels, or None when no header is recognised (the decoder then reports why)."""
    from PIL import Image  # Pillow's open() parses the header only; pixels load on first access

    with warnings.catch_warnings():
        # Pillow's own decompression-bomb guard warns or raises above ~90/180 MP; the caller's
        # limit decides here, so the size must come back whatever it is.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            with Image.open(io.BytesIO(data)) as im:
                return im.size
        except Image.DecompressionBombError:
            return _size_past_bomb_guard(data)
        except (OSError, ValueError, SyntaxError):
            return None


def _size_past_bomb_guard(data: bytes) -> tuple[int, int] | None:
    # Image.open refuses very large images before telling their size; the format plugins
    # themselves only read the header.
    from PIL import Image

    Image.init()
    prefix = data[:16]
    for fmt in Image.ID:
        factory, accept = Image.OPEN[fmt]
        if accept and not accept(prefix):
            continue
        try:
            with factory(io.BytesIO(data), "") as im:
                return im.size
        except (OSError, ValueError, SyntaxError, IndexError, TypeError):
            continue
    return None


def _check_pixels(uri: str, data: bytes, max_pixels: int | None) -> None:
    """Raise SourceError when the image in `data` has more than `max_pixels` pixels (header only)."""
    if not max_pixels:
        return
    size = image_size(data, uri)
    if size is not None and size[0] * size[1] > max_pixels:
        w, h = size
        raise SourceError(uri, f"image too large: {w}x{h} = {w * h / 1e6:.3g} megapixels, above the limit of "
                               f"{max_pixels / 1e6:.3g} megapixels (max_photo_pixels)")


def _read_checked(uri: str, max_pixels: int | None) -> bytes:
    data = storage.read_bytes(uri)
    _check_pixels(uri, data, max_pixels)
    return data


def _decode_photo(src: PhotoSource, reduce: int = 1,
                  max_pixels: int | None = DEFAULT_MAX_PIXELS) -> tuple[np.ndarray, np.ndarray]:
    """Decode image and alpha; `reduce` (2, 4 or 8) decodes a JPEG at that fraction of its size
    (libjpeg scales in the DCT, several times faster) and shrinks the alpha to match. Either file
    above `max_pixels` (None: no limit) is rejected from its header, before decoding."""
    flags = {2: cv2.IMREAD_REDUCED_COLOR_2, 4: cv2.IMREAD_REDUCED_COLOR_4, 8: cv2.IMREAD_REDUCED_COLOR_8}
    use_reduced = reduce in flags and src.alpha is not None and src.image.lower().endswith((".jpg", ".jpeg"))
    try:
        image_data = _read_checked(src.image, max_pixels)
        alpha_data = _read_checked(src.alpha, max_pixels) if src.alpha is not None else None
    except FileNotFoundError as exc:
        missing = src.image if not storage.exists(src.image) else src.alpha
        raise SourceError(missing, "image file not found" if missing == src.image
                          else "missing alpha: file not found") from exc
    try:
        raw = decode_image(image_data, src.image, flags[reduce] if use_reduced else cv2.IMREAD_UNCHANGED)
    except (ValueError, OSError) as exc:
        raise SourceError(src.image, f"corrupt or truncated image: {getattr(exc, 'reason', exc)}") from exc
    if raw.ndim == 2:
        raw = cv2.cvtColor(raw, cv2.COLOR_GRAY2BGR)
    if raw.dtype == np.uint16:
        raw = (raw // 257).astype(np.uint8)
    if src.alpha is None:
        if raw.shape[2] != 4:
            raise SourceError(src.image, "missing alpha: not an RGBA image and no alpha/ file")
        alpha = raw[:, :, 3].astype(np.float32) / 255.0
    else:
        try:
            alpha = _read_alpha(src.alpha, alpha_data)
        except (ValueError, OSError) as exc:
            raise SourceError(src.alpha, f"corrupt or truncated alpha: {getattr(exc, 'reason', exc)}") from exc
    image = cv2.cvtColor(raw[:, :, :3], cv2.COLOR_BGR2RGB)
    if use_reduced:
        full = (-(-alpha.shape[0] // reduce), -(-alpha.shape[1] // reduce))
        if image.shape[:2] != full:
            raise SourceError(src.alpha, f"alpha size {alpha.shape[1]}x{alpha.shape[0]} differs from image size "
                                         f"about {image.shape[1] * reduce}x{image.shape[0] * reduce} ({src.image})")
        alpha = cv2.resize(alpha, (image.shape[1], image.shape[0]), interpolation=cv2.INTER_AREA)
    if alpha.shape != image.shape[:2]:
        raise SourceError(src.alpha or src.image,
                          f"alpha size {alpha.shape[1]}x{alpha.shape[0]} differs from image size "
                          f"{image.shape[1]}x{image.shape[0]} ({src.image})")
    return image, alpha


def _bbox(alpha: np.ndarray, uri: str) -> tuple[int, int, int, int]:
    ys, xs = np.nonzero(alpha > 0.02)
    if len(xs) == 0:
        raise SourceError(uri, "alpha is empty (no foreground)")
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


def validate_photo(src: PhotoSource, max_pixels: int | None = DEFAULT_MAX_PIXELS,
                   min_subject: int = DEFAULT_MIN_SUBJECT) -> PhotoInfo:
    """Decode a photo and its alpha and check them; raises SourceError naming the file.

    Rejected: either file above `max_pixels` (from the header, before decoding; None: no limit),
    and a subject (the alpha's bounding box) under `min_subject` pixels on either side.
    """
    image, alpha = _decode_photo(src, max_pixels=max_pixels)
    bbox = _bbox(alpha, src.alpha or src.image)
    bw, bh = bbox[2] - bbox[0], bbox[3] - bbox[1]
    if min(bw, bh) < min_subject:
        raise SourceError(src.alpha or src.image, f"subject too small: the alpha's bounding box is {bw}x{bh} "
                                                  f"pixels, under the minimum of {min_subject} px on each side "
                                                  f"(min_subject_px)")
    return PhotoInfo(src.image, src.alpha, image.shape[1], image.shape[0], bbox)


def validate_background(src: BackgroundSource) -> VideoInfo:
    """Probe a background (decoding every frame); raises SourceError naming the file."""
    try:
        return probe(src.uri)
    except VideoError as exc:
        raise SourceError(src.uri, exc.reason) from exc
    except (ValueError, OSError) as exc:
        raise SourceError(src.uri, str(exc)) from exc


def validate_all(sources: list, validate) -> tuple[list, list[Rejection]]:
    """Run `validate` (validate_photo or validate_background) on each source, locally and in order.

    Returns (the valid results, a Rejection per source that failed).
    """
    valid, rejected = [], []
    for src in sources:
        try:
            valid.append(validate(src))
        except SourceError as exc:
            rejected.append(Rejection(exc.uri, exc.reason))
    return valid, rejected


def load_photo(src: PhotoSource | PhotoInfo, max_height: int | None = None,
               estimate_foreground: bool = True, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> Photo:
    """Decode a photo, crop it to its subject and estimate the true foreground colour.

    The crop is scaled so the subject is at most `max_height` pixels tall: synthesis only ever
    shrinks it further, and foreground estimation (pymatting's multilevel method, which removes
    the colour of the photo's original background at soft edges) costs time per pixel. Files above
    `max_pixels` are rejected before decoding, as in `validate_photo`.
    """
    reduce = 1
    if isinstance(src, PhotoInfo) and max_height:
        subject = src.bbox[3] - src.bbox[1]
        while reduce < 8 and subject / (reduce * 2) >= max_height * 1.1:
            reduce *= 2
    src = src if isinstance(src, PhotoSource) else PhotoSource(src.image, src.alpha)
    image, alpha = _decode_photo(src, reduce, max_pixels)
    x0, y0, x1, y1 = _bbox(alpha, src.alpha or src.image)
    pad = int(0.02 * max(x1 - x0, y1 - y0))
    h, w = alpha.shape
    touches_bottom = y1 >= h - max(2, int(0.01 * h))
    x0, y0, x1, y1 = max(0, x0 - pad), max(0, y0 - pad), min(w, x1 + pad), min(h, y1 + pad)
    image, alpha = image[y0:y1, x0:x1], alpha[y0:y1, x0:x1]
    if max_height and image.shape[0] > max_height:
        s = max_height / image.shape[0]
        size = (max(1, round(image.shape[1] * s)), max_height)
        image = cv2.resize(image, size, interpolation=cv2.INTER_AREA)
        alpha = cv2.resize(alpha, size, interpolation=cv2.INTER_AREA)
    alpha = np.clip(alpha, 0.0, 1.0).astype(np.float32)
    # pymatting's level count is log2 of the longest side: a one-pixel crop divides by zero
    if estimate_foreground and max(image.shape[:2]) > 1:
        from pymatting import estimate_foreground_ml  # heavy import (numba); only where needed

        fgr = estimate_foreground_ml(image.astype(np.float32) / 255.0, alpha)
        fgr = np.clip(fgr * 255.0 + 0.5, 0, 255).astype(np.uint8)
    else:
        fgr = image.copy()
    return Photo(src.image, np.ascontiguousarray(image), alpha, np.ascontiguousarray(fgr), touches_bottom)


class PhotoCache:
    """Per-worker LRU of prepared photos (decoding and foreground estimation run once per photo)."""

    def __init__(self, max_items: int = 64, max_height: int | None = None,
                 max_pixels: int | None = DEFAULT_MAX_PIXELS):
        self.max_items, self.max_height, self.max_pixels = max_items, max_height, max_pixels
        self._items: OrderedDict[str, Photo] = OrderedDict()

    def get(self, src: PhotoSource | PhotoInfo) -> Photo:
        """The prepared photo for `src`, decoding it on first use."""
        key = src.image
        if key in self._items:
            self._items.move_to_end(key)
            return self._items[key]
        photo = load_photo(src, self.max_height, max_pixels=self.max_pixels)
        self._items[key] = photo
        while len(self._items) > self.max_items:
            self._items.popitem(last=False)
        return photo


def pingpong_indices(start: int, count: int, length: int) -> list[int]:
    """Frame indices start..start+count-1 reflected at the ends (forward then backward)."""
    if length <= 1:
        return [0] * count
    period = 2 * (length - 1)
    out = []
    for k in range(start, start + count):
        m = k % period
        out.append(m if m < length else period - m)
    return out


def cover_size(width: int, height: int, target: tuple[int, int]) -> tuple[int, int]:
    """Smallest (w, h) with the source's aspect ratio that covers `target` (w, h)."""
    s = max(target[0] / width, target[1] / height)
    return max(target[0], round(width * s)), max(target[1], round(height * s))


class BackgroundReader:
    """Reads background segments through a per-worker cache of decoded, resized frame chunks.

    Frames are kept at the size that covers the clip's size, in chunks of `chunk` consecutive
    frames read sequentially (one seek per chunk), within `budget_bytes` (least recently used
    chunks are dropped first), so memory stays flat however many clips a worker makes.
    """

    def __init__(self, budget_bytes: int = 1 << 30, chunk: int = 32):
        self.budget, self.chunk = budget_bytes, chunk
        self._chunks: OrderedDict[tuple, np.ndarray] = OrderedDict()
        self._bytes = 0

    def _load_chunk(self, info: VideoInfo, k: int, size: tuple[int, int]) -> np.ndarray:
        key = (info.uri, k, size)
        if key in self._chunks:
            self._chunks.move_to_end(key)
            return self._chunks[key]
        start, stop = k * self.chunk, min(info.frames, (k + 1) * self.chunk)
        frames = []
        try:
            for frame in iter_frames(info.uri, start, stop, info=info):
                frames.append(cv2.resize(frame, size, interpolation=cv2.INTER_AREA))
        except (VideoError, OSError, ValueError) as exc:
            raise SourceError(info.uri, f"failed while reading frames {start}-{stop - 1}: {exc}") from exc
        if len(frames) != stop - start:
            raise SourceError(info.uri, f"frames {start}-{stop - 1}: only {len(frames)} decoded")
        arr = np.stack(frames)
        self._chunks[key] = arr
        self._bytes += arr.nbytes
        while self._bytes > self.budget and len(self._chunks) > 1:
            _, old = self._chunks.popitem(last=False)
            self._bytes -= old.nbytes
        return arr

    def read(self, info: VideoInfo, start: int, count: int, cover: tuple[int, int]) -> np.ndarray:
        """`count` frames from `start` (ping-pong when short), each resized to cover `cover` (w, h).

        Returns uint8 `[count, H', W', 3]` with W' >= w and H' >= h.
        """
        size = cover_size(info.width, info.height, cover)
        out = []
        for i in pingpong_indices(start, count, info.frames):
            out.append(self._load_chunk(info, i // self.chunk, size)[i % self.chunk])
        return np.stack(out)
