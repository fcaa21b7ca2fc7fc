"""The clip record: encoding a synthesised clip to a Parquet row and reading a clip dataset back.

Row schema (one row per clip; SCHEMA_VERSION below):
  clip_id int64, seed int64, photo string, background string, background_start int32,
  shifted bool, frames / fgr / bgr list<binary> (per-frame JPEG), alpha list<binary> (per-frame
  8-bit grey PNG, lossless), flow binary (int16 little-endian [T,H,W,2], pixels = value / flow_scale),
  flow_scale float32, height int32, width int32, num_frames int32, info string (JSON).
"""
from __future__ import annotations

import json
import posixpath
from dataclasses import dataclass
from typing import Iterator

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from matting_core import storage

__all__ = ["SCHEMA", "SCHEMA_VERSION", "FLOW_SCALE", "ARRAY_COLUMNS", "Clip", "ClipRecord", "Deferred", "encode_clip",
           "decode_row", "iter_clips", "list_shards", "shard_name", "write_shard"]

SCHEMA_VERSION = 1
# int16 fixed point: 1/32 px steps, +-1024 px per frame covers any motion the generator makes.
FLOW_SCALE = 32.0

SCHEMA = pa.schema([
    ("clip_id", pa.int64()), ("seed", pa.int64()), ("photo", pa.string()), ("background", pa.string()),
    ("background_start", pa.int32()), ("shifted", pa.bool_()),
    ("frames", pa.list_(pa.binary())), ("fgr", pa.list_(pa.binary())), ("bgr", pa.list_(pa.binary())),
    ("alpha", pa.list_(pa.binary())), ("flow", pa.binary()), ("flow_scale", pa.float32()),
    ("height", pa.int32()), ("width", pa.int32()), ("num_frames", pa.int32()), ("info", pa.string()),
])
# The per-frame columns, the bulk of a row; every other column is small and always read (identity,
# shape, flow scale), so a record can be built from any subset of these.
ARRAY_COLUMNS = ("frames", "fgr", "bgr", "alpha", "flow")
_SMALL_COLUMNS = tuple(name for name in SCHEMA.names if name not in ARRAY_COLUMNS)


@dataclass
class Clip:
    """One synthesised clip. Arrays are uint8 except flow.

    frames, fgr, bgr: [T,H,W,3] RGB; alpha: [T,H,W] (8-bit, value/255 is alpha);
    flow: float32 [T,H,W,2] backward foreground flow (zero where alpha == 0; flow[0] == 0).
    """

    frames: np.ndarray
    fgr: np.ndarray
    bgr: np.ndarray
    alpha: np.ndarray
    flow: np.ndarray
    shifted: bool
    info: dict


class Deferred:
    """Per-frame images of one column kept encoded: `deferred()` decodes and stacks them."""

    __slots__ = ("name", "data", "height", "width")

    def __init__(self, name: str, data: list[bytes], height: int, width: int):
        self.name, self.data, self.height, self.width = name, data, height, width

    def __call__(self) -> np.ndarray:
        return _decode_images(self.name, self.data, self.height, self.width)


class _DecodedOnUse:
    """A ClipRecord array field that may hold a `Deferred` column: decoded once, when first read."""

    def __set_name__(self, owner, name: str) -> None:
        self.slot = "_" + name

    def __get__(self, record, owner=None):
        if record is None:
            raise AttributeError(self.slot[1:])  # no class-level default: the field stays required
        value = record.__dict__[self.slot]
        if isinstance(value, Deferred):
            value = record.__dict__[self.slot] = value()
        return value

    def __set__(self, record, value) -> None:
        record.__dict__[self.slot] = value


@dataclass
class ClipRecord:
    """A decoded clip. frames/fgr/bgr uint8 [T,H,W,3] RGB; alpha float32 [T,H,W] in [0,1];
    flow float32 [T,H,W,2] backward foreground flow (DESIGN.md). An array whose column was not
    read (`iter_clips(columns=...)`) is None. An array field may also be given a `Deferred`
    column (`decode_row(defer=...)`): it is decoded when the field is first read."""

    clip_id: int
    seed: int
    photo: str
    background: str
    shifted: bool
    frames: np.ndarray | None = _DecodedOnUse()
    fgr: np.ndarray | None = _DecodedOnUse()
    bgr: np.ndarray | None = _DecodedOnUse()
    alpha: np.ndarray | None = _DecodedOnUse()
    flow: np.ndarray | None = _DecodedOnUse()
    info: dict

    def has(self, name: str) -> bool:
        """Whether array column `name` was read (decoded or deferred), without decoding it."""
        return self.__dict__["_" + name] is not None


def _jpeg(img: np.ndarray, quality: int) -> bytes:
    # 4:4:4 sampling: chroma subsampling smears colour across the soft edges the matte describes.
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(img, cv2.COLOR_RGB2BGR),
                           [cv2.IMWRITE_JPEG_QUALITY, int(quality),
                            cv2.IMWRITE_JPEG_SAMPLING_FACTOR, cv2.IMWRITE_JPEG_SAMPLING_FACTOR_444])
    if not ok:
        raise RuntimeError("JPEG encoding failed")
    return buf.tobytes()


def _png(gray: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".png", gray, [cv2.IMWRITE_PNG_COMPRESSION, 1])
    if not ok:
        raise RuntimeError("PNG encoding failed")
    return buf.tobytes()


def encode_clip(clip: Clip, clip_id: int, seed: int, photo: str, background: str,
                background_start: int, jpeg_quality: int = 95) -> dict:
    """One Parquet row (a dict following SCHEMA) for a synthesised clip."""
    T, H, W = clip.alpha.shape
    flow = np.clip(np.rint(clip.flow * FLOW_SCALE), -32768, 32767).astype("<i2")
    return {
        "clip_id": int(clip_id), "seed": int(seed), "photo": photo, "background": background,
        "background_start": int(background_start), "shifted": bool(clip.shifted),
        "frames": [_jpeg(f, jpeg_quality) for f in clip.frames],
        "fgr": [_jpeg(f, jpeg_quality) for f in clip.fgr],
        "bgr": [_jpeg(f, jpeg_quality) for f in clip.bgr],
        "alpha": [_png(a) for a in clip.alpha],
        "flow": flow.tobytes(), "flow_scale": FLOW_SCALE,
        "height": H, "width": W, "num_frames": T, "info": json.dumps(clip.info, sort_keys=True),
    }


def _imdecode(data: bytes, flags: int) -> np.ndarray:
    img = cv2.imdecode(np.frombuffer(data, np.uint8), flags)
    if img is None:
        raise ValueError("undecodable image in a clip record")
    return img


def _decode_rgb(data: bytes, out: np.ndarray | None = None) -> np.ndarray:
    """uint8 [H,W,3] RGB from JPEG bytes (into `out` when given)."""
    if _IMREAD_RGB is None:  # OpenCV < 4.10: the same pixels by way of BGR
        rgb = cv2.cvtColor(_imdecode(data, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
    else:
        rgb = _imdecode(data, _IMREAD_RGB)
    if out is None:
        return rgb
    out[...] = rgb
    return out


def _decode_alpha(data: bytes, out: np.ndarray | None = None) -> np.ndarray:
    """float32 [H,W] in [0,1] from 8-bit grey PNG bytes (into `out` when given)."""
    return np.divide(_imdecode(data, cv2.IMREAD_UNCHANGED), np.float32(255.0), out=out, dtype=np.float32)


# libjpeg converts to RGB itself (the same pixels as BGR then cvtColor, one pass fewer).
_IMREAD_RGB = getattr(cv2, "IMREAD_COLOR_RGB", None)
# Per-frame image columns: how one frame decodes, the channels and dtype of a decoded frame, and
# the format's name and first bytes (a deferred column is checked for them when it is read).
_RGB = (_decode_rgb, 3, np.uint8, "JPEG", b"\xff\xd8\xff")
_IMAGE_COLUMNS = {"frames": _RGB, "fgr": _RGB, "bgr": _RGB,
                  "alpha": (_decode_alpha, None, np.float32, "PNG", b"\x89PNG\r\n\x1a\n")}


def _decode_images(name: str, data: list[bytes], height: int, width: int) -> np.ndarray:
    """The encoded images `data` of column `name`, decoded and stacked [T,H,W,...]."""
    decode, channels, dtype, _, _ = _IMAGE_COLUMNS[name]
    out = np.empty((len(data), height, width) + ((channels,) if channels else ()), dtype)
    for t, b in enumerate(data):
        decode(b, out[t])
    return out


def _decode_frames(row: dict, name: str, window: slice, defer: bool = False) -> np.ndarray | Deferred | None:
    """The per-frame images of column `name` in `window`, stacked [T,...] (a `Deferred` with `defer`),
    or None when it was not read."""
    data = row.get(name)
    if data is None:
        return None
    data = data[window]
    if not defer:
        return _decode_images(name, data, row["height"], row["width"])
    *_, kind, signature = _IMAGE_COLUMNS[name]
    if not all(b.startswith(signature) for b in data):
        raise ValueError(f"column {name}: an image is not {kind} data")
    return Deferred(name, data, row["height"], row["width"])


def _decode_flow(row: dict, window: slice) -> np.ndarray | None:
    if row.get("flow") is None:
        return None
    shape = (row["num_frames"], row["height"], row["width"], 2)
    flow = np.frombuffer(row["flow"], "<i2").reshape(shape)[window]
    return np.divide(flow, np.float32(row["flow_scale"]), dtype=np.float32)


def decode_row(row: dict, frames: slice | None = None, defer: tuple[str, ...] = ()) -> ClipRecord:
    """A ClipRecord from one row (as `pyarrow` `to_pylist` gives it); absent array columns give None.

    `frames` decodes only those frames of every per-frame column (training takes a window of a
    few frames of each clip, and decoding is most of what reading a clip costs). The image columns
    in `defer` (of frames, fgr, bgr, alpha) are decoded when the record's field is first read, not
    here: a column that is seldom used then costs nothing when it is not. Their bytes are checked
    for the JPEG / PNG signature here, but any other decoding error is raised at that first read.
    """
    window = slice(None) if frames is None else frames
    unknown = set(defer) - set(_IMAGE_COLUMNS)
    if unknown:
        raise ValueError(f"only image columns can be deferred ({', '.join(_IMAGE_COLUMNS)}), not {sorted(unknown)}")
    return ClipRecord(
        clip_id=row["clip_id"], seed=row["seed"], photo=row["photo"], background=row["background"],
        shifted=row["shifted"],
        **{name: _decode_frames(row, name, window, name in defer) for name in _IMAGE_COLUMNS},
        flow=_decode_flow(row, window), info=json.loads(row.get("info") or "{}"),
    )


def shard_name(start: int, stop: int) -> str:
    """File name of the shard holding clips start..stop-1 (same on every rerun)."""
    return f"clips-{start:08d}-{stop - 1:08d}.parquet"


def list_shards(uri: str) -> list[str]:
    """URIs of the finished shards of a dataset, in clip order."""
    clips = storage.join(uri, "clips")
    if not storage.exists(clips):
        return []
    return [u for u in storage.list_files(clips, recursive=False)
            if posixpath.basename(u).startswith("clips-") and u.endswith(".parquet")]


def write_shard(uri: str, rows: list[dict], metadata: dict | None = None) -> None:
    """Write rows as one Parquet shard at `uri`, atomically; one row group per clip."""
    meta = {b"matting": json.dumps(metadata or {}, sort_keys=True).encode()}
    with storage.open_atomic(uri, "wb") as f:
        with pq.ParquetWriter(f, SCHEMA.with_metadata(meta), compression="zstd", compression_level=1,
                              use_dictionary=False, write_statistics=False) as writer:
            for row in rows:
                writer.write_table(pa.Table.from_pylist([row], schema=SCHEMA))


def shard_metadata(uri: str) -> tuple[int, dict]:
    """(row count, the job's metadata) from a shard's footer, without reading its data."""
    fs, path = storage.filesystem(uri)
    with fs.open(path, "rb") as f:
        md = pq.ParquetFile(f).metadata
        kv = md.metadata or {}
        return md.num_rows, json.loads(kv.get(b"matting", b"{}"))


def parquet_columns(columns: list[str] | None) -> list[str]:
    """The Parquet columns to read for `columns` (None: all): the small ones plus the arrays asked for."""
    if columns is None:
        return list(SCHEMA.names)
    unknown = [c for c in columns if c not in SCHEMA.names]
    if unknown:
        raise ValueError(f"unknown clip column(s) {', '.join(map(repr, unknown))}; "
                         f"the columns are {', '.join(SCHEMA.names)}")
    return [*_SMALL_COLUMNS, *(c for c in ARRAY_COLUMNS if c in columns)]


def iter_clips(uri: str, columns: list[str] | None = None) -> Iterator[ClipRecord]:
    """Yield every clip of a dataset (`OUT` of `matting generate`) in clip order, one at a time.

    `columns` (names from SCHEMA, e.g. ["frames", "alpha", "flow"]) reads only those array columns
    from storage; the others are None on the records. An unknown name raises ValueError at once.
    """
    return _iter_rows(uri, parquet_columns(columns))


def _iter_rows(uri: str, columns: list[str]) -> Iterator[ClipRecord]:
    for shard in list_shards(uri):
        fs, path = storage.filesystem(shard)
        with fs.open(path, "rb") as f:
            pf = pq.ParquetFile(f)
            for batch in pf.iter_batches(batch_size=1, columns=columns):
                for row in batch.to_pylist():
                    yield decode_row(row)
