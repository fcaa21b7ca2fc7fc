"""The training recipe (matting_core.training): batches and augmentation, losses, the step, the loop."""
from __future__ import annotations

import dataclasses
import json

import cv2
import numpy as np
import pytest
import torch

from matting_core.data.clips import ClipRecord, iter_clips
from matting_core.evaluation.metrics import SequenceMetrics, warp_bilinear
from matting_core.flow import warp as np_warp
from matting_core.model import load_checkpoint
from matting_core.model.net import output_curve
from matting_core.model.optimize import optimize_for_inference
from matting_core.prior import ConstantPrior, PriorStream, resolve_prior_spec
from matting_core.training import (AugmentConfig, LossWeights, OptimConfig, RecipeConfig, PRESETS, collate,
                                   make_sample, matting_losses, recipe_from_dict, recipe_to_dict, sample_rng, warp)
from matting_core.training import engine as E
from matting_core.training.batches import RECORD_COLUMNS, iter_batches

from tests.conftest import shared_path

SIZE, FRAMES = (96, 64), 4
# No augmentation at all: tests switch on one thing at a time.
PLAIN = AugmentConfig(size=(64, 64), scale=(1.0, 1.0), flip=0.0, reverse=0.0, brightness=0.0, contrast=0.0,
                      saturation=0.0, gains=0.0, background=0.0)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One torch thread: these tiny networks gain nothing from two, and lose much when cores are shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _cfg(**kw) -> RecipeConfig:
    base = dict(frames=FRAMES, batch_size=2, steps=20, tbptt=2, augment=PLAIN,
                optim=OptimConfig(lr=2e-3, warmup_steps=0, freeze_stages=0, encoder_lr_scale=1.0),
                val_every=0, checkpoint_every=0, log_every=0, bn_calibration_batches=1, shuffle_buffer=4)
    base.update(kw)
    return RecipeConfig(**base)


def _const_stream() -> PriorStream:
    return PriorStream(ConstantPrior(0.5))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> str:
    """Six 4-frame 96x64 fake-motion clips of three real P3M people (two each), one shard, no Ray."""
    from matting_core.data.clips import encode_clip, shard_name, write_shard
    from matting_core.data.fakemotion import FakeMotionConfig, clip_rng, synthesize_clip
    from matting_core.data.sources import discover_photos, load_photo, validate_photo

    sources, _ = discover_photos(str(shared_path("data", "photos", "p3m")))
    photos = [load_photo(validate_photo(s), max_height=2 * SIZE[1], estimate_foreground=False) for s in sources[:3]]
    out = tmp_path_factory.mktemp("clips")
    (out / "clips").mkdir()
    rows = []
    for i in range(6):
        rng = np.random.default_rng(100 + i)
        bg = np.stack([cv2.GaussianBlur(rng.integers(0, 256, (80, 120, 3), dtype=np.uint8), (0, 0), 2)] * FRAMES)
        photo = photos[i % 3]
        clip = synthesize_clip(photo, bg, FakeMotionConfig(frames=FRAMES, size=SIZE), clip_rng(0, i))
        rows.append(encode_clip(clip, i, 0, photo.uri, "noise", 0))
    write_shard(str(out / "clips" / shard_name(0, 6)), rows)
    (out / "manifest.json").write_text(json.dumps({"schema_version": 1}))
    return str(out)


@pytest.fixture(scope="module")
def records(dataset) -> list[ClipRecord]:
    return list(iter_clips(dataset, columns=RECORD_COLUMNS))


def _moving_disc(T: int = 4, v=(3.0, 1.0), size=(64, 48)) -> ClipRecord:
    """A textured disc translating by `v` px per frame over a static background, with its exact flow."""
    W, H = size
    rng = np.random.default_rng(7)
    tex = cv2.GaussianBlur(rng.integers(0, 256, (H, W, 3), dtype=np.uint8), (0, 0), 1.5)
    bg = np.full((H, W, 3), 90, np.uint8)
    yy, xx = np.mgrid[0:H, 0:W].astype(np.float32)
    frames, fgr, alpha, flow = [], [], [], []
    for t in range(T):
        cx, cy = 20 + v[0] * t, 22 + v[1] * t
        a = np.clip(13.0 - np.hypot(xx - cx, yy - cy), 0, 1).astype(np.float32)
        m = np.float32([[1, 0, v[0] * t], [0, 1, v[1] * t]])
        f = cv2.warpAffine(tex, m, (W, H), borderMode=cv2.BORDER_REFLECT)
        frames.append(np.clip(a[..., None] * f + (1 - a[..., None]) * bg + 0.5, 0, 255).astype(np.uint8))
        fgr.append(f)
        alpha.append(np.round(a * 255) / 255)
        fl = np.zeros((H, W, 2), np.float32)
        if t:
            fl[a > 0] = (-v[0], -v[1])  # backward: the point at x was at x - v in frame t-1
        flow.append(fl)
    return ClipRecord(0, 0, "disc", "flat", False, np.stack(frames), np.stack(fgr), np.stack([bg] * T),
                      np.stack(alpha).astype(np.float32), np.stack(flow), {})


def _warp_error(sample: dict) -> tuple[float, float]:
    """Mean |warp(alpha_{t-1}, flow_t) - alpha_t| over valid pixels, and the same with zero flow."""
    pha, flow, valid = sample["pha"][:, 0], sample["flow"].transpose(0, 2, 3, 1), sample["flow_valid"][:, 0] > 0
    err, still = [], []
    for t in range(1, pha.shape[0]):
        if valid[t].any():
            err.append(np.abs(np_warp(pha[t - 1], flow[t]) - pha[t])[valid[t]].mean())
            still.append(np.abs(pha[t - 1] - pha[t])[valid[t]].mean())
    return float(np.mean(err)), float(np.mean(still))


# ---------------------------------------------------------------- warp
def test_torch_warp_matches_the_numpy_warp_of_the_flow_convention():
    rng = np.random.default_rng(0)
    img = cv2.GaussianBlur(rng.random((40, 56)).astype(np.float32), (0, 0), 2)
    flow = (rng.uniform(-6, 6, (40, 56, 2)) * 32).round().astype(np.float32) / 32  # the dataset's 1/32 px grid
    flow[:4] = 30.0  # sources outside the frame: replicated border
    torch_out = warp(torch.from_numpy(img)[None, None], torch.from_numpy(flow).permute(2, 0, 1)[None])[0, 0].numpy()
    assert np.abs(torch_out - np_warp(img, flow)).max() < 1e-4
    # Off the 1/32 grid OpenCV rounds its weights; the exact float64 warp of the metrics does not.
    flow2 = flow + rng.uniform(-0.5, 0.5, flow.shape).astype(np.float32)
    exact, _ = warp_bilinear(img, flow2)
    off_grid = warp(torch.from_numpy(img)[None, None], torch.from_numpy(flow2).permute(2, 0, 1)[None])[0, 0].numpy()
    assert np.abs(off_grid - exact).max() < 1e-4


# ---------------------------------------------------------------- samples
def test_flip_negates_flow_x_and_keeps_the_warp_consistent(records):
    # A real fake-motion clip, and a disc moving 3 px right: flipped, it moves 3 px left.
    for record in (records[0], _moving_disc()):
        cfg = _cfg(augment=dataclasses.replace(PLAIN, size=record.alpha.shape[1:][::-1]))
        plain = make_sample(record, cfg, sample_rng(0, 0, 0), _const_stream())
        flipped = make_sample(record, dataclasses.replace(cfg, augment=dataclasses.replace(cfg.augment, flip=1.0)),
                              sample_rng(0, 0, 0), _const_stream())
        assert np.array_equal(flipped["pha"], plain["pha"][..., ::-1])
        assert np.allclose(flipped["flow"][:, 0], -plain["flow"][:, 0, :, ::-1])
        assert np.allclose(flipped["flow"][:, 1], plain["flow"][:, 1, :, ::-1])
        err_plain, _ = _warp_error(plain)
        err_flip, still = _warp_error(flipped)
        assert err_flip < 1.5 * err_plain + 1e-3 and err_flip < 0.5 * still
    disc = make_sample(_moving_disc(), dataclasses.replace(
        _cfg(), augment=dataclasses.replace(PLAIN, size=(64, 48), flip=1.0)), sample_rng(0, 0, 0), _const_stream())
    assert np.allclose(disc["flow"][1:, 0][disc["flow_valid"][1:, 0] > 0], 3.0)


def test_a_pause_holds_the_first_pose_over_the_clips_moving_background(records):
    record = records[0]
    cfg = _cfg(augment=dataclasses.replace(PLAIN, size=record.alpha.shape[1:][::-1], still=1.0))
    s = make_sample(record, cfg, sample_rng(0, 0, 0), _const_stream())
    a0, f0 = record.alpha[0], record.fgr[0].astype(np.float32)
    assert all(np.array_equal(s["pha"][t, 0], a0) for t in range(FRAMES))
    assert not np.any(s["flow"]) and np.array_equal(s["flow_valid"][1:, 0] > 0, np.stack([a0 > 0] * (FRAMES - 1)))
    for t in range(FRAMES):
        composite = a0[..., None] * f0 + (1 - a0[..., None]) * record.bgr[t]
        assert np.abs(s["src"][t].transpose(1, 2, 0) * 255 - composite).max() <= 0.5 + 1e-3
    assert np.abs(s["src"][-1] - s["src"][0]).mean() > 1 / 255  # the background still moves
    assert np.array_equal(make_sample(record, _cfg(augment=dataclasses.replace(cfg.augment, still=0.0)),
                                      sample_rng(0, 0, 0), _const_stream())["pha"][:, 0], record.alpha[:FRAMES])


def test_time_reversal_inverts_the_flow(records):
    disc = _moving_disc()
    cfg = _cfg(augment=dataclasses.replace(PLAIN, size=(64, 48), reverse=1.0))
    rev = make_sample(disc, cfg, sample_rng(0, 0, 0), _const_stream())
    assert rev["reversed"] and np.array_equal(rev["pha"][:, 0], disc.alpha[::-1])
    valid = rev["flow_valid"][1:, 0] > 0
    interior = disc.alpha[::-1][1:] > 0.99
    assert valid[interior].mean() > 0.9  # the inverse exists inside the disc
    assert np.abs(rev["flow"][1:, 0][valid] - 3.0).max() < 0.05  # played backwards it moves by +v
    assert np.abs(rev["flow"][1:, 1][valid] - 1.0).max() < 0.05
    assert np.all(rev["flow_valid"][0] == 0)
    err, still = _warp_error(rev)
    assert err < 0.25 * still
    # Real clips, zoomed crops and all: the reversed flow reconstructs the reversed alpha.
    aug = dataclasses.replace(PLAIN, size=(64, 48), scale=(0.6, 1.0), reverse=1.0)
    for i, record in enumerate(records[:3]):
        s = make_sample(record, _cfg(augment=aug), sample_rng(0, 1, 0, i), _const_stream())
        err, still = _warp_error(s)
        assert s["reversed"] and err < 0.02 and s["flow_valid"][1:].sum() > 0.5 * (s["pha"][1:] > 0.5).sum()


def test_samples_are_seeded_by_seed_step_and_rank(records):
    aug = dataclasses.replace(AugmentConfig(size=(64, 48)), background=0.5)
    cfg = _cfg(augment=aug)

    def batch(seed, step, rank):
        return collate([make_sample(r, cfg, sample_rng(seed, step, rank, i), _const_stream())
                        for i, r in enumerate(records[:2])])

    a, b, c = batch(0, 5, 0), batch(0, 5, 0), batch(0, 5, 1)
    for name in ("src", "pha", "fgr", "flow", "flow_valid"):
        assert torch.equal(getattr(a, name), getattr(b, name))
    assert not torch.equal(a.src, c.src)
    assert not torch.equal(a.src, batch(0, 6, 0).src) and not torch.equal(a.src, batch(1, 5, 0).src)
    state = np.random.get_state()
    batch(0, 5, 0)
    assert np.array_equal(np.random.get_state()[1], state[1])  # the global RNG is never drawn from


def test_the_prior_is_the_prior_stream_over_the_augmented_frames(records):
    cfg = _cfg(augment=dataclasses.replace(AugmentConfig(size=(64, 48)), reverse=1.0, flip=1.0, background=1.0))
    # A per-pixel prior (the frame's grey): cropped and resized like the frames, it is their grey.
    s = make_sample(records[1], cfg, sample_rng(0, 0, 0), PriorStream(_GreyPrior()))
    grey = s["src"].mean(axis=1)
    assert np.abs(s["prior"][:, 0] - grey).max() < 3 / 255
    # It runs on the whole frames, as inference does, not on the crop.
    s = make_sample(records[1], cfg, sample_rng(0, 0, 0), PriorStream(_WidthPrior()))
    assert np.allclose(s["prior"], records[1].alpha.shape[2] / 1000)
    assert s["src"].shape[-1] == 64 and records[1].alpha.shape[2] != 64


class _CountingPrior(ConstantPrior):
    def __init__(self):
        super().__init__(0.5)
        self.calls = 0

    def __call__(self, frame):
        self.calls += 1
        return super().__call__(frame)


def test_the_first_prior_off_steps_train_with_an_empty_prior_and_never_run_it(records):
    cfg = _cfg(prior_off_steps=2, augment=dataclasses.replace(PLAIN, reverse=0.5, flip=0.5))
    counting = _CountingPrior()
    batches = list(iter_batches(records[:6], cfg, PriorStream(counting)))  # steps 0, 1, 2
    assert [float(b.prior.abs().max()) for b in batches] == [0.0, 0.0, pytest.approx(0.5)]
    assert counting.calls == cfg.batch_size * FRAMES  # the prior ran for step 2's samples only
    # Nothing else about a sample changes: the same draws, the same frames, alpha and flow.
    off = make_sample(records[0], cfg, sample_rng(0, 0, 0), _const_stream(), empty_prior=True)
    on = make_sample(records[0], cfg, sample_rng(0, 0, 0), _const_stream())
    assert all(np.array_equal(off[k], on[k]) for k in on if k != "prior")
    # Validation always has the prior.
    val = next(iter_batches(records[:2], cfg, _const_stream(), augment=False, drop_last=False))
    assert float(val.prior.min()) == pytest.approx(0.5)


def test_a_share_of_the_later_samples_keeps_an_empty_prior_and_nothing_else_moves():
    cfg = _cfg(prior_off_steps=2, prior_off_share=0.3)
    off = [[cfg.prior_is_off(step, rank, i) for i in range(2) for rank in range(2)] for step in range(2, 502)]
    assert all(cfg.prior_is_off(step, rank) for step in range(2) for rank in range(2))
    assert 0.25 < np.mean(off) < 0.35
    assert off == [[cfg.prior_is_off(step, rank, i) for i in range(2) for rank in range(2)] for step in range(2, 502)]
    # the draws are the sample's own: other ranks and indices of a step differ
    assert len({tuple(row) for row in off}) > 4
    plain = _cfg(prior_off_steps=2)
    assert not any(plain.prior_is_off(step, 0, i) for step in range(2, 200) for i in range(2))
    with pytest.raises(ValueError, match="prior_off_share"):
        _cfg(prior_off_share=1.5)


def test_iter_batches_empties_the_prior_of_the_samples_the_share_draws(records):
    cfg = _cfg(prior_off_share=0.5, augment=PLAIN)
    batches = list(iter_batches(records[:8], cfg, _const_stream()))
    empty = [float(b.prior[i].abs().max()) == 0.0 for b in batches for i in range(cfg.batch_size)]
    assert empty == [cfg.prior_is_off(step, 0, i) for step in range(len(batches)) for i in range(cfg.batch_size)]
    assert any(empty) and not all(empty)


def test_validation_samples_are_whole_frames_scaled_to_fit(records):
    s = make_sample(records[0], _cfg(augment=AugmentConfig(size=(64, 64))), sample_rng(0, 0, 0), _const_stream(),
                    augment=False)
    assert s["src"].shape == (FRAMES, 3, 43, 64) and not s["reversed"]
    full = cv2.resize(records[0].alpha[1], (64, 43), interpolation=cv2.INTER_AREA)
    assert np.abs(s["pha"][1, 0] - full).max() < 1e-6


class _GreyPrior(ConstantPrior):
    """The frame's grey as the map: a prior that shows which frames it was run on."""

    def __call__(self, frame):
        return frame.mean(axis=2).astype(np.float32) / 255


class _WidthPrior(ConstantPrior):
    """The width of the frame it sees, over 1000, everywhere."""

    def __call__(self, frame):
        return np.full(frame.shape[:2], frame.shape[1] / 1000, np.float32)


# ---------------------------------------------------------------- losses
@pytest.fixture(scope="module")
def batch(records) -> "E.Batch":
    cfg = _cfg(augment=dataclasses.replace(PLAIN, reverse=0.5))
    return collate([make_sample(r, cfg, sample_rng(0, 0, 0, i), _const_stream()) for i, r in enumerate(records[:2])])


def test_a_perfect_prediction_has_no_loss_and_flicker_has_temporal_loss(batch):
    w = LossWeights()
    perfect = matting_losses(batch.pha, batch.fgr, batch, w)
    assert set(perfect) == {"l1", "mse", "laplacian", "grad", "fgr", "temporal_warp", "temporal_diff", "total"}
    assert all(float(v) < 1e-6 for v in perfect.values())
    sign = torch.tensor([1.0, -1.0] * (FRAMES // 2)).view(1, FRAMES, 1, 1, 1)
    flicker = matting_losses(batch.pha + 0.1 * sign, batch.fgr, batch, w)
    assert flicker["temporal_warp"] > 0.1 and flicker["temporal_diff"] > 0.02
    steady = matting_losses(batch.pha + 0.1, batch.fgr, batch, w)  # wrong, but the same error in every frame
    assert steady["temporal_warp"] < 1e-4 and steady["temporal_diff"] < 1e-6 and steady["l1"] > 0.09


def test_the_squared_error_weighs_a_missed_person_more_than_a_rough_edge(batch):
    # The same L1 error, spread thin over every pixel (0.1) or gathered where alpha is wrong by 1.
    thin = matting_losses(batch.pha + 0.1, batch.fgr, batch, LossWeights())
    gross = batch.pha.clone()
    gross.view(-1)[: gross.numel() // 10] += 1.0
    whole = matting_losses(gross, batch.fgr, batch, LossWeights())
    assert float(thin["l1"]) == pytest.approx(0.1, abs=1e-5) and float(whole["l1"]) == pytest.approx(0.1, abs=1e-3)
    assert float(thin["mse"]) == pytest.approx(0.01, abs=1e-5) and float(whole["mse"]) == pytest.approx(0.1, abs=1e-3)
    # Its weight enters the total (the default is 0).
    weighted = matting_losses(batch.pha + 0.1, batch.fgr, batch, LossWeights(mse=10.0))
    assert float(weighted["total"] - thin["total"]) == pytest.approx(0.1, abs=1e-5)


def test_losses_keep_gradients_where_the_residual_overshoots_a_saturated_prior():
    net = E.build_model(_cfg())
    with torch.no_grad():
        net.output_conv.bias[0] = 0.5  # alpha residual +0.5 everywhere
    src = torch.rand(1, 2, 3, 64, 64)
    prior = torch.ones(1, 2, 1, 64, 64)  # saturated
    true = torch.full_like(prior, 0.5)
    zeros = torch.zeros(1, 2, 2, 64, 64)
    b = E.Batch(src, prior, true, src, zeros, torch.ones(1, 2, 1, 64, 64), [0], [False])
    for clamp, expect in ((False, True), (True, False)):
        net.zero_grad()
        pha, fgr, _ = net(src, prior, None, 1.0, clamp)
        matting_losses(pha, fgr, b, LossWeights())["total"].backward()
        assert (net.output_conv.bias.grad[0].abs() > 1e-3) == expect
    net.zero_grad()
    pha, fgr, _ = E.predict(net, src, prior)  # what train_step uses
    matting_losses(pha, fgr, b, LossWeights())["total"].backward()
    assert net.output_conv.bias.grad[0].abs() > 1e-3


# ---------------------------------------------------------------- step, schedule, evaluation
def test_train_step_overfits_a_repeated_tiny_batch(batch):
    cfg = _cfg(steps=12, tbptt=2, optim=OptimConfig(lr=3e-3, warmup_steps=0, encoder_lr_scale=1.0))
    small = batch.slice(0, 3)
    small = E.Batch(**{**small.__dict__, **{k: getattr(small, k)[:1] for k in
                                            ("src", "prior", "pha", "fgr", "flow", "flow_valid")}})
    model = E.build_model(cfg)
    E.calibrate_batch_norm(model, [small], cfg, "cpu")
    optimizer, scheduler = E.build_optimizer(model, cfg)
    losses = [E.train_step(model, small, optimizer, scheduler, cfg, "cpu") for _ in range(cfg.steps)]
    assert set(losses[0]) >= {"l1", "temporal_warp", "total", "lr", "grad_norm"}
    assert losses[-1]["total"] < 0.6 * losses[0]["total"]
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_the_schedule_warms_up_then_follows_a_cosine_to_its_floor():
    cfg = _cfg(steps=100, optim=OptimConfig(lr=1e-3, warmup_steps=10, min_lr_ratio=0.1, encoder_lr_scale=0.1,
                                            freeze_stages=2))
    model = E.build_model(cfg)
    assert not any(p.requires_grad for p in model.stages[:2].parameters())
    assert all(p.requires_grad for p in model.stages[2].parameters())
    optimizer, scheduler = E.build_optimizer(model, cfg)
    groups = {g["name"]: g for g in optimizer.param_groups}
    lrs, enc, cal = [], [], []
    for _ in range(cfg.steps):
        lrs.append(groups["decoder"]["lr"])
        enc.append(groups["encoder"]["lr"])
        cal.append(groups["calibration_no_decay"]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)
    assert all(a > b for a, b in zip(lrs[10:-1], lrs[11:]))
    assert lrs[-1] == pytest.approx(1e-4)
    mid = 10 + (100 - 10 - 1) // 2
    assert lrs[mid] == pytest.approx(1e-3 * (0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * (mid - 10) / 89))))
    assert np.allclose(enc, np.array(lrs) * 0.1)
    assert np.allclose(cal, np.array(lrs) * cfg.optim.calibration_lr_scale)
    assert groups["calibration_no_decay"]["params"] == [model.calibration.delta]
    assert groups["decoder_no_decay"]["weight_decay"] == 0.0


def test_evaluate_runs_in_eval_mode_and_restores_every_module_mode(batch):
    cfg = _cfg()
    model = E.build_model(cfg)
    E.set_train_mode(model, cfg)
    before = [m.training for m in model.modules()]
    assert model.training and not model.stages[0][0][1].training  # frozen batch norm
    seen = []
    model.register_forward_hook(lambda m, i, o: seen.append(m.training))
    metrics = E.evaluate(model, [batch], cfg, "cpu")
    assert seen == [False] and [m.training for m in model.modules()] == before
    assert set(metrics) == {"loss", "mad", "mse", "grad", "dtssd", "clips"} and metrics["clips"] == 2
    # The untrained net returns the prior: its MAD is the prior's.
    assert metrics["mad"] == pytest.approx(1e3 * float((batch.prior - batch.pha).abs().mean()), rel=1e-4)


def test_the_output_fit_undoes_a_soft_alpha_and_keeps_the_identity_for_an_exact_one(batch):
    net = E.build_model(_cfg())  # untrained: its alpha is the prior; frames at the work side: no refiner
    soft = dataclasses.replace(batch, prior=0.5 + (batch.pha - 0.5) * 0.4)  # the truth, squeezed towards 0.5
    fit = E.fit_output(net, [soft], _cfg(), "cpu")
    assert (fit["gain"], fit["centre"]) == (2.5, 0.5) and fit["mad_fit"] < 1e-3 < 0.1 * fit["mad"]
    assert fit["refine_radius"] == 1  # the model's own: without a refiner every radius is the same
    assert net.config["output_curve"] == [1.0, 0.5] and net.training  # the model is left as it was
    exact = E.fit_output(net, [dataclasses.replace(batch, prior=batch.pha)], _cfg(), "cpu")
    assert (exact["gain"], exact["centre"]) == (1.0, 0.5) and exact["mad"] == exact["mad_fit"] < 1e-3


def test_the_output_fit_refuses_a_curve_that_lowers_mad_but_amplifies_flicker(batch):
    net = E.build_model(_cfg())  # untrained: its alpha is the prior; frames at the work side: no refiner
    B, T, _, H, W = batch.pha.shape
    ramp = torch.linspace(0.1, 0.9, W).expand(B, T, 1, H, W)  # a static soft truth the curve never clamps
    noise = 0.01 * torch.randn(B, T, 1, H, W, generator=torch.Generator().manual_seed(0))
    flickering = 0.5 + (ramp - 0.5) * 0.4 + noise  # squeezed like `soft` above, and flickering
    clip = dataclasses.replace(batch, pha=ramp, prior=flickering)
    fit = E.fit_output(net, [clip], _cfg(), "cpu")
    # gain 2.5 would cut MAD about threefold, and multiply the flicker (dtSSD) by 2.5
    assert (fit["gain"], fit["centre"]) == (1.0, 0.5) and fit["mad_fit"] == fit["mad"] > 50
    assert fit["dtssd_fit"] == fit["dtssd"] > 0.5
    unbounded = E._mad_dtssd([flickering[:, :, 0]], [ramp[:, :, 0]], lambda p: output_curve(p, 2.5, 0.5))
    assert unbounded[0] * 1e3 < fit["mad"] / 3 and unbounded[1] > 2 * fit["dtssd"]
    clips = []  # the fit's dtSSD is the evaluation's
    for b in range(B):
        seq = SequenceMetrics(metrics=("dtssd",))
        for t in range(T):
            seq.update(flickering[b, t, 0].numpy(), ramp[b, t, 0].numpy())
        clips.append(seq.summary()["dtssd"])
    assert fit["dtssd"] == pytest.approx(np.mean(clips), rel=1e-4)


def test_the_output_fit_may_spend_the_models_temporal_margin_over_the_prior(batch):
    net = E.build_model(_cfg())
    with torch.no_grad():  # the calibration squeezes the prior towards 0.5 by 0.45: less flicker, and too soft
        net.calibration.delta.copy_(-0.55 * (torch.linspace(0, 1, net.calibration.knots) - 0.5))
    B, T, _, H, W = batch.pha.shape
    ramp = torch.linspace(0.1, 0.9, W).expand(B, T, 1, H, W)
    flickering = ramp + 0.01 * torch.randn(B, T, 1, H, W, generator=torch.Generator().manual_seed(0))
    fit = E.fit_output(net, [dataclasses.replace(batch, pha=ramp, prior=flickering)], _cfg(), "cpu")
    # gain g leaves 0.45 g of the prior's flicker: 2 is the steepest under it (2.5 would be 1.125)
    assert fit["dtssd"] == pytest.approx(0.45 * fit["prior_dtssd"], rel=0.02)
    assert (fit["gain"], fit["centre"]) == (2.0, 0.5) and fit["dtssd"] < fit["dtssd_fit"] <= fit["prior_dtssd"]
    assert fit["mad_fit"] < fit["mad"] / 3


def test_the_output_fit_runs_the_refiner_as_inference_does_and_finds_its_radius(records):
    cfg = _cfg(model={"work_side": SIZE[0] // 2})  # the clips are twice the work side: ratio 0.5
    [full] = iter_batches(records[:2], cfg, _const_stream(), augment=False, native_size=True)
    assert full.src.shape[-2:] == (SIZE[1], SIZE[0])  # their own size, not scaled to the training size
    full = dataclasses.replace(full, prior=full.pha)  # the untrained net's alpha is the prior
    net = E.build_model(cfg)
    net.eval()
    net.refiner.filter.radius = 3
    with torch.no_grad():
        truth = net(full.src, full.prior, None, 0.5)[0]  # what radius 3 makes of it
    net.refiner.filter.radius = 1
    fit = E.fit_output(net, [dataclasses.replace(full, pha=truth)], cfg, "cpu")
    assert (fit["refine_radius"], fit["gain"], fit["centre"]) == (3, 1.0, 0.5)
    assert fit["mad_fit"] < 1e-3 < fit["mad"]
    assert net.refiner.filter.radius == 1 and net.config["refine_radius"] == 1  # left as it was
    metrics = E.set_fitted_output(net, [dataclasses.replace(full, pha=truth)], cfg, "cpu")
    assert metrics["refine_radius"] == 3 and net.refiner.filter.radius == 3 and net.config["refine_radius"] == 3


def _ddp_worker(rank: int, folder: str, bn: str = "frozen") -> None:
    """One of two DDP ranks: a step on its own random clip; saves its weights afterwards."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{folder}/pg", rank=rank, world_size=2)
    try:
        cfg = _cfg(tbptt=2, bn=bn)  # 3 frames: two chunks, the first without gradient synchronisation
        model = torch.nn.parallel.DistributedDataParallel(E.prepare_batch_norm(E.build_model(cfg), cfg))
        optimizer, scheduler = E.build_optimizer(model, cfg)
        gen = torch.Generator().manual_seed(rank)
        src, prior, pha = (torch.rand(1, 3, c, 64, 64, generator=gen) for c in (3, 1, 1))
        batch = E.Batch(src, prior, pha, src, torch.zeros(1, 3, 2, 64, 64), torch.ones(1, 3, 1, 64, 64), [rank], [False])
        out = E.train_step(model, batch, optimizer, scheduler, cfg, "cpu")
        torch.save({"total": out["total"], "state": E.unwrap(model).state_dict()}, f"{folder}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("bn", ["frozen", "sync"])
def test_train_step_under_distributed_data_parallel(tmp_path, bn):
    # bn="sync" on CPUs keeps plain batch norms (SyncBatchNorm runs only on GPU modules).
    torch.multiprocessing.spawn(_ddp_worker, args=(str(tmp_path), bn), nprocs=2)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert r0["total"] != r1["total"]  # different data on each rank...
    fresh = E.build_model(_cfg()).state_dict()
    # ...and the same weights after the step: gradients were averaged (with batch statistics, each
    # rank's running statistics follow its own batch)
    weights = {n for n, _ in E.build_model(_cfg()).named_parameters()} if bn == "sync" else set(r0["state"])
    for name in weights:
        assert torch.allclose(r0["state"][name], r1["state"][name], atol=1e-7), name
    assert not torch.equal(r0["state"]["head.out.weight"], fresh["head.out.weight"])


# ---------------------------------------------------------------- data split, config, the loop
def test_split_by_photo_keeps_every_photo_on_one_side(records):
    train, val = E.split_by_photo(records, 0.34, seed=0)
    photo = {r.clip_id: r.photo for r in records}
    assert sorted(train + val) == sorted(photo) and val
    assert not {photo[i] for i in train} & {photo[i] for i in val}
    assert E.split_by_photo(records, 0.34, seed=0) == (train, val)
    assert E.split_by_photo(["a", "b", "a", "c"], 0.3, seed=1)[1] in ([0, 2], [1], [3])
    with pytest.raises(ValueError, match="at least 2 photos"):
        E.split_by_photo([(0, "a"), (1, "a")], 0.5, seed=0)


def test_build_model_records_the_resolved_prior_and_seeds_its_initialisation():
    state = torch.random.get_rng_state()
    net = E.build_model(_cfg())
    assert net.config["prior"] == resolve_prior_spec(None)
    assert torch.count_nonzero(net.output_conv.weight) == 0  # exactly the prior until trained
    a, b = E.build_model(_cfg(head_init=1e-3)), E.build_model(_cfg(head_init=1e-3))
    assert torch.equal(a.output_conv.weight, b.output_conv.weight)
    assert 5e-4 < float(a.output_conv.weight.detach().std()) < 2e-3
    assert torch.equal(torch.random.get_rng_state(), state)  # the global generator is left alone


def test_the_training_prior_runs_on_one_thread_and_the_spec_does_not_say_so(selfie_model_cache, monkeypatch):
    from matting_core.prior import prior_stream_from_spec

    monkeypatch.setenv("MATTING_MODEL_CACHE", str(selfie_model_cache))
    loading, default = E.build_prior_stream(_cfg()), prior_stream_from_spec(None)
    assert loading.prior.num_threads == 1 and default.prior.num_threads == 2
    assert E.build_prior_stream(_cfg(), device="cuda").prior.num_threads == 2  # on a GPU the cores are the loader's
    assert loading.spec == default.spec == resolve_prior_spec(None)  # a runtime setting, not recorded


def test_presets_and_config_round_trip():
    assert set(PRESETS) >= {"cpu-small", "gpu"}
    assert PRESETS["gpu"].augment.size == (512, 288) and 8 <= PRESETS["gpu"].frames <= 15
    for cfg in PRESETS.values():
        assert recipe_from_dict(json.loads(json.dumps(recipe_to_dict(cfg)))) == cfg
    with pytest.raises(ValueError, match="unknown key"):
        recipe_from_dict({"optim": {"lr": 1e-3, "momentum": 0.9}})
    with pytest.raises(ValueError, match="bn"):
        RecipeConfig(bn="group")


def test_main_trains_validates_by_photo_and_writes_a_checkpoint_that_folds(dataset, tmp_path, monkeypatch,
                                                                          selfie_model_cache):
    monkeypatch.setenv("MATTING_MODEL_CACHE", str(selfie_model_cache))
    cfg = _cfg(steps=3, batch_size=2, val_share=0.34, checkpoint_every=2, val_every=2, log_every=1,
               augment=AugmentConfig(size=(64, 64), background=0.5))
    out = tmp_path / "run"
    result = E.main(cfg, dataset, out_dir=str(out), device="cpu", log=None)
    assert result["step"] == 3 and np.isfinite(result["train/loss"]) and result["val/clips"] == 2
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-000002.pt", "checkpoint-000003.pt"]
    assert [h["step"] for h in result["history"]] == [0, 1, 2, 3] and "val/mad" in result["history"][2]

    net = load_checkpoint(result["checkpoint"])
    assert net.config["prior"] == resolve_prior_spec(None)
    # fitted at the end
    assert net.config["output_curve"] == [result["val/curve_gain"], result["val/curve_centre"]]
    assert net.config["refine_radius"] == result["val/refine_radius"]
    assert result["val/fitted_dtssd"] <= max(result["val/prior_dtssd"], result["val/full_dtssd"]) + 1e-9
    extra = net.checkpoint_extra
    assert extra["step"] == 3 and recipe_from_dict(extra["recipe"]) == cfg
    assert {"optimizer", "scheduler", "data_position"} <= set(extra)
    bn = net.stages[0][0][1]
    assert not torch.allclose(bn.running_var, torch.ones_like(bn.running_var))  # calibrated, then kept
    fast = optimize_for_inference(net)
    src, prior = torch.rand(1, 3, 3, 64, 64), torch.rand(1, 3, 1, 64, 64)
    with torch.no_grad():
        a, f, _ = net(src, prior)
        b, g, _ = fast(src, prior)
    assert (a - b).abs().max() < 1e-4 and (f - g).abs().max() < 1e-4

    again = E.main(cfg, dataset, out_dir=str(out), device="cpu", log=None)  # resumes at the end: nothing to do
    assert again["step"] == 3 and again["checkpoint"].endswith("checkpoint-000003.pt")
    with pytest.raises(ValueError, match="another recipe"):
        E.main(dataclasses.replace(cfg, steps=4), dataset, out_dir=str(out), device="cpu", log=None)


def test_a_window_read_alone_gives_the_sample_of_the_whole_clip(dataset):
    """The job decodes only the sample's window (ClipIndex.read(frames=...)): same sample as from the whole clip."""
    from matting_core.data.clip_index import ClipIndex
    from matting_core.training.batches import draw_window, make_sample, sample_rng

    index = ClipIndex(dataset)
    cfg = _cfg(frames=2, augment=dataclasses.replace(AugmentConfig(size=(64, 48)), background=0.3, still=0.5))
    starts = set()
    for clip_id in index.ids:
        whole = make_sample(index.read(clip_id, RECORD_COLUMNS), cfg, sample_rng(0, 3, 0, clip_id), _const_stream())
        rng = sample_rng(0, 3, 0, clip_id)
        start = draw_window(rng, index.entries[clip_id].num_frames, cfg.frames)
        part = index.read(clip_id, RECORD_COLUMNS, frames=slice(start, start + cfg.frames))
        assert part.frames.shape[0] == part.flow.shape[0] == part.bgr.shape[0] == cfg.frames
        windowed = make_sample(part, cfg, rng, _const_stream(), window_drawn=True)
        for key in ("src", "prior", "pha", "fgr", "flow", "flow_valid"):
            np.testing.assert_array_equal(whole[key], windowed[key], err_msg=f"clip {clip_id} {key}")
        starts.add(start)
    assert len(starts) > 1  # windows other than the first were drawn
    with pytest.raises(ValueError, match="exactly"):
        make_sample(index.read(clip_id, RECORD_COLUMNS), cfg, sample_rng(0, 3, 0, 0), _const_stream(), window_drawn=True)


def test_a_sample_decodes_the_background_only_when_it_draws_a_pause(dataset, monkeypatch):
    """ClipIndex.read defers bgr: a sample without a pause never decodes it; one with a pause is the
    same as from a record decoded at once; a deferred column that is not JPEG data fails the read."""
    import pyarrow.parquet as pq

    from matting_core.data import clips
    from matting_core.data.clip_index import ClipIndex

    decoded = []
    decode = clips._decode_images
    monkeypatch.setattr(clips, "_decode_images", lambda name, *a: decoded.append(name) or decode(name, *a))
    index = ClipIndex(dataset)
    for still in (0.0, 1.0):
        cfg = _cfg(frames=2, augment=dataclasses.replace(AugmentConfig(size=(64, 48)), background=0.0, still=still))
        for clip_id in index.ids[:3]:
            decoded.clear()
            record = index.read(clip_id, RECORD_COLUMNS, frames=slice(1, 3))
            sample = make_sample(record, cfg, sample_rng(0, 1, 0, clip_id), _const_stream(), window_drawn=True)
            assert decoded.count("bgr") == (1 if still else 0) and decoded.count("frames") == 1
            eager = index.read(clip_id, RECORD_COLUMNS, frames=slice(1, 3), defer=())
            again = make_sample(eager, cfg, sample_rng(0, 1, 0, clip_id), _const_stream(), window_drawn=True)
            for key in ("src", "prior", "pha", "fgr", "flow", "flow_valid"):
                np.testing.assert_array_equal(sample[key], again[key], err_msg=f"clip {clip_id} {key}")
    row = next(pq.ParquetFile(index.entries[index.ids[0]].shard).iter_batches(batch_size=1)).to_pylist()[0]
    row["bgr"] = [b"not a jpeg"] * len(row["bgr"])
    with pytest.raises(ValueError, match="bgr"):
        clips.decode_row(row, defer=("bgr",))
