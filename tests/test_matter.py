"""Streaming matting: Matter equals manual per-frame network calls, holds no past frames, resets."""
from __future__ import annotations

import gc
import inspect
import itertools
import weakref

import numpy as np
import pytest
import torch

from matting_core.flow import TemporalSmoother
from matting_core.inference.matter import Matter, auto_downsample_ratio
from matting_core.model import matting_net
from matting_core.prior import ConstantPrior, PriorStream, SelfiePrior, prior_stream_from_spec
from matting_core.runtime import resolve_device
from matting_core.video import iter_frames
from tests.nets import SELFIE, STREET, carphone_frames, lively, lively_net, selfie_stream

@pytest.fixture(scope="module")
def frames():
    return carphone_frames(6)


@pytest.fixture(scope="module")
def net():
    return lively_net()



def test_streaming_equals_manual_per_frame_calls(frames, net):
    matter = Matter(net, selfie_stream(), device="cpu")
    results = list(matter.run(frames))
    assert [r.index for r in results] == list(range(len(frames)))

    stream, state = selfie_stream(), None
    for frame, res in zip(frames, results):
        prior = stream(frame)
        src = torch.from_numpy(frame).permute(2, 0, 1)[None].float() / 255
        with torch.inference_mode():
            pha, fgr, state = net(src, torch.from_numpy(prior)[None, None], state)
        assert res.pha.dtype == np.float32 and res.pha.shape == frame.shape[:2]
        assert res.fgr.dtype == np.uint8 and res.fgr.shape == frame.shape
        np.testing.assert_allclose(res.prior, prior, atol=1e-6)
        np.testing.assert_allclose(res.pha, pha[0, 0].numpy(), atol=1e-5)
        expect_fgr = (fgr[0].permute(1, 2, 0).clamp(0, 1) * 255).round().numpy()
        assert np.abs(res.fgr.astype(float) - expect_fgr).max() <= 1
    # The recurrent state was carried frame to frame exactly as the manual loop carried it.
    assert len(matter.state) == len(state)
    for mine, ref in zip(matter.state, state):
        torch.testing.assert_close(mine, ref, atol=1e-5, rtol=0)
    assert max(float(t.abs().max()) for t in state) > 0
    # The state matters: matting each frame from a fresh state gives other mattes.
    stateless = [Matter(net, selfie_stream(), device="cpu").step(f).pha for f in frames[:3]]
    assert max(float(np.abs(x - r.pha).max()) for x, r in zip(stateless[1:], results[1:3])) > 1e-3

    timings = matter.timer.summary()
    assert timings["frames"] == len(frames)
    assert {"prior", "smoothing", "net"} <= set(timings["ms_per_frame"])
    assert all(v > 0 for v in timings["ms_per_frame"].values())
    # The next video's timings are its own (an infer actor mattes many videos with one Matter).
    list(matter.run(frames[:2]))
    again = matter.timer.summary()
    assert again["frames"] == 2 and again["total_s"]["net"] < timings["total_s"]["net"]


def test_run_is_lazy_and_keeps_no_frames(frames, net):
    matter = Matter(net, PriorStream(ConstantPrior(0.5), TemporalSmoother()), device="cpu")
    consumed = []
    refs = []

    def source():
        for i in range(5):
            frame = frames[i].copy()
            refs.append(weakref.ref(frame))
            consumed.append(i)
            yield frame
            del frame

    gen = matter.run(source())
    assert inspect.isgenerator(gen)
    assert consumed == []  # nothing is read before the first result is asked for
    first = next(gen)
    assert consumed == [0] and first.index == 0
    next(gen)
    next(gen)
    assert consumed == [0, 1, 2]
    gc.collect()
    # Frames already matted are not held by the Matter (only the derived histories are).
    assert refs[0]() is None and refs[1]() is None


def test_reset_between_videos_and_on_size_change(frames, net):
    matter = Matter(net, PriorStream(ConstantPrior(0.5), TemporalSmoother()), device="cpu",
                    smooth_alpha=True)
    a = [r.pha for r in matter.run(frames[:3])]
    b = [r.pha for r in matter.run(frames[:3])]
    for x, y in zip(a, b):
        np.testing.assert_allclose(x, y, atol=1e-6)  # the CPU kernels' float order varies by ~1e-8
    # Without a reset the same frames meet the state the last ones left: other mattes.
    carried = [matter.step(f).pha for f in frames[:3]]
    assert float(np.abs(carried[0] - a[0]).max()) > 1e-3
    # A frame of another size starts afresh instead of failing on the old recurrent state.
    small = np.ascontiguousarray(frames[3][:96, :128])
    fresh = Matter(net, PriorStream(ConstantPrior(0.5), TemporalSmoother()), device="cpu",
                   smooth_alpha=True).step(small)
    res = matter.step(small)
    assert res.pha.shape == (96, 128)
    np.testing.assert_allclose(res.pha, fresh.pha, atol=1e-6)
    assert "alpha_smoothing" in matter.timer.seconds


def test_prior_comes_from_checkpoint_config_with_overrides(net):
    cfg_net = matting_net(backbone_weights="none", prior={"backend": "none", "value": 0.25})
    matter = Matter(cfg_net, device="cpu")
    assert isinstance(matter.prior_stream.prior.inner, ConstantPrior)
    assert matter.prior_stream.prior.inner.value == 0.25
    assert matter.spec["prior_stream"]["prior"] == {"backend": "none", "value": 0.25}
    assert matter.prior_stream.smoother is not None  # smoothing is on unless turned off
    if SELFIE.exists():
        stream = prior_stream_from_spec(cfg_net.config["prior"], backend="selfie", weights=str(SELFIE))
        assert isinstance(stream.prior, SelfiePrior)
    off = prior_stream_from_spec({"prior": {"backend": "none"}, "smoother": {"new_weight": 0.5},
                                  "key_interval": 1}, smooth=False)
    assert off.smoother is None


def test_device_and_downsample_choices(net):
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA"):
            resolve_device("cuda")
    with pytest.raises(ValueError, match="downsample_ratio"):
        Matter(net, PriorStream(ConstantPrior()), device="cpu", downsample_ratio=1.5)
    assert auto_downsample_ratio(288, 512) == 1.0
    assert auto_downsample_ratio(1080, 1920) == pytest.approx(512 / 1920)


def test_large_frame_goes_through_the_downsample_path(net):
    if not STREET.exists():
        pytest.skip(f"{STREET} absent")
    frame = next(iter_frames(str(STREET)))
    matter = Matter(net, PriorStream(ConstantPrior(0.5)), device="cpu")
    res = matter.step(frame)
    assert matter.ratio == pytest.approx(512 / 1920)
    assert res.pha.shape == (1080, 1920) and res.fgr.shape == (1080, 1920, 3)
    assert 0.0 <= res.pha.min() and res.pha.max() <= 1.0


@pytest.mark.parametrize("fitted", [False, True], ids=["as-built", "fitted-radius-and-curve"])
def test_cpu_refiner_equals_the_networks_own_downsample_path(net, fitted):
    """On the CPU, below full resolution, the refiner runs with OpenCV (refine_frame): the mattes of net(..., downsample_ratio),
    with the refiner radius and output curve training fits (the curve after the refiner, as in the net)."""
    if not STREET.exists():
        pytest.skip(f"{STREET} absent")
    import copy

    from matting_core.video.writers import quantize_alpha

    if fitted:
        net = copy.deepcopy(net)
        net.set_refine_radius(3)
        net.set_output_curve(3.0, 0.45)

    frames = list(itertools.islice(iter_frames(str(STREET)), 3))
    matter = Matter(net, PriorStream(ConstantPrior(0.5)), device="cpu")
    results = list(matter.run(frames))
    assert matter.spec["refiner"] == "opencv" and matter.ratio < 1
    state = None
    for frame, res in zip(frames, results):
        src = torch.from_numpy(frame).permute(2, 0, 1)[None].float() / 255
        prior = torch.full((1, 1, *frame.shape[:2]), 0.5)
        with torch.inference_mode():
            pha, fgr, state = matter.net(src, prior, state, downsample_ratio=matter.ratio)
        assert res.pha.dtype == np.float32 and res.fgr.dtype == np.uint8 and res.fgr.shape == frame.shape
        pha8 = quantize_alpha(pha[0, 0].numpy())
        assert np.abs(quantize_alpha(res.pha).astype(int) - pha8).max() <= 1
        fgr8 = (fgr[0].permute(1, 2, 0) * 255).round().numpy()
        diff = np.abs(res.fgr - fgr8)
        assert diff.max() <= 2 and (diff > 0).mean() < 1e-3  # float rounding of the fit, at a few pixels
    for mine, ref in zip(matter.state, state):
        torch.testing.assert_close(mine, ref, atol=1e-5, rtol=0)


def test_prior_runs_at_the_networks_working_size(net):
    """Below full resolution the prior stream sees the frame at the network's size; the prior barely changes."""
    if not STREET.is_dir():
        pytest.skip(f"{STREET} absent")
    import cv2

    files = sorted(STREET.glob("*.jpg"))[:5]
    video = [cv2.cvtColor(cv2.imread(str(f)), cv2.COLOR_BGR2RGB) for f in files]
    h, w = video[0].shape[:2]
    fast = Matter(net, selfie_stream(), device="cpu", downsample_ratio=0.5, smooth_alpha=True)
    full = Matter(net, selfie_stream(), device="cpu", downsample_ratio=0.5, prior_at_work_size=False)
    a, b = list(fast.run(video)), list(full.run(video))
    assert fast.spec["prior_size"] == [w // 2, h // 2] and full.spec["prior_size"] is None
    assert fast.prior_stream.smoother._size == (h // 2, w // 2)  # smoothing ran at the small size
    for x, y in zip(a, b):
        assert x.prior.shape == x.pha.shape == (h, w)
        assert np.abs(x.prior - y.prior).mean() < 0.01
        assert np.abs(x.pha - y.pha).mean() < 0.01
    # The person is found either way: the prior is high where the full-resolution one is confident.
    confident = b[-1].prior > 0.9
    assert confident.any() and a[-1].prior[confident].mean() > 0.85
    # Full-resolution frames are matted as before when the network runs at full size.
    assert Matter(net, selfie_stream(), device="cpu", downsample_ratio=1.0).spec["prior_size"] is None


def test_matter_changes_nothing_it_is_given(frames):
    """A model in training and a prior stream come back as they were; process thread counts are untouched."""
    import cv2

    torch.manual_seed(0)
    model = lively(matting_net(backbone_weights="none")).train()
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    stream, reference = (PriorStream(_RedPrior(), TemporalSmoother()) for _ in range(2))
    stream(frames[0]), reference(frames[0])  # both hold the history of one frame
    prior, smoother = stream.prior, stream.smoother
    threads, cv_threads = torch.get_num_threads(), cv2.getNumThreads()
    torch.set_num_threads(1)
    cv2.setNumThreads(2)
    try:
        matter = Matter(model, stream, device="cpu", smooth_alpha=True)
        list(matter.run(frames[:3]))
        assert torch.get_num_threads() == 1 and cv2.getNumThreads() == 2
    finally:
        torch.set_num_threads(threads)
        cv2.setNumThreads(cv_threads)
    assert model.training and all(m.training for m in model.modules())
    assert all(p.requires_grad for p in model.parameters())
    assert not getattr(model, "inference_optimized", False)
    for k, v in model.state_dict().items():
        assert torch.equal(v, weights[k]), k
    assert stream.prior is prior and stream.smoother is smoother and matter.prior_stream is not stream
    # The stream's smoothing history is where it was: it goes on exactly as the untouched one.
    np.testing.assert_array_equal(stream(frames[4]), reference(frames[4]))


class _RedPrior(ConstantPrior):
    """A prior that varies with the frame (its red channel), so that smoothing history shows."""

    def __call__(self, frame: np.ndarray) -> np.ndarray:
        return frame[..., 0].astype(np.float32) / 255.0
