"""Fake-motion synthesis on real photos: compositing equation, flow, non-rigid motion, shifts."""
from __future__ import annotations

import dataclasses
import subprocess
import sys

import numpy as np
import pytest

from matting_core.data.clips import decode_row, encode_clip
from matting_core.data.fakemotion import FakeMotionConfig, MotionConfig, clip_rng, synthesize_clip
from matting_core.data.sources import (BackgroundReader, PhotoCache, discover_backgrounds, discover_photos,
                                       pingpong_indices, validate_background)
from matting_core.flow import source_inside, warp
from tests.conftest import shared_path

CFG = FakeMotionConfig()


@pytest.fixture(scope="module")
def real_sources():
    photos, _ = discover_photos([str(shared_path("data", "photos", "p3m")),
                                 str(shared_path("data", "photos", "alphamatting"))])
    bgs, _ = discover_backgrounds([str(shared_path("data", "videos", "backgrounds"))])
    infos = [validate_background(b) for b in bgs]
    return photos, infos


def make_clips(real_sources, n, cfg=CFG, start=0):
    photos, infos = real_sources
    cache = PhotoCache(max_height=int(cfg.size[1] * 1.0))
    reader = BackgroundReader()
    cover = (int(cfg.size[0] * cfg.background_zoom), int(cfg.size[1] * cfg.background_zoom))
    for i in range(start, start + n):
        info = infos[i % len(infos)]
        bg = reader.read(info, (i * 37) % (info.frames - cfg.frames), cfg.frames, cover)
        yield synthesize_clip(cache.get(photos[(i * 7) % len(photos)]), bg, cfg, clip_rng(0, i))


def warp_error(clip, t):
    """(|warp(alpha_{t-1}, flow_t) - alpha_t| [H,W], bool [H,W] where flow_t is defined: alpha_t > 0 and
    its source inside frame t-1)."""
    prev, cur = clip.alpha[t - 1].astype(np.float32) / 255.0, clip.alpha[t].astype(np.float32) / 255.0
    return np.abs(warp(prev, clip.flow[t]) - cur), source_inside(clip.flow[t]) & (cur > 0)


def test_composite_equation_holds_on_decoded_frames(real_sources):
    errors = []
    for i, clip in enumerate(make_clips(real_sources, 6)):
        rec = decode_row(encode_clip(clip, i, 0, "p", "b", 0, jpeg_quality=95))
        a = rec.alpha[..., None]
        recon = a * rec.fgr / 255.0 + (1 - a) * rec.bgr / 255.0
        errors.append(np.abs(rec.frames / 255.0 - recon).mean())
        assert rec.frames.shape == (CFG.frames, CFG.size[1], CFG.size[0], 3)
        # alpha is stored losslessly, flow to 1/32 px
        assert np.array_equal(np.rint(rec.alpha * 255).astype(np.uint8), clip.alpha)
        assert np.abs(rec.flow - clip.flow).max() <= 1 / 64 + 1e-6
    assert max(errors) <= 4 / 255, errors


def test_flow_warps_previous_alpha_onto_current(real_sources):
    ratios = []
    for clip in make_clips(real_sources, 8):
        assert np.all(clip.flow[0] == 0)
        warped_err, still_err = [], []
        for t in range(1, CFG.frames):
            err, defined = warp_error(clip, t)
            assert np.all(clip.flow[t][clip.alpha[t] == 0] == 0), "flow must be zero where alpha is zero"
            warped_err.append(err[defined].mean())
            still_err.append(np.abs(clip.alpha[t - 1] / 255.0 - clip.alpha[t] / 255.0)[defined].mean())
        ratios.append(np.mean(warped_err) / np.mean(still_err))
    assert max(ratios) <= 0.5, ratios


def test_flow_is_as_right_at_the_frame_edges_as_inside(real_sources):
    # Portraits stand on the lower edge and shifted subjects cross the others: the motion and its
    # flow must be as exact in the outer pixels as elsewhere (no clamped copies there).
    cfg = dataclasses.replace(CFG, motion=MotionConfig(shift_probability=0.5))
    band = 6
    sums = {"border": [0.0, 0], "inside": [0.0, 0]}
    shifted = 0
    for clip in make_clips(real_sources, 12, cfg):
        shifted += clip.shifted
        for t in range(1, cfg.frames):
            err, defined = warp_error(clip, t)
            edge = np.ones_like(defined)
            edge[band:-band, band:-band] = False
            for name, mask in (("border", defined & edge), ("inside", defined & ~edge)):
                sums[name][0] += err[mask].sum()
                sums[name][1] += mask.sum()
    assert shifted >= 3 and sums["border"][1] >= 10_000, (shifted, sums)
    border, inside = (total / count for total, count in sums.values())
    assert border <= 1.5 * inside, f"border band error {border:.4f} vs inside {inside:.4f}"


def test_motion_is_not_rigid(real_sources):
    nonrigid = []
    for clip in make_clips(real_sources, 10, start=100):
        residuals = []
        for t in range(1, CFG.frames):
            ys, xs = np.nonzero(clip.alpha[t] > 0)
            flow = clip.flow[t][ys, xs].astype(np.float64)
            A = np.stack([xs, ys, np.ones_like(xs)], 1).astype(np.float64)
            coef, *_ = np.linalg.lstsq(A, flow, rcond=None)
            residuals.append(np.sqrt(((A @ coef - flow) ** 2).sum(1).mean()))
        nonrigid.append(np.mean(residuals) > 0.5)
    assert np.mean(nonrigid) >= 0.8, nonrigid


def test_about_a_third_of_clips_shift_out_of_frame_and_back(real_sources):
    small = dataclasses.replace(CFG, size=(128, 72))
    photos, infos = real_sources
    cache = PhotoCache(max_height=72)
    bg = BackgroundReader().read(infos[0], 0, small.frames, (148, 84))
    shifted = []
    for i in range(300):
        clip = synthesize_clip(cache.get(photos[i % 4]), bg, small, clip_rng(1, i))
        shifted.append(clip.shifted)
        if clip.shifted and sum(shifted) <= 5:
            # at the middle frame roughly half the subject has left the frame
            area = clip.alpha.reshape(small.frames, -1).astype(np.float64).sum(1)
            mid = area[small.frames // 2 - 1: small.frames // 2 + 1].min()
            assert mid < 0.8 * max(area[0], area[-1])
    frac = np.mean(shifted)
    assert 0.27 <= frac <= 0.40, frac


def test_same_seed_same_clip_and_different_index_differs(real_sources):
    a = next(make_clips(real_sources, 1, start=3))
    b = next(make_clips(real_sources, 1, start=3))
    c = next(make_clips(real_sources, 1, start=4))
    for name in ("frames", "fgr", "bgr", "alpha", "flow"):
        assert np.array_equal(getattr(a, name), getattr(b, name))
    assert not np.array_equal(a.frames, c.frames)


def test_no_shift_when_probability_zero(real_sources):
    cfg = dataclasses.replace(CFG, size=(128, 72), motion=MotionConfig(shift_probability=0.0))
    photos, infos = real_sources
    bg = BackgroundReader().read(infos[0], 0, cfg.frames, (148, 84))
    cache = PhotoCache(max_height=72)
    assert not any(synthesize_clip(cache.get(photos[0]), bg, cfg, clip_rng(0, i)).shifted for i in range(30))


def test_reading_clips_does_not_import_the_synthesizer():
    code = "import sys, matting_core.data.clips; print('matting_core.data.fakemotion' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_pingpong_plays_short_backgrounds_forward_then_backward():
    assert pingpong_indices(0, 8, 3) == [0, 1, 2, 1, 0, 1, 2, 1]
    assert pingpong_indices(5, 3, 100) == [5, 6, 7]
    assert pingpong_indices(0, 3, 1) == [0, 0, 0]


def test_short_background_is_read_pingpong(shared_data):
    info = validate_background(type("S", (), {"uri": str(shared_data / "broken" / "three-frames.mp4")})())
    assert info.frames == 3
    frames = BackgroundReader().read(info, 0, 8, (64, 48))
    assert frames.shape[0] == 8
    assert np.array_equal(frames[1], frames[3]) and np.array_equal(frames[0], frames[4])
    assert not np.array_equal(frames[0], frames[2])
