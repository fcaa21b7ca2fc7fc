"""`matting make-benchmark` on the real sample photos and background videos."""
from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from matting_core.data import benchmark as B

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
DATA = SHARED / "data"
PHOTOS = [DATA / "photos" / "alphamatting", DATA / "photos" / "p3m"]
BACKGROUNDS = DATA / "videos" / "backgrounds"
SIZE, FRAMES, CLIPS = (160, 96), 8, 2


def run_cli(argv: list[str]) -> int:
    """Run one subcommand through the real `matting` entry point; returns the exit status."""
    from pipelines.cli import main

    return main(argv)


def _read(path: Path, grey: bool = False) -> np.ndarray:
    img = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    assert img is not None, path
    return img if grey else cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


@pytest.fixture(scope="module")
def bench(tmp_path_factory) -> Path:
    if not all(p.exists() for p in PHOTOS + [BACKGROUNDS]):
        pytest.skip(f"sample data absent: {DATA}")
    out = tmp_path_factory.mktemp("bench")
    broken = out.parent / "broken_bg"
    broken.mkdir(exist_ok=True)
    (broken / "corrupt.mp4").write_bytes(b"not a video at all")
    rc = run_cli(["make-benchmark", "--photos", str(PHOTOS[0]), "--photos", str(PHOTOS[1]),
                  "--backgrounds", str(BACKGROUNDS), "--backgrounds", str(broken),
                  "--out", str(out), "--clips", str(CLIPS), "--frames", str(FRAMES),
                  "--size", f"{SIZE[0]}x{SIZE[1]}", "--seed", "3"])
    assert rc == 0  # a rejected source is listed but does not make the run partial
    return out


def test_layout_and_manifest(bench):
    manifest = json.loads((bench / "benchmark.json").read_text())
    assert manifest["config"]["size"] == list(SIZE) and manifest["config"]["seed"] == 3
    assert [c["name"] for c in manifest["clips"]] == ["0000", "0001"]
    rejected = [json.loads(line) for line in (bench / "errors.jsonl").read_text().splitlines()]
    assert any("corrupt.mp4" in r["uri"] for r in rejected)
    for clip in manifest["clips"]:
        for kind in ("com", "pha", "fgr", "bgr"):
            files = sorted((bench / clip["name"] / kind).glob("*.png"))
            assert [f.name for f in files] == [f"{t:04d}.png" for t in range(FRAMES)]
        pha = _read(bench / clip["name"] / "pha" / "0000.png", grey=True)
        assert pha.dtype == np.uint8 and pha.shape == (SIZE[1], SIZE[0])
        assert 0.03 < (pha > 127).mean() < 0.9  # the subject is in the frame, not the whole frame


def test_compositing_equation_holds_on_stored_pngs(bench):
    for clip in ("0000", "0001"):
        for t in (0, FRAMES - 1):
            d = bench / clip
            a = _read(d / "pha" / f"{t:04d}.png", grey=True).astype(np.float64)[..., None] / 255
            f, b, c = (_read(d / k / f"{t:04d}.png").astype(np.float64) for k in ("fgr", "bgr", "com"))
            assert np.abs(c - (a * f + (1 - a) * b)).max() <= 0.5 + 1e-6  # only the rounding of com


def test_foreground_motion_is_eased_affine_and_background_moves_independently(bench):
    manifest = json.loads((bench / "benchmark.json").read_text())
    for clip in manifest["clips"]:
        fg = np.asarray(clip["fg_affine"])  # [T,2,3] photo -> frame
        bg = np.asarray(clip["bg_affine"])
        pha = [_read(bench / clip["name"] / "pha" / f"{t:04d}.png", grey=True).astype(np.float32) / 255
               for t in range(FRAMES)]
        h, w = pha[0].shape
        for t in range(1, FRAMES):
            # frame t-1 -> frame t is the affine A_t A_{t-1}^-1: warping alpha_{t-1} by it gives alpha_t.
            prev = np.vstack([fg[t - 1], [0, 0, 1]])
            cur = np.vstack([fg[t], [0, 0, 1]])
            step = (cur @ np.linalg.inv(prev))[:2]
            warped = cv2.warpAffine(pha[t - 1], step, (w, h), flags=cv2.INTER_LINEAR)
            residual = np.abs(warped - pha[t]).mean()
            unwarped = np.abs(pha[t - 1] - pha[t]).mean()
            assert residual < 0.01
            assert residual < unwarped or unwarped < 1e-3
        # Eased: the subject's centre moves less in the first and last moving steps than at its fastest.
        centre = np.array([m @ [0, 0, 1] for m in fg])
        speed = np.linalg.norm(np.diff(centre, axis=0), axis=1)
        moving = np.flatnonzero(speed > 1e-9)
        if speed.max() > 0.5:
            assert speed[moving[0]] < 0.5 * speed.max() and speed[moving[-1]] < 0.5 * speed.max()
        # The background follows its own camera, not the foreground's trajectory ...
        assert not np.allclose(np.diff(fg[:, :, 2], axis=0), np.diff(bg[:, :, 2], axis=0))
        # ... at constant speed: the crop window (frame -> background: scale k, top-left corner) moves linearly.
        window = np.array([np.linalg.inv(np.vstack([m, [0, 0, 1]]))[:2] for m in bg])
        k, top_left = window[:, 0, 0], window[:, :, 2]
        assert not np.allclose(window[0], window[-1])  # the background really moves
        np.testing.assert_allclose(np.diff(k, 2), 0, atol=1e-4)
        np.testing.assert_allclose(np.diff(top_left, 2, axis=0), 0, atol=1e-3)


def _pha(bench: Path, name: str, frames: int) -> np.ndarray:
    return np.stack([_read(bench / name / "pha" / f"{t:04d}.png", grey=True) for t in range(frames)])


def _still_steps(pha: np.ndarray) -> np.ndarray:
    """Which frame steps leave the subject's alpha unchanged (bool [T-1])."""
    return np.array([np.array_equal(a, b) for a, b in zip(pha[:-1], pha[1:])])


def test_subject_holds_still_for_the_still_share(bench):
    manifest = json.loads((bench / "benchmark.json").read_text())
    assert manifest["config"]["still_share"] == 0.3  # on by default
    expected = B.still_steps(FRAMES, 0.3)
    assert expected == 2
    for clip in manifest["clips"]:
        still = _still_steps(_pha(bench, clip["name"], FRAMES))
        fg = np.asarray(clip["fg_affine"])
        assert still.sum() == expected  # alpha identical across every held step, and only there
        # the pauses sit before and after one continuous move
        before = int(np.argmin(still)) if not still.all() else len(still)
        assert still[:before].all() and not still[before:len(still) - (expected - before)].any()
        assert np.allclose(fg[:before + 1], fg[0]) and np.allclose(fg[len(fg) - 1 - (expected - before):], fg[-1])


def test_still_share_zero_keeps_the_subject_moving(tmp_path):
    if not all(p.exists() for p in PHOTOS + [BACKGROUNDS]):
        pytest.skip(f"sample data absent: {DATA}")
    out = tmp_path / "moving"
    argv = ["make-benchmark", "--photos", str(PHOTOS[1]), "--backgrounds", str(BACKGROUNDS), "--out", str(out),
            "--clips", "1", "--frames", "6", "--size", "96x64", "--seed", "5"]
    assert run_cli(argv + ["--still-share", "1.0"]) == 2
    assert run_cli(argv + ["--still-share", "0"]) == 0
    manifest = json.loads((out / "benchmark.json").read_text())
    assert manifest["config"]["still_share"] == 0.0
    assert not _still_steps(_pha(out, "0000", 6)).any()
    # 0 is the old trajectory: eased over the whole clip, no hold
    fg = np.asarray(manifest["clips"][0]["fg_affine"])
    scale = np.hypot(fg[:, 0, 0], fg[:, 1, 0])
    np.testing.assert_allclose(scale, scale[0] + (scale[-1] - scale[0]) * B.smoothstep(np.arange(6) / 5), atol=1e-5)


def test_same_seed_gives_the_same_clip(bench, tmp_path):
    from matting_core.data.sources import (BackgroundReader, discover_backgrounds, discover_photos, load_photo,
                                      validate_background, validate_photo)

    photos, _ = discover_photos([str(PHOTOS[0])])
    infos = sorted((validate_photo(p) for p in photos[:3]), key=lambda i: i.image)
    bgs, _ = discover_backgrounds([str(BACKGROUNDS)])
    bg_infos = sorted((validate_background(b) for b in bgs), key=lambda i: i.uri)
    cfg = B.BenchmarkConfig(clips=2, frames=4, size=(96, 64), seed=11)
    plans = B.plan_clips(infos, bg_infos, cfg)
    assert plans == B.plan_clips(infos, bg_infos, cfg)
    cache = {}
    loader = lambda info: cache.setdefault(info.image, load_photo(info, max_height=70))
    first = B.make_clip(plans[0], cfg, BackgroundReader(), loader)
    second = B.make_clip(plans[0], cfg, BackgroundReader(), loader)
    assert np.array_equal(first.com, second.com) and np.array_equal(first.pha, second.pha)
    other = B.make_clip(plans[0], B.BenchmarkConfig(clips=2, frames=4, size=(96, 64), seed=12), BackgroundReader(), loader)
    assert not np.array_equal(first.pha, other.pha)


def test_rerun_with_other_config_is_refused_and_same_config_resumes(bench):
    mtime = (bench / "0000" / "com" / "0000.png").stat().st_mtime_ns
    common = ["make-benchmark", "--photos", str(PHOTOS[0]), "--photos", str(PHOTOS[1]),
              "--backgrounds", str(BACKGROUNDS), "--out", str(bench), "--clips", str(CLIPS),
              "--size", f"{SIZE[0]}x{SIZE[1]}", "--seed", "3"]
    assert run_cli(common + ["--frames", str(FRAMES + 1)]) == 2
    assert run_cli(common + ["--frames", str(FRAMES)]) == 0
    assert (bench / "0000" / "com" / "0000.png").stat().st_mtime_ns == mtime  # resumed, not rewritten


def test_an_output_in_use_by_another_run_is_refused_and_freed_after(tmp_path, capsys):
    from tests.test_output_lock import held_then_killed

    if not (PHOTOS[1].exists() and BACKGROUNDS.exists()):
        pytest.skip(f"sample data absent: {DATA}")
    out = tmp_path / "locked"
    args = ["make-benchmark", "--photos", str(PHOTOS[1]), "--backgrounds", str(BACKGROUNDS), "--out", str(out),
            "--clips", "1", "--frames", "3", "--size", f"{SIZE[0]}x{SIZE[1]}"]
    with held_then_killed(str(out)) as other:
        assert run_cli(args) == 2
        err = capsys.readouterr().err
        assert "in use by another run" in err and f"pid {other.pid}" in err, err
        assert not (out / "0000").exists() and not (out / "benchmark.json").exists()  # refused before any work
    assert run_cli(args) == 0  # the killed holder's lock is taken over
    assert (out / "0000" / "pha" / "0002.png").is_file() and not (out / "_lock.json").exists()


def test_no_valid_source_fails(tmp_path):
    (tmp_path / "photos").mkdir()
    (tmp_path / "bg").mkdir()
    (tmp_path / "bg" / "x.mp4").write_bytes(b"junk")
    assert run_cli(["make-benchmark", "--photos", str(tmp_path / "photos"), "--backgrounds", str(tmp_path / "bg"),
                    "--out", str(tmp_path / "out"), "--clips", "1", "--frames", "3"]) == 1
    assert run_cli(["make-benchmark", "--photos", str(tmp_path / "photos"), "--out", str(tmp_path / "o")]) == 2


def test_smoothstep_and_pose_matrix():
    assert B.smoothstep(0.0) == 0.0 and B.smoothstep(1.0) == 1.0 and B.smoothstep(0.5) == 0.5
    m = B.pose_matrix(B.Pose(scale=2.0, angle=90.0, cx=50.0, cy=40.0), (11, 21))
    centre = m @ [10, 5, 1]
    assert np.allclose(centre, [50, 40])
    assert np.allclose(m @ [11, 5, 1] - centre, [0, 2])  # +x in the photo -> +y (rotated 90 deg, scaled 2)


def _affine_fit_residual(flow: np.ndarray, mask: np.ndarray) -> float:
    """Mean distance between a flow field and its least-squares affine fit over `mask` (pixels)."""
    ys, xs = np.nonzero(mask)
    A = np.stack([xs, ys, np.ones_like(xs)], 1).astype(np.float64)
    target = flow[ys, xs].astype(np.float64)
    coef, *_ = np.linalg.lstsq(A, target, rcond=None)
    return float(np.linalg.norm(A @ coef - target, axis=1).mean())


def test_benchmark_motion_is_affine_unlike_the_fake_motion_generator():
    from matting_core.data.fakemotion import FakeMotionConfig, clip_rng, synthesize_clip
    from matting_core.data.sources import Photo

    rng = np.random.default_rng(0)
    h, w = 60, 40
    alpha = np.zeros((h, w), np.float32)
    cv2.ellipse(alpha, (20, 30), (15, 26), 0, 0, 360, 1.0, -1)
    fgr = cv2.GaussianBlur(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), (0, 0), 2)
    photo = Photo("synthetic", fgr, alpha, fgr, touches_bottom=False)
    size, frames = (128, 96), 6
    bg = np.stack([cv2.GaussianBlur(rng.integers(0, 256, (120, 160, 3), dtype=np.uint8), (0, 0), 3)
                   for _ in range(frames)])

    # Ours: the foreground's backward flow (frame t pixel -> frame t-1) is A_{t-1} A_t^-1, affine by construction.
    fg = B.foreground_track(B.Pose(1.0, -3, 50, 48), B.Pose(1.15, 3, 80, 46), frames, alpha.shape)
    ys, xs = np.mgrid[0:size[1], 0:size[0]]
    ours = []
    for t in range(1, frames):
        back = (np.vstack([fg[t - 1], [0, 0, 1]]) @ np.linalg.inv(np.vstack([fg[t], [0, 0, 1]])))[:2]
        src = np.stack([xs, ys, np.ones_like(xs)], -1) @ back.T
        flow = (src - np.stack([xs, ys], -1)).astype(np.float32)
        clip = B.composite_clip(photo, bg, fg, B.background_track(rng, frames, bg.shape[1:3], B.BenchmarkConfig(size=size)), size)
        ours.append(_affine_fit_residual(flow, clip.pha[t] > 0))
    assert max(ours) < 1e-6

    # The generator's ground-truth flow of the foreground is not one affine map per frame.
    fake = synthesize_clip(photo, bg, FakeMotionConfig(frames=frames, size=size), clip_rng(0, 0))
    theirs = [_affine_fit_residual(fake.flow[t], fake.alpha[t] > 0) for t in range(1, frames)]
    assert max(theirs) > 0.05
