"""matting_core.evaluation.metrics against golden values, hand-computed tiny arrays and invariants."""
from __future__ import annotations

import json
import math
from pathlib import Path

import cv2
import numpy as np
import pytest

from matting_core.evaluation import metrics as M

GOLDEN = Path(__file__).resolve().parents[1].parent / "shared" / "golden" / "metrics.json"
REL = 1e-6


@pytest.fixture(scope="module")
def golden() -> dict:
    if not GOLDEN.exists():
        pytest.skip(f"golden metric values absent: {GOLDEN}")
    return json.loads(GOLDEN.read_text())


def _u8(values) -> np.ndarray:
    return np.asarray(values, dtype=np.float64) / 255.0


@pytest.mark.parametrize("case_index", [0, 1, 2])
def test_alpha_metrics_match_golden(golden, case_index):
    case = golden["cases"][case_index]
    pred_prev, true_prev = _u8(case["pred_prev_u8"]), _u8(case["true_prev_u8"])
    pred, true = _u8(case["pred_u8"]), _u8(case["true_u8"])
    assert pred.shape == tuple(case["shape"])
    for name, expected in case["expected_on_prev_frame"].items():
        assert getattr(M, name)(pred_prev, true_prev) == pytest.approx(expected, rel=REL), name
    assert M.dtssd(pred, pred_prev, true, true_prev) == pytest.approx(case["expected_dtssd"], rel=REL)


def test_alpha_metrics_match_golden_in_float32(golden):
    case = golden["cases"][0]
    pred, true = _u8(case["pred_prev_u8"]).astype(np.float32), _u8(case["true_prev_u8"]).astype(np.float32)
    # conn compares against k/10 thresholds: float32 153/255 is not 0.6, so only the rest is exact.
    for name in ("mad", "sad", "mse", "grad"):
        assert getattr(M, name)(pred, true) == pytest.approx(case["expected_on_prev_frame"][name], rel=1e-5)


def test_foreground_metrics_match_golden(golden):
    case = golden["foreground_case"]
    true_pha = _u8(case["true_alpha_u8"])
    true_fgr = np.asarray(case["true_fgr_u8"], dtype=np.uint8)
    pred_fgr = np.asarray(case["pred_fgr_u8"], dtype=np.uint8)
    assert M.fgr_mad(pred_fgr, true_fgr, true_pha) == pytest.approx(case["expected"]["fgr_mad"], rel=REL)
    assert M.fgr_mse(pred_fgr, true_fgr, true_pha) == pytest.approx(case["expected"]["fgr_mse"], rel=REL)
    # The same values from foregrounds in [0,1].
    assert M.fgr_mad(pred_fgr / 255.0, true_fgr / 255.0, true_pha) == pytest.approx(case["expected"]["fgr_mad"], rel=REL)


def test_messddt_matches_golden(golden):
    case = golden["messddt_case"]
    pred, true = _u8(case["pred_u8"]), _u8(case["true_u8"])
    flow = np.zeros(pred.shape + (2,), np.float32)
    flow[..., 0], flow[..., 1] = case["flow_dx"], case["flow_dy"]
    got = M.messddt(pred, _u8(case["pred_prev_u8"]), true, _u8(case["true_prev_u8"]), flow)
    assert got == pytest.approx(case["expected_messddt_frame1"], rel=REL)


def test_grad_of_constant_map_matches_golden(golden):
    case = golden["grad_constant_case"]
    pred = _u8(case["pred_u8"])
    true = np.full_like(pred, case["true_constant_value_u8"] / 255.0)
    assert M.grad(pred, true) == pytest.approx(case["expected_grad"], rel=REL)


def test_hand_computed_pixel_metrics():
    pred = np.array([[0.0, 0.5], [1.0, 0.25]])
    true = np.array([[0.0, 1.0], [0.5, 0.25]])
    # |d| = 0, .5, .5, 0 -> mean .25, sum 1; d^2 mean = .125
    assert M.mad(pred, true) == pytest.approx(250.0)
    assert M.sad(pred, true) == pytest.approx(1e-3)
    assert M.mse(pred, true) == pytest.approx(125.0)
    # dtssd: (p_t - p_prev) - (t_t - t_prev) = [.5, 0, 0, 0] -> sqrt(.0625) = .25 -> 25
    assert M.dtssd(pred, np.zeros((2, 2)) + [[0, 0], [0.5, 0.25]], true, np.zeros((2, 2)) + [[0.5, 1], [0, 0.25]]) \
        == pytest.approx(1e2 * math.sqrt(np.mean(np.square(
            (pred - [[0, 0], [0.5, 0.25]]) - (true - np.array([[0.5, 1], [0, 0.25]]))))))
    p_prev = np.zeros((2, 2))
    t_prev = np.zeros((2, 2))
    p_t = np.array([[0.5, 0.0], [0.0, 0.0]])
    assert M.dtssd(p_t, p_prev, t_prev, t_prev) == pytest.approx(25.0)


def test_hand_computed_conn():
    # Truth is 1 on a 1x3 strip; prediction misses the right pixel (0) and has an isolated 1 far away.
    true = np.zeros((1, 5))
    true[0, :3] = 1.0
    pred = np.zeros((1, 5))
    pred[0, :2] = 1.0
    pred[0, 4] = 1.0
    # Intersection at every threshold is pixels {0,1}: they keep l = 1, all other pixels get l = 0.
    # phi: pixels 0,1: d = 0 -> phi 1 for both. pixel 2: t d=1 -> 0, p d=0 -> 1 => |.|=1.
    # pixel 4: t d=0 -> 1, p d=1 -> 0 => 1. Pixel 3: both 0. Sum 2 -> /1e3.
    assert M.conn(pred, true) == pytest.approx(2e-3)


def test_hand_computed_fgr_and_messddt():
    true_pha = np.array([[0.0, 1.0], [0.5, 0.0]])
    true_fgr = np.zeros((2, 2, 3), np.uint8)
    pred_fgr = np.zeros((2, 2, 3), np.uint8)
    pred_fgr[0, 0] = 255  # outside the true alpha: ignored
    pred_fgr[0, 1, 0] = 51  # 0.2 in one channel of a counted pixel
    # 2 pixels x 3 channels = 6 values, one of them 0.2
    assert M.fgr_mad(pred_fgr, true_fgr, true_pha) == pytest.approx(1e3 * 0.2 / 6)
    assert M.fgr_mse(pred_fgr, true_fgr, true_pha) == pytest.approx(1e3 * 0.04 / 6)

    # A half-pixel shift: E_prev sampled between two pixels averages them.
    err_prev = np.array([[0.0, 1.0, 0.0]])
    pred_prev, true_prev = np.sqrt(err_prev), np.zeros((1, 3))
    pred_t, true_t = np.zeros((1, 3)), np.zeros((1, 3))
    flow = np.zeros((1, 3, 2))
    flow[..., 0] = 0.5  # sources 0.5, 1.5 inside; 2.5 outside
    # |0 - 0.5| and |0 - 0.5| -> mean 0.5
    assert M.messddt(pred_t, pred_prev, true_t, true_prev, flow) == pytest.approx(500.0)


def test_zero_for_identical_inputs_and_symmetry():
    rng = np.random.default_rng(0)
    a = cv2.GaussianBlur(rng.random((40, 50)), (0, 0), 3)
    a = (a - a.min()) / (a.max() - a.min())
    b = np.clip(a + rng.normal(0, 0.1, a.shape), 0, 1)
    for name in M.ALPHA_METRICS:
        fn = getattr(M, name)
        assert fn(a, a) == pytest.approx(0.0, abs=1e-20), name  # grad: OpenCV filter stripes may differ by ~1e-18
        assert fn(a, b) > 0.0, name
        # Every alpha metric here is symmetric in (pred, true) by its definition.
        assert fn(a, b) == pytest.approx(fn(b, a), rel=1e-12), name
    fgr = rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)
    assert M.fgr_mad(fgr, fgr, a) == 0.0 and M.fgr_mse(fgr, fgr, a) == 0.0
    flow = rng.normal(0, 2, (40, 50, 2))
    assert M.messddt(b, b, b, b, flow) == 0.0


def test_dtssd_zero_when_prediction_and_truth_change_identically():
    rng = np.random.default_rng(1)
    true_prev, pred_prev = rng.random((30, 20)), rng.random((30, 20))
    change = rng.normal(0, 0.2, (30, 20))
    assert M.dtssd(pred_prev + change, pred_prev, true_prev + change, true_prev) == pytest.approx(0.0, abs=1e-12)
    assert M.dtssd(pred_prev + change, pred_prev, true_prev, true_prev) > 1.0


def test_messddt_zero_for_a_constant_error_moving_with_the_flow():
    # The error pattern translates by the flow: warped E_prev equals E_t wherever it is defined.
    rng = np.random.default_rng(2)
    base = rng.random((20, 30))
    true_prev, true_t = np.zeros((20, 30)), np.zeros((20, 30))
    pred_prev = base
    pred_t = np.roll(base, shift=(1, -2), axis=(0, 1))  # content moved down 1, left 2
    flow = np.zeros((20, 30, 2))
    flow[..., 0], flow[..., 1] = 2, -1  # x_t came from (x + 2, y - 1)
    got = M.messddt(pred_t, pred_prev, true_t, true_prev, flow)
    assert got == pytest.approx(0.0, abs=1e-9)
    assert M.messddt(pred_t, pred_prev, true_t, true_prev, np.zeros_like(flow)) > 10.0


def test_metric_inputs_must_agree_in_shape():
    with pytest.raises(ValueError, match="shape"):
        M.mad(np.zeros((4, 4)), np.zeros((4, 5)))


def test_flow_warp_error_is_low_for_a_matte_that_follows_the_video():
    rng = np.random.default_rng(3)
    texture = cv2.GaussianBlur((rng.random((120, 160, 3)) * 255).astype(np.uint8), (0, 0), 1.5)
    frame_prev = texture
    frame_t = np.roll(texture, 3, axis=1)
    pha_prev = np.zeros((120, 160))
    pha_prev[30:90, 40:100] = 1.0
    pha_follow = np.roll(pha_prev, 3, axis=1)
    follow = M.flow_warp_error(pha_follow, pha_prev, frame_t, frame_prev)
    still = M.flow_warp_error(pha_prev, pha_prev, frame_t, frame_prev)
    assert follow < 10.0
    # 3-pixel edges on both sides of a 60-row box: 360 of ~19200 pixels differ -> about 18.75
    assert still > 15.0 and still > 10 * follow


def test_sequence_metrics_averaging_rules():
    rng = np.random.default_rng(4)
    true = [rng.random((8, 9)) for _ in range(4)]
    pred = [np.clip(t + rng.normal(0, 0.1, t.shape), 0, 1) for t in true]
    seq = M.SequenceMetrics(metrics=("mad", "dtssd", "messddt"))
    flows = np.zeros((8, 9, 2))
    for p, t in zip(pred, true):
        seq.update(p, t, flow=flows)
    summary = seq.summary()
    assert summary["mad"] == pytest.approx(np.mean([M.mad(p, t) for p, t in zip(pred, true)]))
    dts = [M.dtssd(pred[i], pred[i - 1], true[i], true[i - 1]) for i in range(1, 4)]
    assert summary["dtssd"] == pytest.approx(sum(dts) / 4)  # frame 0 counts as 0, over all T
    mes = [M.messddt(pred[i], pred[i - 1], true[i], true[i - 1], flows) for i in range(1, 4)]
    assert summary["messddt"] == pytest.approx(sum(mes) / 3)  # over frames 1..T-1
    assert "messddt" not in seq.frames[0] and seq.frames[0]["dtssd"] == 0.0
    with pytest.raises(ValueError, match="unknown metrics"):
        M.SequenceMetrics(metrics=("mad", "bogus"))


def test_mad_edge_measures_only_the_band_around_partly_transparent_truth():
    true = np.zeros((288, 512), np.float32)
    true[:, :256] = 1.0
    true[:, 256] = 0.5  # the one partly transparent column
    band = M.edge_band(true)
    assert band[:, 246:267].all() and not band[:, :245].any() and not band[:, 268:].any()
    pred = true.copy()
    pred[:, 256] = 1.0        # 0.5 off on the edge column (21 band columns)
    pred[:, 400:410] = 1.0    # far from the edge: counts in mad, not in mad_edge
    assert M.mad_edge(pred, true) == pytest.approx(1e3 * 0.5 / 21, rel=1e-6)
    assert M.mad(pred, true) > M.mad_edge(pred, true) * 0.2
    # The band grows with the frame: 20 px at 1024x576.
    big = np.kron(true, np.ones((2, 2), np.float32))
    assert M.edge_band(big)[0].sum() == 2 + 2 * 20  # two soft columns, 20 px either side
    assert M.mad_edge(np.ones((4, 4)), np.ones((4, 4))) == 0.0  # no soft pixel: no band
