"""MattingNet: shapes, architecture, recurrence, the downsample path, weights and checkpoints."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torchvision.models import mobilenet_v2

from matting_core.model import (SKIP_INDICES, BackboneWeightsError, CheckpointError, MattingNet, load_checkpoint,
                                matting_net, read_checkpoint, save_checkpoint)
from matting_core.model.backbone import imagenet_cache_path
from matting_core.model.blocks import AttentionGate, ConvLSTM
from matting_core.model.refine import FastGuidedFilter
from matting_core.flow import TemporalSmoother
from matting_core.prior import LEGACY_SMOOTHER_SPEC, PRIOR_SPEC_VERSION, prior_stream_from_spec

from tests.nets import H, W, clip as _clip, lively


@pytest.fixture(scope="module")
def net() -> MattingNet:
    torch.manual_seed(0)
    return lively(matting_net(backbone_weights="none"))


@torch.no_grad()
def test_an_untrained_net_returns_the_prior_and_the_frame():
    torch.manual_seed(0)
    src, prior = _clip(t=2)
    pha, fgr, _ = matting_net().eval()(src, prior)
    assert torch.equal(pha, prior) and torch.equal(fgr, src)


@torch.no_grad()
def test_clip_and_frame_shapes_and_ranges(net):
    src, prior = _clip(b=2, t=3)
    pha, fgr, state = net(src, prior)
    assert pha.shape == (2, 3, 1, H, W) and fgr.shape == (2, 3, 3, H, W)
    assert 0 <= pha.min() and pha.max() <= 1 and 0 <= fgr.min() and fgr.max() <= 1
    assert 0.05 < pha.mean() < 0.95 and pha.std() > 0.05  # not a degenerate output
    assert [tuple(s.shape) for s in state] == [tuple(s.shape) for s in net.initial_state(2, H, W)]
    assert len(state) == 10 and [s.shape[1] for s in state] == net.state_channels
    pha1, fgr1, state1 = net(src[:, 0], prior[:, 0])
    assert pha1.shape == (2, 1, H, W) and fgr1.shape == (2, 3, H, W) and len(state1) == 10


@torch.no_grad()
def test_arbitrary_sizes_are_padded_and_cropped_back(net):
    src, prior = _clip(t=1, h=50, w=71)
    pha, fgr, state = net(src[:, 0], prior[:, 0])
    assert pha.shape == (1, 1, 50, 71) and fgr.shape == (1, 3, 50, 71)
    assert state[0].shape[-2:] == (32, 48)  # 64x96 after padding, stride 2


def test_skips_come_from_the_named_features_and_each_has_convlstm_and_attention(net):
    assert SKIP_INDICES == (1, 3, 6, 13, 17)
    skips = net.skip_modules()
    assert [i for i, _, _ in skips] == list(SKIP_INDICES)
    assert all(isinstance(lstm, ConvLSTM) and isinstance(gate, AttentionGate) for _, lstm, gate in skips)
    assert len({id(g) for _, _, g in skips}) == 5 and len({id(m) for _, m, _ in skips}) == 5
    assert net.encoder[0][0].in_channels == 4 and len(net.encoder) == 18

    seen: dict = {}
    hooks = [net.encoder[i].register_forward_hook(lambda m, a, o, i=i: seen.__setitem__(("feat", i), o))
             for i in SKIP_INDICES]
    for i, lstm, gate in skips:
        hooks.append(lstm.register_forward_hook(lambda m, a, o, i=i: seen.__setitem__(("lstm", i), a[0])))
        hooks.append(gate.register_forward_hook(lambda m, a, o, i=i: seen.__setitem__(("gate", i), (a, o))))
    try:
        with torch.no_grad():
            net(*_clip(t=1))
    finally:
        for h in hooks:
            h.remove()
    for i, lstm, gate in skips:
        feat, lstm_in = seen[("feat", i)], seen[("lstm", i)]
        assert torch.equal(lstm_in.flatten(0, 1), feat)  # the ConvLSTM reads features[i]
        (gate_in, gate_signal), gate_out = seen[("gate", i)]
        assert gate_in.shape[1] == feat.shape[1] + lstm.hidden_channels  # the gate sees the ConvLSTM's output
        coefficients = gate.coefficients(gate_in, gate_signal)
        assert coefficients.shape == (1, 1) + gate_in.shape[-2:]
        assert 0 < coefficients.min() and coefficients.max() < 1  # and weighs every pixel of it
        assert torch.allclose(gate_out, gate_in * coefficients)


@torch.no_grad()
@pytest.mark.parametrize("ratio", [1.0, 0.5])
def test_streaming_frame_by_frame_equals_the_whole_clip(net, ratio):
    src, prior = _clip(b=2, t=4, h=72, w=100)
    pha, fgr, state = net(src, prior, downsample_ratio=ratio)
    rec, phas, fgrs = None, [], []
    for t in range(4):
        p, f, rec = net(src[:, t], prior[:, t], rec, ratio)
        phas.append(p)
        fgrs.append(f)
    assert (torch.stack(phas, 1) - pha).abs().max() < 1e-4
    assert (torch.stack(fgrs, 1) - fgr).abs().max() < 1e-4
    assert all((a - b).abs().max() < 1e-4 for a, b in zip(rec, state))


@torch.no_grad()
def test_state_none_starts_a_new_video(net):
    src_a, prior_a = _clip(seed=1)
    src_b, prior_b = _clip(seed=2)
    fresh, _, _ = net(src_b, prior_b)
    _, _, state_a = net(src_a, prior_a)
    carried, _, _ = net(src_b, prior_b, state_a)
    reset, _, _ = net(src_b, prior_b, None)
    assert torch.equal(reset, fresh)
    assert (carried - fresh).abs().max() > 1e-6  # the state does carry information across calls
    zeros, _, _ = net(src_b, prior_b, net.initial_state(1, H, W))
    assert (zeros - fresh).abs().max() < 1e-6


@torch.no_grad()
def test_downsample_path_runs_the_network_at_low_resolution(net):
    seen = []
    hook = net.stages[0].register_forward_hook(lambda m, a, o: seen.append(tuple(a[0].shape[-2:])))
    try:
        src, prior = _clip(t=1, h=360, w=640)
        pha, fgr, state = net(src[:, 0], prior[:, 0], downsample_ratio=0.25)
        big = torch.rand(1, 3, 720, 1280), torch.rand(1, 1, 720, 1280)
        pha_big, _, _ = net(*big, downsample_ratio=0.125)
    finally:
        hook.remove()
    assert pha.shape == (1, 1, 360, 640) and fgr.shape == (1, 3, 360, 640) and pha_big.shape == (1, 1, 720, 1280)
    assert 0 <= pha.min() and pha.max() <= 1 and 0 <= fgr.min() and fgr.max() <= 1
    # 90x160 padded to 96x160 in both cases: the network's cost does not grow with the input
    assert seen == [(96, 160), (96, 160)]
    assert [tuple(s.shape) for s in state] == [tuple(s.shape) for s in net.initial_state(1, 360, 640, 0.25)]


def test_guided_filter_recovers_full_resolution_detail_of_a_locally_linear_matte():
    torch.manual_seed(0)
    hr_x = torch.rand(1, 1, 64, 64)
    lr_x = torch.nn.functional.interpolate(hr_x, size=(16, 16), mode="bilinear", align_corners=False)
    # alpha = 2*guide - 0.3 everywhere: the filter must reproduce it at full resolution, including
    # detail the low-resolution alpha cannot hold, which plain upsampling loses.
    out = FastGuidedFilter(radius=1, eps=1e-8)(lr_x, 2 * lr_x - 0.3, hr_x)
    assert (out - (2 * hr_x - 0.3)).abs().max() < 1e-3
    naive = torch.nn.functional.interpolate(2 * lr_x - 0.3, size=(64, 64), mode="bilinear", align_corners=False)
    assert (naive - (2 * hr_x - 0.3)).abs().mean() > 0.1


def test_config_is_json_safe_and_records_the_prior():
    net = matting_net(lstm_channels=(4, 8, 8, 16, 32), prior={"backend": "none", "value": 0.25})
    assert json.loads(json.dumps(net.config)) == net.config
    assert net.config["lstm_channels"] == [4, 8, 8, 16, 32]
    assert net.config["prior"]["prior"] == {"backend": "none", "value": 0.25}


def test_checkpoints_record_the_resolved_prior_and_rebuild_it_whatever_the_defaults(tmp_path, monkeypatch):
    """Backend, weights, input size and every smoother setting are recorded; runtime settings are not."""
    spec = matting_net(prior={"backend": "selfie", "num_threads": 4}).config["prior"]
    assert spec["version"] == PRIOR_SPEC_VERSION and spec["key_interval"] == 1
    assert spec["prior"] == {"backend": "selfie", "weights": "default", "input_size": [256, 144]}
    assert spec["smoother"] == TemporalSmoother().spec
    deeplab = matting_net(prior={"backend": "deeplabv3", "weights": "none"}).config["prior"]["prior"]
    assert deeplab == {"backend": "deeplabv3", "weights": "none", "arch": "mobilenet_v3_large", "size": 256}
    path = tmp_path / "model.pt"
    save_checkpoint(matting_net(prior={"backend": "none"}), str(path))
    recorded = load_checkpoint(str(path)).config["prior"]
    # The code's defaults change later: the checkpoint still rebuilds the smoother it recorded.
    defaults = list(TemporalSmoother.__init__.__defaults__)
    monkeypatch.setattr(TemporalSmoother.__init__, "__defaults__", tuple(d * 2 if isinstance(d, float) else d
                                                                        for d in defaults))
    assert TemporalSmoother().spec != recorded["smoother"], "the defaults did not change"
    assert load_checkpoint(str(path)).config["prior"] == recorded
    assert prior_stream_from_spec(recorded).smoother.spec == recorded["smoother"]


def test_checkpoints_from_before_resolved_priors_load_with_the_legacy_smoother(tmp_path):
    path = tmp_path / "old.pt"
    save_checkpoint(matting_net(), str(path))
    payload = torch.load(path, weights_only=True)
    config = json.loads(payload["config"])
    config["prior"] = {"backend": "selfie"}  # what checkpoints recorded before
    payload["config"] = json.dumps(config)
    torch.save(payload, path)
    spec = load_checkpoint(str(path)).config["prior"]
    assert spec["version"] == PRIOR_SPEC_VERSION
    assert spec["prior"] == {"backend": "selfie", "weights": "default", "input_size": [256, 144]}
    assert spec["smoother"] == {**TemporalSmoother().spec, **LEGACY_SMOOTHER_SPEC}
    assert prior_stream_from_spec(spec).smoother.spec == spec["smoother"]


@torch.no_grad()
def test_checkpoint_round_trip(tmp_path):
    torch.manual_seed(3)
    net = lively(matting_net(lstm_channels=(4, 8, 8, 16, 32), prior={"backend": "deeplabv3", "weights": "none"}))
    path = tmp_path / "sub" / "model.pt"
    save_checkpoint(net, str(path), extra={"step": 7, "loss": [0.5, 0.25], "ema": torch.ones(2)})
    loaded = load_checkpoint(str(path))
    assert isinstance(loaded, MattingNet) and not loaded.training
    assert loaded.config == net.config
    assert loaded.checkpoint_extra["step"] == 7 and torch.equal(loaded.checkpoint_extra["ema"], torch.ones(2))
    src, prior = _clip(t=2)
    for a, b in zip(net(src, prior), loaded(src, prior)):
        if isinstance(a, list):
            assert all(torch.equal(x, y) for x, y in zip(a, b))
        else:
            assert torch.equal(a, b)
    assert read_checkpoint(str(path))["extra"]["loss"] == [0.5, 0.25]
    assert not list(path.parent.glob("*.tmp"))


@torch.no_grad()
def test_the_output_curve_sharpens_the_clamped_alpha_only_and_is_kept_by_checkpoints(tmp_path):
    torch.manual_seed(0)
    src, prior = _clip(t=2)
    net = matting_net().eval()  # untrained: its alpha is the prior
    assert net.config["output_curve"] == [1.0, 0.5]
    net.set_output_curve(2.0, 0.4)
    pha, _, _ = net(src, prior)
    assert torch.allclose(pha, ((prior - 0.4) * 2.0 + 0.5).clamp(0, 1), atol=1e-6)
    raw, _, _ = net(src, prior, None, 1.0, False)  # what the training losses take: no curve
    assert torch.equal(raw, prior)
    path = str(tmp_path / "model.pt")
    save_checkpoint(net, path)
    loaded = load_checkpoint(path)
    assert loaded.config["output_curve"] == [2.0, 0.4] and torch.equal(loaded(src, prior)[0], pha)
    from matting_core.model.optimize import optimize_for_inference

    assert torch.allclose(optimize_for_inference(net)(src, prior)[0], pha, atol=1e-5)
    # below full resolution the curve shapes the refined alpha, not the network's low-resolution one
    refined = net(src, prior, None, 0.5)[0]
    net.set_output_curve(1.0, 0.5)
    assert torch.allclose(refined, ((net(src, prior, None, 0.5)[0] - 0.4) * 2.0 + 0.5).clamp(0, 1), atol=1e-6)
    net.set_output_curve(2.0, 0.4)
    config = dict(net.config)
    del config["output_curve"]  # checkpoints written before it existed
    assert torch.equal(MattingNet(**config).eval()(src, prior)[0], prior)
    with pytest.raises(ValueError, match="gain > 0"):
        net.set_output_curve(0.0, 0.5)


def test_the_refiner_radius_is_set_recorded_and_kept_by_checkpoints(tmp_path):
    src, prior = torch.rand(1, 2, 3, 64, 96), torch.rand(1, 2, 1, 64, 96)
    net = matting_net().eval()
    before = net(src, prior, None, 0.5)[0]
    net.set_refine_radius(3)
    after = net(src, prior, None, 0.5)[0]
    assert net.config["refine_radius"] == 3 and not torch.allclose(before, after)
    path = str(tmp_path / "model.pt")
    save_checkpoint(net, path)
    loaded = load_checkpoint(path)
    assert loaded.refiner.filter.radius == 3 and torch.equal(loaded(src, prior, None, 0.5)[0], after)
    with pytest.raises(ValueError, match="positive integer"):
        net.set_refine_radius(0)


class _Payload:
    """An arbitrary class: a safe checkpoint loader must refuse to rebuild it."""


def test_checkpoint_errors_name_the_file(tmp_path):
    missing = tmp_path / "nope.pt"
    with pytest.raises(CheckpointError, match="nope.pt.*no such file"):
        load_checkpoint(str(missing))
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"\x80\x02not a checkpoint" * 10)
    with pytest.raises(CheckpointError, match="corrupt.pt"):
        load_checkpoint(str(corrupt))
    truncated = tmp_path / "truncated.pt"
    save_checkpoint(matting_net(), str(truncated))
    truncated.write_bytes(truncated.read_bytes()[:5000])
    with pytest.raises(CheckpointError, match="truncated.pt"):
        load_checkpoint(str(truncated))
    unsafe = tmp_path / "unsafe.pt"
    torch.save({"format": "matting-checkpoint", "config": "{}", "obj": _Payload()}, unsafe)
    with pytest.raises(CheckpointError, match="unsafe.pt"):
        load_checkpoint(str(unsafe))
    foreign = tmp_path / "foreign.pt"
    torch.save(mobilenet_v2().state_dict(), foreign)
    with pytest.raises(CheckpointError, match="not a MattingNet checkpoint"):
        load_checkpoint(str(foreign))
    with pytest.raises(TypeError, match="extra.obj"):
        save_checkpoint(matting_net(), str(tmp_path / "x.pt"), extra={"obj": _Payload()})


def test_imagenet_without_the_cache_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    expected = imagenet_cache_path()
    assert str(expected).startswith(str(tmp_path))
    with pytest.raises(BackboneWeightsError) as info:
        matting_net(backbone_weights="imagenet")
    message = str(info.value)
    assert str(expected) in message and "backbone_weights=PATH" in message and "'none'" in message


def _reference_mobilenet(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return mobilenet_v2(weights=None)


def test_imagenet_from_the_local_cache_keeps_rgb_filters_and_zeroes_the_prior_channel(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    ref = _reference_mobilenet(5)
    target = imagenet_cache_path()
    target.parent.mkdir(parents=True)
    torch.save(ref.state_dict(), target)
    net = matting_net(backbone_weights="imagenet")
    first = net.encoder[0][0].weight
    assert torch.equal(first[:, :3], ref.features[0][0].weight) and torch.all(first[:, 3] == 0)
    assert torch.equal(net.encoder[17].conv[0][0].weight, ref.features[17].conv[0][0].weight)
    assert torch.equal(net.encoder[13].conv[1][1].running_mean, ref.features[13].conv[1][1].running_mean)


@pytest.mark.parametrize("which", ["model", "features"])
def test_backbone_weights_from_a_path(tmp_path, which):
    ref = _reference_mobilenet(6)
    path = tmp_path / f"{which}.pth"
    torch.save((ref if which == "model" else ref.features).state_dict(), path)
    net = matting_net(backbone_weights=str(path))
    assert torch.equal(net.encoder[0][0].weight[:, :3], ref.features[0][0].weight)
    assert torch.equal(net.encoder[6].conv[2].weight, ref.features[6].conv[2].weight)


def test_backbone_weights_path_errors(tmp_path):
    with pytest.raises(BackboneWeightsError, match="missing.pth: no such file"):
        matting_net(backbone_weights=str(tmp_path / "missing.pth"))
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"junk" * 100)
    with pytest.raises(BackboneWeightsError, match="junk.pth"):
        matting_net(backbone_weights=str(junk))
    other = tmp_path / "other.pth"
    torch.save({"conv.weight": torch.zeros(3, 3)}, other)
    with pytest.raises(BackboneWeightsError, match="other.pth: not a mobilenet_v2 state dict"):
        matting_net(backbone_weights=str(other))


@torch.no_grad()
def test_optimized_for_inference_equals_the_net_and_streams_like_a_clip(net):
    from matting_core.model.optimize import optimize_for_inference

    fast = optimize_for_inference(net)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fast.modules())  # folded
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in net.modules())  # the original is untouched
    assert fast.config == net.config and fast.channels_last
    for ratio in (1.0, 0.5):
        src, prior = _clip(b=1, t=3, h=72, w=100)
        pha, fgr, state = net(src, prior, downsample_ratio=ratio)
        rec, phas, fgrs = None, [], []
        # a frame made from an HWC image has channels-last strides, as in the streaming Matter
        for t in range(3):
            frame = src[:, t].contiguous(memory_format=torch.channels_last)
            p, f, rec = fast(frame, prior[:, t], rec, ratio)
            phas.append(p)
            fgrs.append(f)
        assert (torch.stack(phas, 1) - pha).abs().max() < 1e-4
        assert (torch.stack(fgrs, 1) - fgr).abs().max() < 1e-4
        assert all((a - b).abs().max() < 1e-4 for a, b in zip(rec, state))
    with pytest.raises(ValueError, match="optimize_for_inference"):
        save_checkpoint(fast, "unused.pt")


@torch.no_grad()
def test_version_1_checkpoints_without_an_arch_key_still_load(tmp_path):
    torch.manual_seed(4)
    old = lively(matting_net(arch=1, head_channels=12, prior_calibration=0))
    path = tmp_path / "v1.pt"
    save_checkpoint(old, str(path))
    payload = torch.load(path, weights_only=True)
    config = json.loads(payload["config"])
    del config["arch"], config["prior_calibration"]  # as written before either existed
    payload["config"] = json.dumps(config)
    torch.save(payload, path)
    loaded = load_checkpoint(str(path))
    assert loaded.config["arch"] == 1 and loaded.config["head_channels"] == 12
    assert loaded.config["prior_calibration"] == 0 and loaded.calibration is None
    src, prior = _clip(t=2)
    assert torch.equal(old(src, prior)[0], loaded(src, prior)[0])
    assert matting_net().config["arch"] == 2 and matting_net().config["prior_calibration"] == 11


def test_the_prior_calibration_is_a_piecewise_linear_map_that_starts_as_the_identity():
    from matting_core.model.calibration import PriorCalibration

    cal = PriorCalibration(5)  # knots at 0, .25, .5, .75, 1
    p = torch.rand(2, 1, 8, 8)
    assert torch.equal(cal(p), p)
    with torch.no_grad():
        cal.delta.copy_(torch.tensor([0.0, -0.2, -0.1, 0.05, 0.0]))
    knots = torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0]).view(1, 1, 1, 5)
    assert torch.allclose(cal(knots), knots + cal.delta.detach().view(1, 1, 1, 5), atol=1e-7)
    between = torch.tensor([0.125, 0.6]).view(1, 1, 1, 2)  # halfway 0..0.25, 40% of 0.5..0.75
    assert torch.allclose(cal(between), torch.tensor([0.125 - 0.1, 0.6 - 0.1 + 0.4 * 0.15]).view(1, 1, 1, 2))
    cal(p).sum().backward()
    assert cal.delta.grad is not None and cal.delta.grad.abs().sum() > 0
    # The net adds its residual to the calibrated prior: with a zero residual, alpha is that map.
    net = matting_net().eval()
    with torch.no_grad():
        net.calibration.delta.copy_(torch.linspace(0, -0.3, 11))
        src, prior = _clip(t=2)
        pha, _, _ = net(src, prior)
    assert torch.allclose(pha, net.calibration(prior.flatten(0, 1)).view_as(pha).clamp(0, 1), atol=1e-6)


def test_refiner_equals_the_plain_guided_filter_on_the_grey_guide():
    torch.manual_seed(2)
    from matting_core.model.refine import GuidedRefiner

    src = torch.rand(1, 3, 64, 96).contiguous(memory_format=torch.channels_last)
    src_lr = torch.nn.functional.interpolate(src, size=(16, 24), mode="bilinear", align_corners=False)
    fgr_lr, pha_lr = torch.rand(1, 3, 16, 24), torch.rand(1, 1, 16, 24)
    gf = FastGuidedFilter(1, 1e-5)
    want_fgr = gf(src_lr, fgr_lr, src).clamp(0, 1)
    want_pha = gf(src_lr.mean(1, keepdim=True), pha_lr, src.mean(1, keepdim=True)).clamp(0, 1)
    for grad in (False, True):
        with torch.set_grad_enabled(grad):
            fgr, pha = GuidedRefiner(1, 1e-5)(src, src_lr, fgr_lr, pha_lr)
        assert (fgr - want_fgr).abs().max() < 1e-5 and (pha - want_pha).abs().max() < 1e-5


@pytest.mark.parametrize("size", [(1080, 1920), (73, 121)])
def test_refine_frame_equals_the_refiner_on_a_uint8_frame(size):
    """OpenCV's refiner (Matter's on the CPU) is as close to the exact refiner as the float32 one: alpha, foreground within a level."""
    import cv2

    from matting_core.model.refine import GuidedRefiner, refine_frame

    h, w = size
    rng = np.random.default_rng(3)
    # Colour gradients with an edge and noise, and an alpha unrelated to them: windows where the
    # fit is ill-conditioned, so float rounding shows (the float32 refiner's own error is ~1e-3).
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    frame = np.dstack([xx * 200 + 30 * (yy > 0.3), yy * 180, np.full_like(xx, 90.0)])
    frame = np.clip(frame + rng.normal(0, 6, frame.shape), 0, 255).astype(np.uint8)
    src = torch.from_numpy(frame).permute(2, 0, 1)[None].float() / 255
    src_lr = torch.nn.functional.interpolate(src, scale_factor=0.25, mode="bilinear", align_corners=False,
                                             recompute_scale_factor=False)
    lh, lw = src_lr.shape[-2:]
    fgr_lr = (src_lr + 0.1 * torch.rand(1, 3, lh, lw, generator=torch.Generator().manual_seed(1))).clamp(0, 1)
    pha_lr = torch.from_numpy(cv2.GaussianBlur((rng.random((lh, lw)) > 0.5).astype(np.float32), (5, 5), 0))[None, None]
    refiner = GuidedRefiner(1, 1e-5)
    with torch.inference_mode():
        fgr32, pha32 = refiner(src, src_lr, fgr_lr, pha_lr)
        exact_fgr, exact_pha = refiner.double()(src.double(), src_lr.double(), fgr_lr.double(), pha_lr.double())
    hwc = lambda t: np.ascontiguousarray(t[0].permute(1, 2, 0).numpy())  # noqa: E731
    fgr, pha = refine_frame(hwc(src_lr), hwc(fgr_lr), pha_lr[0, 0].numpy(), frame, 1, 1e-5)
    assert fgr.dtype == np.uint8 and fgr.shape == (h, w, 3) and pha.dtype == np.float32 and pha.shape == (h, w)
    exact_pha = exact_pha[0, 0].numpy()
    float32_error = np.abs(pha32[0, 0].numpy() - exact_pha).max()
    assert np.abs(pha - exact_pha).max() <= max(1e-5, 1.5 * float32_error) < 0.5 / 255
    assert np.abs(pha - pha32[0, 0].numpy()).mean() < 1e-5
    assert np.abs(fgr - (exact_fgr[0].permute(1, 2, 0) * 255).round().numpy()).max() <= 1
    assert 0.0 <= pha.min() and pha.max() <= 1.0 and pha.std() > 0.1


@pytest.mark.parametrize("curve", [(3.0, 0.45), (0.5, 0.3), (5.0, 0.5)])
def test_refine_frame_folds_the_output_curve_into_its_coefficients(curve):
    """The alpha of refine_frame with an output curve is output_curve of its alpha without one (a gain below 1 too)."""
    from matting_core.model.net import output_curve
    from matting_core.model.refine import refine_frame

    rng = np.random.default_rng(5)
    frame = rng.integers(0, 256, (90, 160, 3), dtype=np.uint8)
    src_lr = rng.random((30, 54, 3), dtype=np.float32)
    fgr_lr = rng.random((30, 54, 3), dtype=np.float32)
    pha_lr = (rng.random((30, 54)) > 0.5).astype(np.float32)  # a hard alpha the fit overshoots: both clamps act
    fgr, pha = refine_frame(src_lr, fgr_lr, pha_lr, frame, 1, 1e-5)
    fgr_c, pha_c = refine_frame(src_lr, fgr_lr, pha_lr, frame, 1, 1e-5, curve)
    assert np.array_equal(fgr, fgr_c)
    want = output_curve(torch.from_numpy(pha), *curve).numpy()
    assert np.abs(pha_c - want).max() < 1e-5 and 0.0 <= pha_c.min() and pha_c.max() <= 1.0
    assert (pha == 0).any() and (pha == 1).any() and (want != pha).mean() > 0.5  # the clamps and the curve both show
    with pytest.raises(ValueError, match="gain"):
        refine_frame(src_lr, fgr_lr, pha_lr, frame, 1, 1e-5, (0.0, 0.5))


@pytest.mark.parametrize("shape,ratio", [((1080, 1920, 3), 512 / 1920), ((1088, 1920, 3), 512 / 1920),
                                         ((97, 131, 3), 0.37), ((144, 176), 0.5)])
def test_downsample_image_equals_downsample(shape, ratio):
    """The numpy downsample Matter gives the network (from a uint8 frame, or a float prior) is the net's own."""
    from matting_core.model.net import downsample, downsample_image

    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, shape, dtype=np.uint8) if len(shape) == 3 else rng.random(shape, dtype=np.float32)
    scale = 1 / 255 if image.dtype == np.uint8 else 1.0
    t = torch.from_numpy(image).float() * scale
    t = t.permute(2, 0, 1)[None] if t.dim() == 3 else t[None, None]
    want = downsample(t, ratio)[0]
    want = want.permute(1, 2, 0).numpy() if image.ndim == 3 else want[0].numpy()
    mine = downsample_image(image, ratio, scale)
    assert mine.dtype == np.float32 and mine.shape == want.shape
    assert np.abs(mine - want).max() < 2e-5
