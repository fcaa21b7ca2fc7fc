"""The field's matting metrics, with the scaling of the published tables (DESIGN.md, Metrics).

Per-frame functions take alpha maps `[H,W]` in [0,1] (any float dtype; computed in float64) and
return a float. `SequenceMetrics` streams a clip frame by frame and averages as the field does:
`dtssd` counts frame 0 as 0 and averages over all T frames, `messddt` averages over frames 1..T-1.
`messddt` is this project's motion-aware temporal error: not comparable with other papers' numbers.
`flow_warp_error` is a no-reference temporal error for real videos without ground truth.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import cv2
import numpy as np

from matting_core.flow import dis_flow

__all__ = [
    "mad", "mad_edge", "edge_band", "sad", "mse", "grad", "conn", "dtssd", "fgr_mad", "fgr_mse", "messddt",
    "alpha_flow", "warp_bilinear", "flow_warp_error", "SequenceMetrics",
    "ALPHA_METRICS", "FGR_METRICS", "TEMPORAL_METRICS", "ALL_METRICS", "METRIC_NOTES",
]

ALPHA_METRICS = ("mad", "mad_edge", "sad", "mse", "grad", "conn")
FGR_METRICS = ("fgr_mad", "fgr_mse")
TEMPORAL_METRICS = ("dtssd", "messddt")
EDGE_RADIUS, EDGE_REFERENCE_AREA = 10, 512 * 288
ALL_METRICS = ALPHA_METRICS + ("dtssd", "messddt") + FGR_METRICS
METRIC_NOTES = {
    "mad": "1e3 * mean |p - t|",
    "mad_edge": "1e3 * mean |p - t| over the band where 0 < t < 1, dilated by 10 px at 512x288 "
                "(scaled with the frame): where matting differs from segmentation",
    "sad": "sum |p - t| / 1e3", "mse": "1e3 * mean (p - t)^2",
    "grad": "sum (|G(p)| - |G(t)|)^2 / 1e3, Gaussian-derivative sigma 1.4",
    "conn": "connectivity error / 1e3, thresholds k/10",
    "dtssd": "1e2 * sqrt(mean(((p_t - p_t-1) - (t_t - t_t-1))^2)); frame 0 counts as 0",
    "messddt": "this project's motion-aware temporal error (1e3 scale, DIS flow on true alphas "
               "unless ground-truth flow is known); not comparable with other papers' numbers",
    "fgr_mad": "1e3 * mean |F_p - F_t| over pixels with true alpha > 0",
    "fgr_mse": "1e3 * mean (F_p - F_t)^2 over pixels with true alpha > 0",
}


def _f64(a: np.ndarray) -> np.ndarray:
    return np.asarray(a, dtype=np.float64)


def _as_float(a: np.ndarray) -> np.ndarray:
    """float32/float64 arrays as they are (no copy); anything else as float64."""
    a = np.asarray(a)
    return a if a.dtype in (np.float32, np.float64) else a.astype(np.float64)


def _check_same_shape(*arrays: np.ndarray) -> None:
    shapes = {a.shape for a in arrays}
    if len(shapes) != 1:
        raise ValueError(f"metric inputs differ in shape: {sorted(shapes)}")


def mad(pred: np.ndarray, true: np.ndarray) -> float:
    """1e3 * mean |pred - true| of alpha `[H,W]`."""
    _check_same_shape(pred, true)
    return float(np.abs(_f64(pred) - _f64(true)).mean() * 1e3)


def edge_band(true: np.ndarray, radius: int | None = None) -> np.ndarray:
    """bool [H,W]: pixels within `radius` of a partly transparent true pixel (0 < t < 1).

    `radius` defaults to 10 px at 512x288, scaled with the frame's size (square root of its area).
    """
    t = _as_float(true)
    if radius is None:
        radius = max(1, round(EDGE_RADIUS * np.sqrt(t.shape[0] * t.shape[1] / EDGE_REFERENCE_AREA)))
    unknown = ((t > 0) & (t < 1)).astype(np.uint8)
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))
    return cv2.dilate(unknown, kernel).astype(bool)


def mad_edge(pred: np.ndarray, true: np.ndarray) -> float:
    """1e3 * mean |p - t| over `edge_band(true)`; 0 where the truth has no partly transparent pixel."""
    p, t = _as_float(pred), _as_float(true)
    _check_same_shape(p, t)
    band = edge_band(t)
    return float(1e3 * np.abs(_f64(p[band]) - _f64(t[band])).mean()) if band.any() else 0.0


def sad(pred: np.ndarray, true: np.ndarray) -> float:
    """sum |pred - true| / 1e3 of alpha `[H,W]`."""
    _check_same_shape(pred, true)
    return float(np.abs(_f64(pred) - _f64(true)).sum() / 1e3)


def mse(pred: np.ndarray, true: np.ndarray) -> float:
    """1e3 * mean (pred - true)^2 of alpha `[H,W]`."""
    _check_same_shape(pred, true)
    return float(np.square(_f64(pred) - _f64(true)).mean() * 1e3)


def _gauss_derivative_kernels(sigma: float = 1.4, epsilon: float = 1e-2) -> tuple[np.ndarray, np.ndarray]:
    """1-D factors (derivative, smoothing) of the L2-normalised Gaussian-derivative filter."""
    half = math.ceil(sigma * math.sqrt(-2.0 * math.log(math.sqrt(2.0 * math.pi) * sigma * epsilon)))
    x = np.arange(-half, half + 1, dtype=np.float64)
    gauss = np.exp(-x ** 2 / (2 * sigma ** 2)) / (sigma * math.sqrt(2 * math.pi))
    dgauss = -x * gauss / sigma ** 2
    # The 2-D filter g(row) * dg(col) is separable, so its L2 norm is the product of the factors' norms.
    return dgauss / np.linalg.norm(dgauss), gauss / np.linalg.norm(gauss)


_DERIV, _SMOOTH = _gauss_derivative_kernels()


def _minmax(a: np.ndarray) -> np.ndarray:
    """Min-max normalisation to [0,1] in float64; a constant map becomes all zeros (as cv2.normalize does)."""
    return cv2.normalize(np.asarray(a), None, 1.0, 0.0, cv2.NORM_MINMAX, dtype=cv2.CV_64F)


def _gauss_gradient(a: np.ndarray) -> np.ndarray:
    gx = cv2.sepFilter2D(a, cv2.CV_64F, _DERIV, _SMOOTH, borderType=cv2.BORDER_REPLICATE)
    gy = cv2.sepFilter2D(a, cv2.CV_64F, _SMOOTH, _DERIV, borderType=cv2.BORDER_REPLICATE)
    return cv2.magnitude(gx, gy)


def grad(pred: np.ndarray, true: np.ndarray) -> float:
    """Gradient error: sum (|G(p)| - |G(t)|)^2 / 1e3 after min-max normalising each map."""
    _check_same_shape(pred, true)
    gp = _gauss_gradient(_minmax(_as_float(pred)))
    gt = _gauss_gradient(_minmax(_as_float(true)))
    return float(cv2.norm(gp, gt, cv2.NORM_L2SQR) / 1e3)


def _largest_component(mask: np.ndarray) -> np.ndarray:
    """Boolean map of the largest 4-connected component of `mask` (lowest label on ties)."""
    count, labels = cv2.connectedComponents(mask.view(np.uint8), connectivity=4, ltype=cv2.CV_32S)
    if count <= 1:
        return np.zeros(mask.shape, dtype=bool)
    # Labels plus bincount cost about half of connectedComponentsWithStats at 1080p.
    areas = np.bincount(labels.ravel(), minlength=count)
    return labels == 1 + int(np.argmax(areas[1:]))


def conn(pred: np.ndarray, true: np.ndarray) -> float:
    """Connectivity error / 1e3 with thresholds k/10 and 4-connectivity (DESIGN.md)."""
    _check_same_shape(pred, true)
    p, t = _f64(pred), _f64(true)
    both = np.minimum(p, t)  # (t >= theta) & (p >= theta) == min(p, t) >= theta
    first_out = np.zeros(p.shape, np.uint8)  # first k >= 1 with the pixel outside C_k; 0: none yet
    for k in range(1, 11):
        inside = _largest_component(both >= k / 10)
        first_out[(first_out == 0) & ~inside] = k
    level = np.where(first_out > 0, (first_out.astype(np.float64) - 1) / 10, 1.0)
    # (k - 1) / 10 from the uint8 must equal theta_{k-1} = (k-1)/10 exactly, as computed above.
    dp, dt = p - level, t - level
    phi_p = 1 - dp * (dp >= 0.15)
    phi_t = 1 - dt * (dt >= 0.15)
    return float(np.abs(phi_p - phi_t).sum() / 1e3)


def dtssd(pred_t: np.ndarray, pred_prev: np.ndarray, true_t: np.ndarray, true_prev: np.ndarray) -> float:
    """1e2 * sqrt(mean(((p_t - p_prev) - (t_t - t_prev))^2)) of alpha `[H,W]`."""
    _check_same_shape(pred_t, pred_prev, true_t, true_prev)
    diff = (_f64(pred_t) - _f64(pred_prev)) - (_f64(true_t) - _f64(true_prev))
    return float(math.sqrt(np.square(diff).mean()) * 1e2)


def _fgr_sums(pred_fgr: np.ndarray, true_fgr: np.ndarray, true_pha: np.ndarray) -> tuple[float, float, int]:
    """(sum |d|, sum d^2, number of values) of the colour difference d in [0,1] over pixels with true alpha > 0."""
    _check_same_shape(pred_fgr, true_fgr)
    if pred_fgr.shape[:2] != np.shape(true_pha):
        raise ValueError(f"foreground {pred_fgr.shape} and alpha {np.shape(true_pha)} differ in size")
    mask = np.asarray(true_pha) > 0
    count = int(np.count_nonzero(mask)) * pred_fgr.shape[2]
    if pred_fgr.dtype == np.uint8 and true_fgr.dtype == np.uint8:
        # Exact integer sums; no masked copies of 1080p RGB frames.
        d = cv2.absdiff(pred_fgr, true_fgr)
        m = mask.astype(np.uint8)[..., None]
        ad = float(np.sum(d * m, dtype=np.int64))
        d32 = d.astype(np.int32)
        sq = float(np.sum(d32 * d32 * m, dtype=np.int64))
        return ad / 255.0, sq / 255.0 ** 2, count
    d = _f64(pred_fgr[mask]) - _f64(true_fgr[mask])
    return float(np.abs(d).sum()), float(np.square(d).sum()), count


def fgr_mad(pred_fgr: np.ndarray, true_fgr: np.ndarray, true_pha: np.ndarray) -> float:
    """1e3 * mean |F_p - F_t| of RGB `[H,W,3]` (both uint8, or both in [0,1]) over pixels with true alpha > 0."""
    ad, _, n = _fgr_sums(pred_fgr, true_fgr, true_pha)
    return ad / n * 1e3 if n else 0.0


def fgr_mse(pred_fgr: np.ndarray, true_fgr: np.ndarray, true_pha: np.ndarray) -> float:
    """1e3 * mean (F_p - F_t)^2 of RGB `[H,W,3]` over pixels with true alpha > 0."""
    _, sq, n = _fgr_sums(pred_fgr, true_fgr, true_pha)
    return sq / n * 1e3 if n else 0.0


def warp_bilinear(image: np.ndarray, flow: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(image(x + flow(x)) bilinearly sampled in float64, bool mask of sources inside the frame).

    `image` `[H,W]` or `[H,W,C]`, `flow` `[H,W,2]` backward flow (DESIGN.md convention).
    """
    img = _f64(image)
    h, w = img.shape[:2]
    # Exact float64 weights: cv2.remap quantises bilinear weights to 1/32.
    sx = _f64(flow[..., 0]) + np.arange(w, dtype=np.float64)[None, :]
    sy = _f64(flow[..., 1]) + np.arange(h, dtype=np.float64)[:, None]
    inside = (sx >= 0) & (sx <= w - 1) & (sy >= 0) & (sy <= h - 1)
    np.clip(sx, 0, w - 1, out=sx)
    np.clip(sy, 0, h - 1, out=sy)
    x0 = np.minimum(sx.astype(np.int32), max(w - 2, 0))  # floor: sx >= 0 after clipping
    y0 = np.minimum(sy.astype(np.int32), max(h - 2, 0))
    fx, fy = sx - x0, sy - y0
    dx, dy = (1 if w > 1 else 0), (w if h > 1 else 0)
    flat = img.reshape(h * w, -1)
    i00 = (y0 * w + x0).ravel()
    v00, v01 = flat[i00], flat[i00 + dx]
    v10, v11 = flat[i00 + dy], flat[i00 + dy + dx]
    fx, fy = fx.reshape(-1, 1), fy.reshape(-1, 1)
    top = v00 + (v01 - v00) * fx
    bottom = v10 + (v11 - v10) * fx
    out = (top + (bottom - top) * fy).reshape(img.shape)
    return out, inside


def messddt(pred_t: np.ndarray, pred_prev: np.ndarray, true_t: np.ndarray, true_prev: np.ndarray,
            flow: np.ndarray) -> float:
    """1e3 * mean |E_t(x) - E_prev(x + flow(x))| over pixels whose source is inside the frame.

    E = (p - t)^2; `flow` is the backward flow `[H,W,2]` of frame t (DESIGN.md convention).
    """
    _check_same_shape(pred_t, pred_prev, true_t, true_prev)
    err_t = np.square(_f64(pred_t) - _f64(true_t))
    err_prev = np.square(_f64(pred_prev) - _f64(true_prev))
    warped, inside = warp_bilinear(err_prev, flow)
    if not inside.any():
        return 0.0
    return float(np.abs(err_t - warped)[inside].mean() * 1e3)


def _grey_u8(image: np.ndarray) -> np.ndarray:
    a = np.asarray(image)
    if a.ndim == 3:
        a = cv2.cvtColor(np.ascontiguousarray(a), cv2.COLOR_RGB2GRAY)
    elif a.dtype != np.uint8:
        a = np.clip(np.rint(_f64(a) * 255.0), 0, 255).astype(np.uint8)
    return np.ascontiguousarray(a)


def alpha_flow(image_t: np.ndarray, image_prev: np.ndarray, preset: str = "fast") -> np.ndarray:
    """Backward DIS flow `[H,W,2]` of frame t (image_prev(x + f(x)) ~ image_t(x)).

    Inputs are RGB uint8 `[H,W,3]`, grey uint8 `[H,W]` or alpha float `[H,W]` in [0,1].
    """
    return dis_flow(_grey_u8(image_t), _grey_u8(image_prev), preset=preset)


def flow_warp_error(pha_t: np.ndarray, pha_prev: np.ndarray, src_t: np.ndarray, src_prev: np.ndarray,
                    consistency: float = 0.01, slack: float = 0.5) -> float:
    """No-reference temporal error: 1e3 * mean |alpha_t - warp(alpha_prev)| where the input flow is reliable.

    The flow is DIS on the input frames `src` (RGB uint8 `[H,W,3]`); a pixel is reliable when its
    source lies inside frame t-1 and forward and backward flow agree (Sundaram et al. 2010:
    |f_b + f_f(x + f_b)|^2 < consistency * (|f_b|^2 + |f_f(x + f_b)|^2) + slack).
    Returns NaN when no pixel is reliable.
    """
    _check_same_shape(pha_t, pha_prev)
    bwd = alpha_flow(src_t, src_prev)
    fwd = alpha_flow(src_prev, src_t)
    fwd_at_src, inside = warp_bilinear(fwd, bwd)
    round_trip = np.square(bwd + fwd_at_src).sum(-1)
    bound = consistency * (np.square(bwd).sum(-1) + np.square(fwd_at_src).sum(-1)) + slack
    reliable = inside & (round_trip < bound)
    if not reliable.any():
        return float("nan")
    warped, _ = warp_bilinear(_f64(pha_prev), bwd)
    return float(np.abs(_f64(pha_t) - warped)[reliable].mean() * 1e3)


@dataclass
class SequenceMetrics:
    """Streams one clip frame by frame; `update` returns that frame's metrics, `summary` the clip's.

    Frames are alpha `[H,W]` in [0,1], foregrounds RGB `[H,W,3]` (uint8 or [0,1]). A frame given
    with `continues=False` starts a new temporal chain (e.g. after a missing frame): its dtssd
    counts 0 and it has no messddt, as frame 0 does.
    """

    metrics: tuple[str, ...] = ALL_METRICS
    frames: list[dict[str, float]] = field(default_factory=list)
    _prev: tuple | None = None

    def __post_init__(self) -> None:
        unknown = set(self.metrics) - set(ALL_METRICS)
        if unknown:
            raise ValueError(f"unknown metrics {sorted(unknown)}; known: {', '.join(ALL_METRICS)}")

    def reset(self) -> None:
        """Forget the previous frame and all recorded values."""
        self.frames, self._prev = [], None

    def update(self, pred_pha: np.ndarray, true_pha: np.ndarray, pred_fgr: np.ndarray | None = None,
               true_fgr: np.ndarray | None = None, flow: np.ndarray | None = None,
               continues: bool = True) -> dict[str, float]:
        """Metrics of one frame; `flow` is the true backward flow `[H,W,2]` (DIS on true alphas when None)."""
        _check_same_shape(pred_pha, true_pha)
        p, t = _f64(pred_pha), _f64(true_pha)
        out: dict[str, float] = {}
        for name in ALPHA_METRICS:
            if name in self.metrics:
                out[name] = _ALPHA_FUNCS[name](p, t)
        prev = self._prev if continues else None
        if prev is not None and prev[0].shape != p.shape:
            prev = None
        if "dtssd" in self.metrics:
            out["dtssd"] = dtssd(p, prev[0], t, prev[1]) if prev is not None else 0.0
        if "messddt" in self.metrics and prev is not None:
            f = flow if flow is not None else alpha_flow(t, prev[1])
            out["messddt"] = messddt(p, prev[0], t, prev[1], f)
        if pred_fgr is not None and true_fgr is not None:
            if "fgr_mad" in self.metrics:
                out["fgr_mad"] = fgr_mad(pred_fgr, true_fgr, t)
            if "fgr_mse" in self.metrics:
                out["fgr_mse"] = fgr_mse(pred_fgr, true_fgr, t)
        self._prev = (p, t)
        self.frames.append(out)
        return out

    def summary(self) -> dict[str, float]:
        """Per-clip means: each metric over the frames that have it (dtssd over all frames)."""
        out: dict[str, float] = {}
        for name in self.metrics:
            values = [f[name] for f in self.frames if name in f]
            if values:
                out[name] = float(np.mean(values))
        return out


_ALPHA_FUNCS = {"mad": mad, "mad_edge": mad_edge, "sad": sad, "mse": mse, "grad": grad, "conn": conn}
