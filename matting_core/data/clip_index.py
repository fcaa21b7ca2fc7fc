"""Random access to a clip dataset by clip id: training draws clips in a seeded order, not shard order.

One pass over the small columns (id, photo, size) of every shard builds the index; a read then
fetches one row group (`write_shard` writes one per clip) with only the columns asked for.
"""
from __future__ import annotations

import posixpath
from collections import OrderedDict
from dataclasses import dataclass

import pyarrow.parquet as pq

from matting_core import storage
from matting_core.data.clips import ClipRecord, parquet_columns, decode_row, list_shards
from matting_core.errors import InputError

__all__ = ["ClipEntry", "ClipIndex"]

_INDEX_COLUMNS = ["clip_id", "photo", "height", "width", "num_frames"]


@dataclass(frozen=True)
class ClipEntry:
    """Where one clip lives and what it shows: shard URI, row group, source photo, frame size and count."""

    clip_id: int
    shard: str
    row_group: int
    photo: str
    height: int
    width: int
    num_frames: int


class ClipIndex:
    """Every clip of the dataset at `uri` (`OUT` of `matting generate`), readable by id.

    Raises InputError naming the URI when it holds no readable shard.
    """

    def __init__(self, uri: str, open_files: int = 4):
        self.uri = uri
        shards = list_shards(uri)
        if not shards:
            raise InputError(uri, "not a clip dataset (no clips/*.parquet shard); make one with `matting generate`")
        self.entries: dict[int, ClipEntry] = {}
        for shard in shards:
            try:
                table = self._file(shard).read(columns=_INDEX_COLUMNS)
            except Exception as exc:  # pyarrow and fsspec raise many types for corrupt or foreign files
                raise InputError(shard, f"unreadable clip shard ({exc})") from exc
            for group, row in enumerate(table.to_pylist()):
                self.entries[row["clip_id"]] = ClipEntry(row["clip_id"], shard, group, row["photo"],
                                                         row["height"], row["width"], row["num_frames"])
        self._open: OrderedDict[str, pq.ParquetFile] = OrderedDict()
        self._max_open = max(1, int(open_files))

    @property
    def ids(self) -> list[int]:
        """Clip ids in ascending order."""
        return sorted(self.entries)

    def sizes(self) -> set[tuple[int, int]]:
        """The distinct (width, height) of the clips."""
        return {(e.width, e.height) for e in self.entries.values()}

    def photo_key(self, clip_id: int) -> str:
        """The source photo's name (file stem), the unit of a train/validation split."""
        return posixpath.splitext(posixpath.basename(self.entries[clip_id].photo))[0]

    def read(self, clip_id: int, columns: list[str] | None = None, frames: slice | None = None,
             defer: tuple[str, ...] = ("bgr",)) -> ClipRecord:
        """The clip `clip_id` with only `columns` decoded (others None), and of those only `frames`
        (all by default); KeyError for an unknown id.

        The image columns in `defer` are decoded when the record's field is first read
        (`decode_row`): by default bgr, which a training sample composites only when it draws a
        pause (`AugmentConfig.still`).
        """
        entry = self.entries[clip_id]
        pf = self._cached(entry.shard)
        # One row group of one clip: pyarrow's thread pool only adds hand-offs (and threads) here.
        table = pf.read_row_group(entry.row_group, columns=parquet_columns(columns), use_threads=False)
        return decode_row(table.to_pylist()[0], frames, defer)

    def _cached(self, shard: str) -> pq.ParquetFile:
        if shard in self._open:
            self._open.move_to_end(shard)
            return self._open[shard]
        pf = self._file(shard)
        self._open[shard] = pf
        while len(self._open) > self._max_open:
            self._open.popitem(last=False)
        return pf

    @staticmethod
    def _file(shard: str) -> pq.ParquetFile:
        fs, path = storage.filesystem(shard)
        return pq.ParquetFile(fs.open(path, "rb"))
