"""Matter.run with several frames per network call and the prior stream ahead in a thread:
the same results as the one-frame streaming path, errors and early closes handled, CPU defaults."""
from __future__ import annotations

import json
import threading

import cv2
import numpy as np
import pytest
import torch

from matting_core.flow import TemporalSmoother
from matting_core.inference.matter import Matter
from matting_core.model import save_checkpoint
from matting_core.prior import ConstantPrior, PriorStream
from tests.nets import STREET, carphone_frames, lively_net, selfie_stream


@pytest.fixture(scope="module")
def frames():
    return carphone_frames(10)


@pytest.fixture(scope="module")
def net():
    return lively_net()


def _frames_per_call(matter: Matter) -> list[int]:
    """Records, on the real network, how many frames each call of `matter` gets."""
    calls: list[int] = []
    matter.net.register_forward_pre_hook(lambda _, args: calls.append(args[0].shape[1] if args[0].dim() == 5 else 1))
    return calls


def _prior_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "matte-prior"]


def _assert_same(batched, streamed):
    assert [r.index for r in batched] == [r.index for r in streamed]
    for b, s in zip(batched, streamed):
        np.testing.assert_allclose(b.prior, s.prior, atol=1e-6)
        assert float(np.abs(b.pha - s.pha).max()) < 1e-4
        assert np.abs(b.fgr.astype(int) - s.fgr).max() <= 1


@pytest.mark.parametrize("frames_per_call,ratio", [(3, None), (4, 0.5)])
def test_batched_equals_streaming(frames, net, frames_per_call, ratio):
    """T frames per call (10 frames: the last call is shorter), alpha smoothing on: the one-frame path's results."""
    options = dict(device="cpu", smooth_alpha=True, downsample_ratio=ratio)
    streaming = Matter(net, selfie_stream(), frames_per_call=1, **options)
    batched = Matter(net, selfie_stream(), frames_per_call=frames_per_call, **options)
    calls = _frames_per_call(batched)
    a, b = list(streaming.run(frames)), list(batched.run(frames))
    full, rest = divmod(len(frames), frames_per_call)
    assert calls == [frames_per_call] * full + [rest]
    _assert_same(b, a)
    # The recurrent state is carried from call to call as from frame to frame.
    for mine, ref in zip(batched.state, streaming.state):
        torch.testing.assert_close(mine, ref, atol=1e-4, rtol=0)
    # Not trivially equal: the state matters for this net (a fresh state on the last frame differs).
    alone = Matter(net, selfie_stream(), **options).step(frames[-1]).pha
    assert float(np.abs(alone - a[-1].pha).max()) > 1e-3
    assert batched.timer.frames == len(frames) and {"prior", "smoothing", "net", "alpha_smoothing"} <= set(
        batched.timer.seconds)


def test_size_change_inside_a_batch_starts_afresh(frames, net):
    """A frame of another size ends the call before it and starts a new state, as step() does."""
    small = [np.ascontiguousarray(f[:96, :128]) for f in frames[5:]]
    video = frames[:5] + small
    streaming = Matter(net, PriorStream(ConstantPrior(0.5), TemporalSmoother()), device="cpu", smooth_alpha=True)
    batched = Matter(net, PriorStream(ConstantPrior(0.5), TemporalSmoother()), device="cpu", smooth_alpha=True,
                     frames_per_call=3, prior_ahead=True)
    calls = _frames_per_call(batched)
    a, b = list(streaming.run(video)), list(batched.run(video))
    assert calls == [3, 2, 3, 2]
    _assert_same(b, a)
    assert [r.index for r in b] == [0, 1, 2, 3, 4, 0, 1, 2, 3, 4]
    fresh = list(Matter(net, PriorStream(ConstantPrior(0.5), TemporalSmoother()), device="cpu",
                        smooth_alpha=True).run(small))
    _assert_same(b[5:], fresh)


@pytest.mark.parametrize("frames_per_call", [1, 3])
def test_prior_ahead_equals_sequential(frames, net, frames_per_call):
    """The prior stream in a thread gives the same results in the same order, and the thread ends with the video."""
    before = _prior_threads()
    streaming = Matter(net, selfie_stream(), device="cpu", frames_per_call=1, prior_ahead=False)
    ahead = Matter(net, selfie_stream(), device="cpu", frames_per_call=frames_per_call, prior_ahead=True)
    a = list(streaming.run(frames))
    gen = ahead.run(frames)
    b = [next(gen)]
    assert len(_prior_threads()) == len(before) + 1  # the priors are computed in their own thread
    b += list(gen)
    _assert_same(b, a)
    assert _prior_threads() == before
    assert {"prior", "smoothing", "net"} <= set(ahead.timer.seconds) and ahead.timer.frames == len(frames)


class _PriorBroke(RuntimeError):
    pass


class _BreaksOn(ConstantPrior):
    """A prior (the red channel) that fails on the video's `k`-th frame."""

    def __init__(self, k: int):
        super().__init__(0.5)
        self.k, self.calls = k, 0

    def __call__(self, frame: np.ndarray) -> np.ndarray:
        self.calls += 1
        if self.calls == self.k + 1:
            raise _PriorBroke(f"prior failed on frame {self.k}")
        return frame[..., 0].astype(np.float32) / 255.0


@pytest.mark.parametrize("prior_ahead", [False, True])
def test_prior_error_comes_out_after_the_frames_before_it(frames, net, prior_ahead):
    before = set(threading.enumerate())
    matter = Matter(net, PriorStream(_BreaksOn(4), TemporalSmoother()), device="cpu", frames_per_call=3,
                    prior_ahead=prior_ahead)
    got = []
    with pytest.raises(_PriorBroke, match="frame 4"):
        for res in matter.run(frames):
            got.append(res.index)
    assert got == [0, 1, 2, 3]  # frame 3 waited for a call of its own when frame 4's prior failed
    assert set(threading.enumerate()) == before


def test_closing_early_leaves_no_thread(frames, net):
    before = set(threading.enumerate())
    matter = Matter(net, PriorStream(ConstantPrior(0.5), TemporalSmoother()), device="cpu", frames_per_call=2,
                    prior_ahead=True)
    read = []

    def source():
        for i, frame in enumerate(frames):
            read.append(i)
            yield frame

    gen = matter.run(source())
    first = [next(gen).index, next(gen).index]
    assert first == [0, 1] and len(_prior_threads()) == 1
    gen.close()
    assert set(threading.enumerate()) == before
    assert len(read) <= 5  # the call's 2 frames, a queue of 2 and the one in hand
    # The Matter goes on with the next video as if the first had ended.
    assert [r.index for r in matter.run(frames[:3])] == [0, 1, 2]
    assert set(threading.enumerate()) == before


def test_cpu_defaults_to_the_streaming_path(frames, net):
    matter = Matter(net, PriorStream(ConstantPrior(0.5)), device="cpu")
    assert matter.frames_per_call == 1 and matter.prior_ahead is False
    assert matter.spec["frames_per_call"] == 1 and matter.spec["prior_ahead"] is False
    calls = _frames_per_call(matter)
    before = set(threading.enumerate())
    gen = matter.run(frames[:3])
    next(gen)
    assert set(threading.enumerate()) == before  # no prior thread
    list(gen)
    assert calls == [1, 1, 1]
    for bad in (0, 2.5):
        with pytest.raises(ValueError, match="frames_per_call"):
            Matter(net, PriorStream(ConstantPrior(0.5)), device="cpu", frames_per_call=bad)


def test_matting_options_reach_the_matter(net):
    from pipelines.matte import MattingOptions, build_matter

    cpu = torch.device("cpu")
    matter, _ = build_matter(net, MattingOptions(prior="none", frames_per_call=3, prior_ahead=True), cpu)
    assert (matter.frames_per_call, matter.prior_ahead) == (3, True)
    matter, _ = build_matter(net, MattingOptions(prior="none"), cpu)
    assert (matter.frames_per_call, matter.prior_ahead) == (1, False)


def test_matte_batched_with_a_corrupt_frame_writes_what_streaming_writes(tmp_path, net, selfie_model_cache,
                                                                         monkeypatch, capsys):
    """`matting matte --frames-per-call 3 --prior-ahead`: same numbering, lost frames, mattes and timings."""
    from pipelines.cli import main

    if not STREET.exists():
        pytest.skip(f"{STREET} absent")
    monkeypatch.setenv("MATTING_MODEL_CACHE", str(selfie_model_cache))
    checkpoint = tmp_path / "model.pt"
    save_checkpoint(net, str(checkpoint))
    folder = tmp_path / "clip"
    folder.mkdir()
    for src in sorted(STREET.glob("*.jpg"))[:8]:
        cv2.imwrite(str(folder / src.name), cv2.resize(cv2.imread(str(src)), (320, 180), interpolation=cv2.INTER_AREA))
    corrupt = sorted(folder.glob("*.jpg"))[3]
    corrupt.write_bytes(b"\xff\xd8 this is not a JPEG any more")
    results = {}
    for name, extra in (("streaming", []), ("batched", ["--frames-per-call", "3", "--prior-ahead"])):
        out = tmp_path / name
        rc = main(["matte", str(folder), "-o", str(out), "--formats", "pha", "--model", str(checkpoint),
                   "--device", "cpu", *extra])
        assert rc == 3, capsys.readouterr().err
        results[name] = json.loads((out / "clip" / "result.json").read_text())
    streaming, batched = results["streaming"], results["batched"]
    assert (batched["matter"]["frames_per_call"], batched["matter"]["prior_ahead"]) == (3, True)
    assert (streaming["matter"]["frames_per_call"], streaming["matter"]["prior_ahead"]) == (1, False)
    assert batched["lost_frames"] == streaming["lost_frames"] == [3] and batched["frames"] == 7
    for stage in ("prior", "smoothing", "net", "decode", "encode"):
        assert batched["timings"]["ms_per_frame"][stage] > 0
    names = sorted(p.name for p in (tmp_path / "batched" / "clip" / "pha").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "streaming" / "clip" / "pha").iterdir())
    assert names == [f"{i:06d}.png" for i in (0, 1, 2, 4, 5, 6, 7)]
    for n in names:
        x, y = (cv2.imread(str(tmp_path / run / "clip" / "pha" / n), cv2.IMREAD_UNCHANGED).astype(int)
                for run in ("batched", "streaming"))
        assert np.abs(x - y).max() <= 1, n
