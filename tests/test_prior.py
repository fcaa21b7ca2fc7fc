"""Person-probability priors (selfie via LiteRT, DeepLabv3, constant) and the per-video PriorStream."""
from __future__ import annotations

import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest

from matting_core.prior import (prior_stream_from_spec, SELFIE_MODEL_NAME, ModelNotFoundError, PriorStream, find_selfie_model,
                                make_prior, model_cache_dir)

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
SELFIE = SHARED / "models" / SELFIE_MODEL_NAME
P3M = SHARED / "data" / "photos" / "p3m"
CARPHONE = SHARED / "data" / "videos" / "people" / "carphone.mp4"


@pytest.fixture
def selfie_cache(tmp_path, monkeypatch) -> Path:
    """A model cache holding the shared selfie model (as `matting fetch-models` would leave it)."""
    if not SELFIE.is_file():
        pytest.skip(f"{SELFIE} absent")
    cache = tmp_path / "models"
    cache.mkdir()
    shutil.copy(SELFIE, cache / SELFIE_MODEL_NAME)
    monkeypatch.setenv("MATTING_MODEL_CACHE", str(cache))
    return cache


def _p3m_pairs(n: int = 4):
    images = sorted((P3M / "image").glob("*.jpg"))[:n]
    if not images:
        pytest.skip(f"{P3M} absent")
    for path in images:
        image = cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)
        alpha = cv2.imread(str(P3M / "alpha" / (path.stem + ".png")), cv2.IMREAD_GRAYSCALE) / 255.0
        yield image, alpha


def test_cache_dir_and_missing_model_message(tmp_path, monkeypatch):
    monkeypatch.setenv("MATTING_MODEL_CACHE", str(tmp_path / "empty"))
    assert model_cache_dir() == tmp_path / "empty"
    with pytest.raises(ModelNotFoundError, match="matting fetch-models"):
        find_selfie_model()
    with pytest.raises(ModelNotFoundError, match="MATTING_MODEL_CACHE"):
        make_prior("selfie")
    monkeypatch.delenv("MATTING_MODEL_CACHE")
    assert model_cache_dir() == Path.home() / ".cache" / "matting" / "models"


def test_selfie_prior_segments_people(selfie_cache):
    prior = make_prior()  # the default backend, from the cache
    assert prior.spec == {"backend": "selfie", "weights": "default", "input_size": [256, 144]}
    ious = []
    for image, alpha in _p3m_pairs():
        prob = prior(image)
        assert prob.shape == alpha.shape and prob.dtype == np.float32
        assert prob.min() >= 0 and prob.max() <= 1
        ious.append(((prob > 0.5) & (alpha > 0.5)).sum() / ((prob > 0.5) | (alpha > 0.5)).sum())
    assert np.mean(ious) > 0.85
    rebuilt = make_prior(**prior.spec)
    np.testing.assert_array_equal(rebuilt(image), prob)


def test_selfie_explicit_path_and_bad_input(tmp_path):
    if not SELFIE.is_file():
        pytest.skip(f"{SELFIE} absent")
    prior = make_prior("selfie", weights=str(SELFIE))
    assert prior(np.zeros((50, 70, 3), np.uint8)).shape == (50, 70)
    with pytest.raises(ValueError, match="uint8"):
        prior(np.zeros((50, 70), np.float32))
    with pytest.raises(ModelNotFoundError, match="nope.tflite"):
        make_prior("selfie", weights=str(tmp_path / "nope.tflite"))


def test_deeplab_none_is_deterministic_frozen_and_rebuildable():
    frame = np.random.default_rng(0).integers(0, 255, (72, 128, 3), dtype=np.uint8)
    prior = make_prior("deeplabv3", weights="none", size=64)
    assert prior.spec == {"backend": "deeplabv3", "weights": "none", "arch": "mobilenet_v3_large", "size": 64}
    assert not prior.net.training
    assert not any(p.requires_grad for p in prior.net.parameters())
    prob = prior(frame)
    assert prob.shape == (72, 128) and prob.dtype == np.float32
    assert 0 <= prob.min() and prob.max() <= 1 and prob.std() > 0
    np.testing.assert_array_equal(make_prior(**prior.spec)(frame), prob)


def test_deeplab_weights_from_path_and_clear_failures(tmp_path, monkeypatch):
    import torch

    frame = np.random.default_rng(1).integers(0, 255, (64, 96, 3), dtype=np.uint8)
    source = make_prior("deeplabv3", weights="none", size=64)
    with torch.no_grad():
        source.net.classifier[-1].bias[15] += 3.0  # differ from the seeded weights
    path = tmp_path / "dl.pt"
    torch.save(source.net.state_dict(), path)
    loaded = make_prior("deeplabv3", weights=str(path), size=64)
    np.testing.assert_allclose(loaded(frame), source(frame), atol=1e-6)
    assert not np.allclose(loaded(frame), make_prior("deeplabv3", weights="none", size=64)(frame))

    old_hub = torch.hub.get_dir()
    torch.hub.set_dir(str(tmp_path / "hub"))
    try:
        with pytest.raises(ModelNotFoundError, match="torch hub cache"):
            make_prior("deeplabv3", weights="default")
    finally:
        torch.hub.set_dir(old_hub)
    with pytest.raises(ModelNotFoundError, match="missing.pt"):
        make_prior("deeplabv3", weights=str(tmp_path / "missing.pt"))
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"garbage")
    with pytest.raises(ValueError, match="bad.pt"):
        make_prior("deeplabv3", weights=str(bad))
    with pytest.raises(ValueError, match="arch"):
        make_prior("deeplabv3", weights="none", arch="vgg")


def test_constant_prior_and_unknown_backend():
    prior = make_prior("none", value=0.25)
    out = prior(np.zeros((5, 7, 3), np.uint8))
    assert out.shape == (5, 7) and out.dtype == np.float32 and np.all(out == 0.25)
    assert make_prior(**prior.spec).spec == {"backend": "none", "value": 0.25}
    with pytest.raises(ValueError, match="unknown prior backend"):
        make_prior("sam")


def test_prior_stream_key_frames_follow_the_video():
    if not SELFIE.is_file():
        pytest.skip(f"{SELFIE} absent")
    import av

    if not CARPHONE.is_file():
        pytest.skip(f"{CARPHONE} absent")
    with av.open(str(CARPHONE)) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)][:60]
    prior = make_prior("selfie", weights=str(SELFIE))
    per_frame = np.stack([prior(f) for f in frames])
    stream = PriorStream(prior, key_interval=3)
    out = np.stack([stream(f) for f in frames])
    assert stream.prior_calls == 20
    assert out.shape == per_frame.shape and out.dtype == np.float32
    # carried frames stay close to the per-frame prior (measured about 10 on this video)
    assert 1e3 * np.abs(out - per_frame).mean() < 15
    stream.reset()
    np.testing.assert_array_equal(stream(frames[10]), per_frame[10])  # fresh video: no history
    rebuilt = prior_stream_from_spec(stream.spec)
    assert rebuilt.spec == stream.spec
