"""Photo limits checked before decoding: pixel count from the header, minimum subject size."""
from __future__ import annotations

import json
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest

from matting_core.data import sources
from matting_core.data.sources import PhotoSource, SourceError, load_photo, validate_photo

REPO = Path(__file__).resolve().parents[1]


def _chunk(f, kind: bytes, data: bytes) -> None:
    f.write(struct.pack(">I", len(data)) + kind + data)
    f.write(struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))


def write_flat_png(path: Path, width: int, height: int, value: int) -> None:
    """A valid 8-bit grey PNG of one value, streamed row by row (never the whole image in memory)."""
    row = b"\x00" + bytes([value]) * width  # filter byte 0, then the pixels
    comp = zlib.compressobj(6)
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n")
        _chunk(f, b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
        buf = bytearray()
        for _ in range(height):
            buf += comp.compress(row)
            if len(buf) > 1 << 20:
                _chunk(f, b"IDAT", bytes(buf))
                buf.clear()
        buf += comp.flush()
        _chunk(f, b"IDAT", bytes(buf))
        _chunk(f, b"IEND", b"")


@pytest.fixture(scope="module")
def huge_pair(tmp_path_factory) -> Path:
    """photos/{image,alpha}/huge.png, 20000x20000 each (1.2 GB as RGB once decoded), a few hundred KB on disk."""
    root = tmp_path_factory.mktemp("huge") / "photos"
    for sub, value in (("image", 128), ("alpha", 255)):
        (root / sub).mkdir(parents=True)
        write_flat_png(root / sub / "huge.png", 20000, 20000, value)
    return root


# Run in a child so its peak memory is its own. The address-space cap only keeps a regression from
# exhausting the shared machine; the assertion is on the child's measured peak resident memory.
_CHILD = """
import json, resource, sys
resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))
from matting_core.data.sources import SourceError, discover_photos, load_photo, validate_all, validate_photo
sources, _ = discover_photos(sys.argv[1])
valid, rejected = validate_all(sources, validate_photo)
try:
    load_photo(sources[0], max_height=288)
    loaded = "loaded"
except SourceError as exc:
    loaded = exc.reason
# VmHWM: this program's own peak; ru_maxrss also counts the forked copy of the parent before exec
hwm = [line for line in open("/proc/self/status") if line.startswith("VmHWM:")]
peak_kb = int(hwm[0].split()[1]) if hwm else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"valid": len(valid), "rejected": [[r.uri, r.reason] for r in rejected], "load": loaded,
                  "peak_mb": peak_kb / 1024}))
"""


def test_huge_photo_pair_is_rejected_from_its_header_in_bounded_memory(huge_pair):
    assert (huge_pair / "image" / "huge.png").stat().st_size < 2 << 20
    res = subprocess.run([sys.executable, "-c", _CHILD, str(huge_pair)], capture_output=True, text=True, cwd=REPO,
                         timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    got = json.loads(res.stdout.splitlines()[-1])
    assert got["valid"] == 0 and len(got["rejected"]) == 1
    uri, reason = got["rejected"][0]
    assert uri.endswith("huge.png")
    assert "20000x20000" in reason and "50 megapixels" in reason, reason
    assert "20000x20000" in got["load"]  # workers that load without validating are bounded too
    assert got["peak_mb"] < 500, got


def test_pixel_limit_is_configurable_and_checks_the_alpha_too(tmp_path):
    img, pha = tmp_path / "img.png", tmp_path / "pha.png"
    cv2.imwrite(str(img), np.full((100, 80, 3), 90, np.uint8))
    cv2.imwrite(str(pha), np.full((100, 80), 255, np.uint8))
    src = PhotoSource(str(img), str(pha))
    assert validate_photo(src).width == 80
    with pytest.raises(SourceError, match=r"80x100 .* limit of 0\.005 megapixels") as exc:
        validate_photo(src, max_pixels=5000)
    assert exc.value.uri == str(img)
    big_alpha = tmp_path / "big.png"
    write_flat_png(big_alpha, 3000, 3000, 255)
    with pytest.raises(SourceError, match="3000x3000") as exc:
        validate_photo(PhotoSource(str(img), str(big_alpha)), max_pixels=1_000_000)
    assert exc.value.uri == str(big_alpha)


@pytest.mark.parametrize("ext", [".png", ".jpg", ".webp", ".tif", ".bmp"])
def test_image_size_reads_the_header(tmp_path, ext):
    path = tmp_path / f"x{ext}"
    cv2.imwrite(str(path), np.zeros((37, 53, 3), np.uint8))
    assert sources.image_size(path.read_bytes(), str(path)) == (53, 37)


def test_image_size_of_garbage_is_none(tmp_path):
    assert sources.image_size(b"not an image at all", "x.png") is None


def _rgba(path: Path, h: int, w: int, subject: tuple[int, int]) -> str:
    img = np.zeros((h, w, 4), np.uint8)
    img[..., :3] = 120
    img[:subject[0], :subject[1], 3] = 255
    cv2.imwrite(str(path), img)
    return str(path)


def test_tiny_subject_is_rejected_up_front(tmp_path):
    one = PhotoSource(_rgba(tmp_path / "one.png", 1, 1, (1, 1)), None)
    with pytest.raises(SourceError, match=r"subject .*1x1 .*16 px") as exc:
        validate_photo(one)
    assert exc.value.uri == one.image
    thin = PhotoSource(_rgba(tmp_path / "thin.png", 64, 64, (40, 10)), None)
    with pytest.raises(SourceError, match="10x40"):
        validate_photo(thin)
    assert validate_photo(thin, min_subject=8).bbox == (0, 0, 10, 40)


def test_loading_a_one_pixel_subject_does_not_divide_by_zero(tmp_path):
    # pymatting's multilevel estimation takes log2 of the longest side: 0 levels for one pixel
    photo = load_photo(PhotoSource(_rgba(tmp_path / "one.png", 1, 1, (1, 1)), None), max_height=100)
    assert photo.alpha.shape == (1, 1) and photo.fgr.shape == (1, 1, 3)


def test_make_benchmark_applies_the_photo_limits(tmp_path, shared_data):
    from pipelines.cli import main

    photos = tmp_path / "photos"
    (photos / "image").mkdir(parents=True)
    (photos / "alpha").mkdir()
    for stem in ("GT01", "GT04"):  # 800x5xx each: 0.4+ megapixels
        (photos / "image" / f"{stem}.png").symlink_to(shared_data / "photos/alphamatting/image" / f"{stem}.png")
        (photos / "alpha" / f"{stem}.png").symlink_to(shared_data / "photos/alphamatting/alpha" / f"{stem}.png")
    small = photos / "small.png"
    _rgba(small, 300, 200, (250, 150))  # 0.06 megapixels, subject 150x250
    _rgba(photos / "speck.png", 300, 200, (4, 4))
    out = tmp_path / "bench"
    rc = main(["make-benchmark", "--photos", str(photos), "--backgrounds", str(shared_data / "videos/backgrounds"),
               "--out", str(out), "--clips", "1", "--frames", "2", "--size", "64x36",
               "--max-photo-pixels", "100000", "--min-subject-px", "8"])
    assert rc == 0
    manifest = json.loads((out / "benchmark.json").read_text())
    reasons = {Path(r["uri"]).name: r["reason"] for r in manifest["rejected"]}
    assert set(reasons) == {"GT01.png", "GT04.png", "speck.png"}, reasons
    assert "above the limit of 0.1 megapixels" in reasons["GT01.png"]
    assert "4x4" in reasons["speck.png"]
    assert [c["photo"] for c in manifest["clips"]] == [str(small)]
