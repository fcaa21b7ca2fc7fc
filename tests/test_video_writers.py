"""Matte writers: PNG sequences, ProRes 4444 / VP9 with alpha, composites, decoded back from disk."""
from __future__ import annotations

from pathlib import Path

import av
import cv2
import numpy as np
import pytest

from matting_core.video.writers import (AlphaPngWriter, CompositeWriter, ForegroundPngWriter,
                                        parse_color, read_alpha_video, read_rgba_video,
                                        rgba_mov_writer, rgba_webm_writer, to_rgba)

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
CARPHONE = SHARED / "data" / "videos" / "people" / "carphone.mp4"


def _frames(n: int, w: int, h: int):
    """n (pha float32 [H,W], fgr uint8 [H,W,3]) pairs: a moving soft-edged disc on textured colour."""
    rng = np.random.default_rng(7)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    out = []
    for i in range(n):
        cx, cy = w * (0.3 + 0.04 * i), h * 0.5
        d = np.sqrt((xx - cx) ** 2 + (yy - cy) ** 2)
        pha = np.clip((0.35 * h - d) / 8.0, 0.0, 1.0).astype(np.float32)
        fgr = np.dstack([xx / w * 255, yy / h * 255, np.full_like(xx, 40 * i % 255)]).astype(np.uint8)
        fgr = np.clip(fgr.astype(int) + rng.integers(-8, 8, fgr.shape), 0, 255).astype(np.uint8)
        out.append((pha, fgr))
    return out


@pytest.mark.parametrize("make", [rgba_mov_writer, rgba_webm_writer], ids=["prores4444-mov", "vp9-webm"])
def test_alpha_video_round_trip_matches_png_alpha(tmp_path, make):
    w, h, n = 176, 144, 6
    frames = _frames(n, w, h)
    ext = ".mov" if make is rgba_mov_writer else ".webm"
    path = str(tmp_path / f"rgba{ext}")
    pngs = AlphaPngWriter(str(tmp_path / "pha"))
    with make(path, 29.97, (w, h)) as video:
        for i, (pha, fgr) in enumerate(frames):
            pngs.write(i, pha)
            video.write(to_rgba(fgr, pha))
    with av.open(path) as c:
        stream = c.streams.video[0]
        assert abs(float(stream.average_rate) - 29.97) < 0.01
        assert stream.codec_context.name == ("prores" if ext == ".mov" else "vp9")
    alphas = list(read_alpha_video(path))
    assert len(alphas) == n
    for i, a in enumerate(alphas):
        assert a.shape == (h, w)
        png = cv2.imread(str(tmp_path / "pha" / f"{i:06d}.png"), cv2.IMREAD_UNCHANGED)
        assert png.dtype == np.uint8 and png.shape == (h, w)
        assert np.abs(a.astype(float) - png).mean() <= 3.0
        # Alpha really is stored (not a constant 255 plane) and covers both ends of the range.
        assert a.min() <= 2 and a.max() >= 253
    rgba = next(read_rgba_video(path))
    inside = frames[0][0] > 0.99
    assert np.abs(rgba[..., :3][inside].astype(float) - frames[0][1][inside]).mean() < 6.0


def test_png_sequences_8_and_16_bit(tmp_path):
    pha, fgr = _frames(1, 64, 48)[0]
    p8 = AlphaPngWriter(str(tmp_path / "a8")).write(0, pha)
    p16 = AlphaPngWriter(str(tmp_path / "a16"), bits=16).write(0, pha)
    pf = ForegroundPngWriter(str(tmp_path / "fgr")).write(0, fgr)
    assert Path(p8).name == "000000.png"
    a8 = cv2.imread(p8, cv2.IMREAD_UNCHANGED)
    a16 = cv2.imread(p16, cv2.IMREAD_UNCHANGED)
    assert a8.dtype == np.uint8 and a16.dtype == np.uint16
    assert np.abs(a16 / 65535.0 - pha).max() < 1e-4
    assert np.abs(a8 / 255.0 - pha).max() <= 0.5 / 255 + 1e-6
    back = cv2.cvtColor(cv2.imread(pf), cv2.COLOR_BGR2RGB)
    assert np.array_equal(back, fgr)
    with pytest.raises(ValueError, match="8 or 16"):
        AlphaPngWriter(str(tmp_path / "bad"), bits=12)


def test_composite_over_colour_odd_size(tmp_path):
    w, h, n = 75, 41, 4
    frames = _frames(n, w, h)
    path = str(tmp_path / "composite.mp4")
    comp = CompositeWriter(path, 25, (w, h), "#0000ff")
    for pha, fgr in frames:
        comp.write(pha, fgr)
    comp.close()
    with av.open(path) as c:
        decoded = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
    assert len(decoded) == n
    assert decoded[0].shape[:2] == (h + 1, w + 1)  # padded to even for yuv420p
    pha = frames[0][0]
    outside = pha == 0
    assert np.abs(decoded[0][:h, :w][outside].astype(float) - [0, 0, 255]).mean() < 10


def test_composite_over_image_and_looping_video(tmp_path):
    if not CARPHONE.exists():
        pytest.skip(f"{CARPHONE} absent")
    w, h = 96, 64
    img = np.zeros((30, 50, 3), np.uint8)
    img[:, :25] = (255, 0, 0)  # left half red (RGB), resized to the output
    cv2.imwrite(str(tmp_path / "bg.png"), cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
    frames = _frames(3, w, h)
    comp = CompositeWriter(str(tmp_path / "over_image.mp4"), 25, (w, h), str(tmp_path / "bg.png"))
    for pha, _ in frames:
        comp.write(np.zeros_like(pha), frames[0][1])
    comp.close()
    with av.open(str(tmp_path / "over_image.mp4")) as c:
        first = next(c.decode(video=0)).to_ndarray(format="rgb24")
    assert first.shape == (h, w, 3)
    assert first[h // 2, 5, 0] > 200 and first[h // 2, w - 5, 0] < 50

    # A 120-frame background video composited under 130 frames loops instead of running out.
    comp = CompositeWriter(str(tmp_path / "over_video.mp4"), 25, (w, h), str(CARPHONE))
    zero = np.zeros((h, w), np.float32)
    for _ in range(130):
        comp.write(zero, frames[0][1])
    comp.close()
    with av.open(str(tmp_path / "over_video.mp4")) as c:
        out = [f.to_ndarray(format="rgb24").astype(float) for f in c.decode(video=0)]
    assert len(out) == 130
    assert np.abs(out[120] - out[0]).mean() < 4 < np.abs(out[60] - out[0]).mean()


def test_bad_background_is_named():
    assert parse_color("green") == (0, 255, 0) and parse_color("10,20,30") == (10, 20, 30)
    assert parse_color("#FF8000") == (255, 128, 0) and parse_color("nope.png") is None
    with pytest.raises(ValueError, match="nope.png"):
        CompositeWriter("/tmp/never-written.mp4", 25, (8, 8), "nope.png")


@pytest.mark.parametrize("fps,expect", [(29.97, "30000/1001"), (25.0, "25"), (12.5, "25/2"), (59.94, "60000/1001")])
def test_frame_rate_is_kept_exactly(tmp_path, fps, expect):
    # .mov keeps the exact rational rate (WebM's millisecond timestamps cannot hold 60000/1001).
    path = str(tmp_path / "rate.mov")
    with rgba_mov_writer(path, fps, (32, 32)) as video:
        for _ in range(3):
            video.write(np.zeros((32, 32, 4), np.uint8))
    with av.open(path) as c:
        assert str(c.streams.video[0].average_rate) == expect


@pytest.mark.parametrize("background", [False, True], ids=["inline", "writer-thread"])
def test_outputs_publish_whole_sets_only(tmp_path, background):
    from matting_core.inference.outputs import MatteOutputs

    w, h = 64, 48
    frames = _frames(3, w, h)
    outputs = MatteOutputs(str(tmp_path), "clip", ("pha", "rgba.webm"), 25, (w, h), background=background)
    for i, (pha, fgr) in enumerate(frames):
        outputs.write(i, pha, fgr)
    assert not (tmp_path / "clip").exists()  # nothing visible before commit
    outputs.commit({"status": "ok"})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clip"]
    assert len(list((tmp_path / "clip" / "pha").iterdir())) == 3
    assert len(list(read_alpha_video(str(tmp_path / "clip" / "rgba.webm")))) == 3

    # A re-run replaces the set; a failing one (a frame of the wrong size) publishes nothing.
    with pytest.raises(ValueError, match="64x48"):
        with MatteOutputs(str(tmp_path), "clip", ("pha", "rgba.webm"), 25, (w, h),
                          background=background) as outputs:
            outputs.write(0, frames[0][0], frames[0][1])
            outputs.write(1, np.zeros((10, 10), np.float32), np.zeros((10, 10, 3), np.uint8))
            outputs.commit({"status": "ok"})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clip"]
    assert len(list((tmp_path / "clip" / "pha").iterdir())) == 3


def test_every_format_from_one_quantised_alpha(tmp_path):
    """8-bit PNGs, both alpha videos (one encoder thread) and 16-bit PNGs agree with the float alpha."""
    from matting_core.inference.outputs import MatteOutputs, default_encoder_threads

    w, h = 96, 64
    frames = _frames(4, w, h)
    for bits in (8, 16):
        with MatteOutputs(str(tmp_path), f"b{bits}", ("pha", "rgba.mov", "rgba.webm"), 25, (w, h),
                          alpha_bits=bits, background=True, encoder_threads=1) as outputs:
            for i, (pha, fgr) in enumerate(frames):
                outputs.write(i, pha, fgr)
            outputs.commit({"status": "ok"})
        peak = 255.0 if bits == 8 else 65535.0
        for i, (pha, _) in enumerate(frames):
            png = cv2.imread(str(tmp_path / f"b{bits}" / "pha" / f"{i:06d}.png"), cv2.IMREAD_UNCHANGED)
            assert png.dtype == (np.uint8 if bits == 8 else np.uint16)
            assert np.abs(png / peak - pha).max() <= 0.5 / peak + 1e-6
        for name in ("rgba.mov", "rgba.webm"):
            alphas = list(read_alpha_video(str(tmp_path / f"b{bits}" / name)))
            assert len(alphas) == 4
            assert np.abs(alphas[2] / 255.0 - frames[2][0]).mean() <= 3 / 255
    # The uint8 path writes exactly what quantising the float alpha writes.
    from matting_core.video.writers import quantize_alpha
    pha = frames[1][0]
    a = cv2.imread(AlphaPngWriter(str(tmp_path / "q")).write(0, quantize_alpha(pha)), cv2.IMREAD_UNCHANGED)
    b = cv2.imread(AlphaPngWriter(str(tmp_path / "f")).write(0, pha), cv2.IMREAD_UNCHANGED)
    assert np.array_equal(a, b)
    c = cv2.imread(AlphaPngWriter(str(tmp_path / "q16"), bits=16).write(0, quantize_alpha(pha)), cv2.IMREAD_UNCHANGED)
    assert c.dtype == np.uint16 and np.array_equal(c, a.astype(np.uint16) * 257)  # 255 -> 65535
    assert default_encoder_threads((512, 288), True) == 1
    assert default_encoder_threads((1920, 1080), True) == 0
    assert default_encoder_threads((512, 288), False) == 0


@pytest.mark.parametrize("size", [(176, 144), (175, 143)])
def test_webm_from_rgb_and_alpha_has_the_rgba_paths_planes(tmp_path, size):
    """write_rgb_alpha (what MatteOutputs writes) encodes the colour planes of the RGBA path and the alpha itself."""
    w, h = size
    pha, fgr = _frames(1, w, h)[0]
    pha8 = np.rint(pha * 255).astype(np.uint8)
    encoded: list[av.VideoFrame] = []
    video = rgba_webm_writer(str(tmp_path / "rgba.webm"), 25, (w, h))

    class Spy:  # the stream, recording the frames it is given
        def __init__(self, stream):
            self.stream = stream

        def __getattr__(self, name):
            return getattr(self.stream, name)

        def encode(self, frame=None):
            encoded.append(frame)
            return self.stream.encode(frame)

    video._stream = Spy(video._stream)
    video.write_rgb_alpha(fgr, pha8)
    video.close()
    planes = lambda f: [np.frombuffer(p, np.uint8).reshape(p.height, p.line_size)[:, :p.width] for p in f.planes]  # noqa: E731
    direct = planes(encoded[0])
    via_rgba = planes(av.VideoFrame.from_ndarray(to_rgba(fgr, pha8), format="rgba").reformat(format="yuva420p"))
    assert encoded[0].format.name == "yuva420p" and len(direct) == 4
    for mine, theirs in zip(direct[:3], via_rgba[:3]):
        assert mine.shape == theirs.shape and np.abs(mine.astype(int) - theirs).max() <= 1
    assert np.array_equal(direct[3], pha8)  # exact, where swscale's RGBA conversion moved some levels by one
    assert np.abs(via_rgba[3].astype(int) - pha8).max() <= 1
    alpha = next(read_alpha_video(str(tmp_path / "rgba.webm")))
    assert np.abs(alpha.astype(float) - pha8).mean() <= 3.0


def test_quantize_alpha_rounds_half_to_even_like_numpy():
    from matting_core.video.writers import quantize_alpha

    pha = np.concatenate([(np.arange(256) + 0.5) / 255, np.linspace(-0.2, 1.2, 5001), [0.0, 1.0]]).astype(np.float32)
    want = np.rint(np.clip(pha, 0.0, 1.0) * 255).astype(np.uint8)
    assert np.array_equal(quantize_alpha(pha[None], 8)[0], want)
    assert np.array_equal(quantize_alpha(pha[None].astype(np.float64), 8)[0],
                          np.rint(np.clip(pha.astype(np.float64), 0.0, 1.0) * 255).astype(np.uint8))
