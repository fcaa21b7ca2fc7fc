"""Joining the partial outputs of a video's segments into its one mattes set, published whole.

Each segment's outputs are a complete mattes set of its own frames (published with its own
result.json, so a resumed job redoes only missing segments). PNG sequences need only their files
moved (renamed locally, copied server-side on an object store): their names are the frames'
source numbers already. Video formats are joined without re-encoding (`concat_videos`): each
segment was encoded with the same settings and starts on a key frame.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Any, Sequence

from matting_core import storage
from matting_core.inference.outputs import RESULT_FILE, make_temporary, publish_temporary
from matting_core.video.concat import concat_videos

__all__ = ["PNG_FORMATS", "assemble_segments", "merge_results"]

PNG_FORMATS = ("pha", "fgr")


def merge_results(parts: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One result.json document from the segments' (in order): counts summed, lists joined, status the worst."""
    first = parts[0]
    lost = sorted(i for p in parts for i in p.get("lost_frames", []))
    merged = {**first,
              "status": "partial" if lost else "ok",
              "frames": sum(int(p["frames"]) for p in parts),
              "lost_frames": lost,
              "errors": [e for p in parts for e in p.get("errors", [])],
              "resized_frames": [r for p in parts for r in p.get("resized_frames", [])],
              "segments": len(parts),
              "finished": max(p.get("finished", "") for p in parts)}
    walls = [p.get("timings", {}).get("total_s", {}).get("wall", 0.0) for p in parts]
    merged["timings"] = {"segments_wall_s": [round(float(w), 3) for w in walls],
                         "wall_s_total": round(float(sum(walls)), 3)}
    return merged


def assemble_segments(segment_uris: Sequence[str], out_dir: str, stem: str, formats: Sequence[str],
                      record: dict[str, Any] | None = None) -> tuple[str, dict[str, Any]]:
    """Join the published segment sets `segment_uris` (in order) into `out_dir/<stem>/`.

    Returns its URI and the result.json document published with it.

    The segment sets are removed once the whole set is published. `record` adds fields to the
    merged result.json (the run's model reference, ...).
    """
    documents = [json.loads(storage.read_bytes(storage.join(u, RESULT_FILE))) for u in segment_uris]
    document = {**merge_results(documents), **(record or {})}
    final_uri = storage.join(out_dir, stem)
    tmp = make_temporary(out_dir, stem)
    remote = storage.local_path(out_dir) is None
    try:
        with tempfile.TemporaryDirectory(prefix=f"assemble-{stem}-") as scratch:
            for fmt in formats:
                if fmt in PNG_FORMATS:
                    if not remote:
                        _move_pngs(segment_uris, fmt, os.path.join(tmp, fmt))
                    continue
                parts = [_local_copy(storage.join(u, fmt), os.path.join(scratch, f"{k}-{fmt}"))
                         for k, u in enumerate(segment_uris)]
                concat_videos(parts, os.path.join(tmp, fmt))
        if remote:
            _copy_pngs_remote(segment_uris, [f for f in formats if f in PNG_FORMATS], final_uri)
        publish_temporary(tmp, final_uri, document, replace=not remote)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for uri in segment_uris:
        storage.remove(uri, recursive=True)
    return final_uri, document


def _local_copy(uri: str, path: str) -> str:
    local = storage.local_path(uri)
    if local is not None:
        return local
    fs, remote = storage.filesystem(uri)
    fs.get_file(remote, path)
    return path


def _move_pngs(segment_uris: Sequence[str], fmt: str, dest: str) -> None:
    os.makedirs(dest, exist_ok=True)
    for uri in segment_uris:
        folder = os.path.join(storage.local_path(uri), fmt)
        for name in sorted(os.listdir(folder)):
            os.replace(os.path.join(folder, name), os.path.join(dest, name))


def _copy_pngs_remote(segment_uris: Sequence[str], formats: Sequence[str], final_uri: str) -> None:
    """Server-side copies of the segments' PNGs under `final_uri` (before result.json, which marks completion)."""
    fs, root = storage.filesystem(final_uri)
    if fs.exists(root):
        fs.rm(root, recursive=True)
    for uri in segment_uris:
        _, seg = storage.filesystem(uri)
        for fmt in formats:
            for src in sorted(fs.find(f"{seg.rstrip('/')}/{fmt}")):
                fs.copy(src, f"{root.rstrip('/')}/{fmt}/{src.rsplit('/', 1)[-1]}")
