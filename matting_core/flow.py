"""Optical flow (OpenCV DIS), backward warping, flow confidence and motion-compensated smoothing.

Flow convention (DESIGN.md): backward flow of frame t, `flow_t[y,x] = (dx,dy)`, says that the point
at (x,y) in frame t was at (x+dx, y+dy) in frame t-1, so `warp(prev, flow_t)` reconstructs frame t
from frame t-1. OpenCV's `DISOpticalFlow.calc(I0, I1)` gives f with I1(x+f(x)) ~ I0(x), hence the
backward flow of frame t is `calc(grey_t, grey_prev)`.
"""
from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

__all__ = ["PRESETS", "to_grey", "dis_flow", "resize_flow", "warp", "source_inside",
           "flow_confidence", "Track", "SMOOTHER_PRESETS", "TemporalSmoother"]

PRESETS = {
    "ultrafast": cv2.DISOPTICAL_FLOW_PRESET_ULTRAFAST,
    "fine": cv2.DISOPTICAL_FLOW_PRESET_ULTRAFAST,
    "fast": cv2.DISOPTICAL_FLOW_PRESET_FAST,
    "medium": cv2.DISOPTICAL_FLOW_PRESET_MEDIUM,
}
# "fine" is ULTRAFAST's patches and iterations carried down to the half-resolution scale (ULTRAFAST
# stops at quarter resolution): at 320x180 about 1.2 ms instead of 0.5, and half the end-point error
# on the benchmark's moving subjects (0.28 vs 0.59 px), which is what keeps a long history sharp.
_FINEST_SCALE = {"fine": 1}
_BORDERS = {"replicate": cv2.BORDER_REPLICATE, "constant": cv2.BORDER_CONSTANT,
            "reflect": cv2.BORDER_REFLECT101}
_INTERP = {"linear": cv2.INTER_LINEAR, "nearest": cv2.INTER_NEAREST, "cubic": cv2.INTER_CUBIC}


def _dis(preset: str) -> cv2.DISOpticalFlow:
    if preset not in PRESETS:
        raise ValueError(f"unknown DIS preset {preset!r}; choose one of {', '.join(PRESETS)}")
    # Creating one costs ~30 us; a fresh instance per call keeps this thread-safe and stateless.
    dis = cv2.DISOpticalFlow_create(PRESETS[preset])
    if preset in _FINEST_SCALE:
        dis.setFinestScale(_FINEST_SCALE[preset])
    return dis


def to_grey(frame: np.ndarray) -> np.ndarray:
    """uint8 [H,W,3] RGB (or [H,W] grey) -> contiguous uint8 [H,W] grey, as DIS requires."""
    if frame.ndim == 3:
        frame = cv2.cvtColor(np.ascontiguousarray(frame), cv2.COLOR_RGB2GRAY)
    if frame.dtype != np.uint8:
        raise TypeError(f"expected uint8 frames, got {frame.dtype}")
    return np.ascontiguousarray(frame)


def _scaled_size(height: int, width: int, max_side: int | None) -> tuple[int, int]:
    if not max_side or max(height, width) <= max_side:
        return height, width
    s = max_side / max(height, width)
    return max(8, round(height * s)), max(8, round(width * s))


def resize_flow(flow: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize flow float32 [h,w,2] to size (H, W), scaling the vectors with the grid."""
    h, w = flow.shape[:2]
    height, width = size
    if (h, w) == (height, width):
        return flow
    out = cv2.resize(flow, (width, height), interpolation=cv2.INTER_LINEAR)
    out[..., 0] *= width / w
    out[..., 1] *= height / h
    return out


def dis_flow(frame_t: np.ndarray, frame_prev: np.ndarray, preset: str = "fast",
             max_side: int | None = None) -> np.ndarray:
    """Backward DIS flow of frame t -> float32 [H,W,2]; frames uint8 [H,W,3] RGB or [H,W] grey.

    With `max_side`, flow is computed on frames downscaled so their longer side is at most
    `max_side` pixels, then upscaled with its vectors scaled (much faster on large frames).
    """
    grey_t, grey_prev = to_grey(frame_t), to_grey(frame_prev)
    if grey_t.shape != grey_prev.shape:
        raise ValueError(f"frame sizes differ: {grey_t.shape} vs {grey_prev.shape}")
    height, width = grey_t.shape
    h, w = _scaled_size(height, width, max_side)
    if (h, w) != (height, width):
        grey_t = cv2.resize(grey_t, (w, h), interpolation=cv2.INTER_AREA)
        grey_prev = cv2.resize(grey_prev, (w, h), interpolation=cv2.INTER_AREA)
    flow = _dis(preset).calc(grey_t, grey_prev, None)
    return resize_flow(flow, (height, width))


def _maps(flow: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    h, w = flow.shape[:2]
    map_x = flow[..., 0] + np.arange(w, dtype=np.float32)[None, :]
    map_y = flow[..., 1] + np.arange(h, dtype=np.float32)[:, None]
    return map_x, map_y


def warp(image: np.ndarray, flow: np.ndarray, border: str = "replicate",
         interpolation: str = "linear") -> np.ndarray:
    """Backward warp: out(x) = image(x + flow(x)); image [H,W] or [H,W,C], flow float32 [H,W,2]."""
    if image.shape[:2] != flow.shape[:2]:
        raise ValueError(f"image {image.shape[:2]} and flow {flow.shape[:2]} sizes differ")
    map_x, map_y = _maps(flow)
    return cv2.remap(image, map_x, map_y, _INTERP[interpolation], borderMode=_BORDERS[border])


def source_inside(flow: np.ndarray) -> np.ndarray:
    """bool [H,W]: whether x + flow(x) lies inside the previous frame (False: content entered)."""
    return _inside(_maps(flow))


def _mismatch(flow_bwd: np.ndarray, flow_fwd: np.ndarray, maps, rel_tol: float, abs_tol: float):
    """Normalised squared forward-backward mismatch float32 [H,W] (1 at the hard threshold)."""
    fwd_at_src = cv2.remap(flow_fwd, maps[0], maps[1], cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    bx, by = cv2.split(flow_bwd)
    fx, fy = cv2.split(fwd_at_src)
    dx, dy = bx + fx, by + fy
    tol = rel_tol * (bx * bx + by * by + fx * fx + fy * fy) + abs_tol
    return (dx * dx + dy * dy) / tol


def _inside(maps) -> np.ndarray:
    map_x, map_y = maps
    h, w = map_x.shape
    return (map_x >= 0) & (map_x <= w - 1) & (map_y >= 0) & (map_y <= h - 1)


def flow_confidence(flow_bwd: np.ndarray, flow_fwd: np.ndarray, rel_tol: float = 0.01,
                    abs_tol: float = 0.5) -> np.ndarray:
    """Forward-backward consistency of backward flow of t and forward flow of t-1 -> float32 [H,W] in [0,1].

    A point x of frame t maps to y = x + b(x) in t-1, and a consistent forward flow brings it back:
    f(y) ~ -b(x). The squared mismatch is compared with `rel_tol * (|b|^2 + |f(y)|^2) + abs_tol`
    (Sundaram et al.'s occlusion test, made soft): 1 = consistent, ~0.37 at the hard threshold,
    0 where the source falls outside frame t-1.
    """
    maps = _maps(flow_bwd)
    conf = np.exp(-_mismatch(flow_bwd, flow_fwd, maps, rel_tol, abs_tol))
    conf[~_inside(maps)] = 0.0
    return conf.astype(np.float32, copy=False)


@dataclass
class Track:
    """Motion from the previous frame to the current one, at frame resolution.

    `flow` float32 [H,W,2] and `confidence` float32 [H,W] are None when there is no usable history
    (first frame, size change or scene cut); `coarse` holds (flow [h,w,2], confidence [h,w],
    inside [h,w]: 1 where the source lies inside the previous frame) at the resolution the flow
    was computed at, which the person-layer averaging works on (None: not computed);
    `cut` says whether a scene cut was detected;
    `error` is the mean absolute photometric residual after warping (grey, in [0,1]);
    `hist_distance` the Bhattacharyya distance between the two frames' grey histograms.
    """
    flow: np.ndarray | None
    confidence: np.ndarray | None
    cut: bool = False
    error: float = 0.0
    hist_distance: float = 0.0
    coarse: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None


def _layer_motion(flow: np.ndarray, confidence: np.ndarray, weights: np.ndarray, radius: int,
                  power: int) -> list[np.ndarray]:
    """[flow x, flow y, confidence] of the person layer: box averages weighted by `weights ** power`."""
    wgt = np.clip(weights, 0.0, 1.0)
    base = wgt.copy()
    for _ in range(power - 1):  # repeated products: np.power with a float exponent is 10x slower
        wgt *= base
    size = (2 * radius + 1, 2 * radius + 1)
    box = lambda a: cv2.boxFilter(a, -1, size)
    # Far from any person there is no mass to average: flow and confidence fade to 0 there (the map
    # is flat, so its motion does not matter, and it is averaged flow-free with the fallback weight).
    inv = 1.0 / np.maximum(box(wgt), _LAYER_MASS)
    fx, fy = (box(flow[..., i] * wgt) * inv for i in (0, 1))
    # box sums are running sums: clip their rounding so the confidence stays in [0,1]
    return [fx, fy, np.clip(box(confidence * wgt) * inv, 0.0, 1.0)]


def _edge_trust(history: np.ndarray, flow: np.ndarray, tolerance: float) -> np.ndarray:
    """float32 [H,W] in (0,1]: how far a warped map survives flow error, 1 / (1 + (|grad| (1 + |flow|) / tol)^2)."""
    gx = cv2.Sobel(history, cv2.CV_32F, 1, 0, ksize=3, scale=0.125)
    gy = cv2.Sobel(history, cv2.CV_32F, 0, 1, ksize=3, scale=0.125)
    # flow error grows with the motion itself: ~0.15 px + 15% of it with DIS on the benchmark's subjects
    motion = 1.0 + cv2.magnitude(flow[..., 0], flow[..., 1])
    risk = (gx * gx + gy * gy) * (motion * motion) * (1.0 / (tolerance * tolerance))
    return 1.0 / (1.0 + risk)


_LAYER_MASS = 1e-3  # mean weight in a box below which the box holds no person

SMOOTHER_PRESETS: dict[str, dict] = {
    # Tuned on still-part make-benchmark clips (bench/bench_prior_flow.py; figures in the README):
    # person-layer motion, edge- and motion-aware trust, flow-free fallback, no forward flow.
    "default": {"new_weight": 0.1, "change_tolerance": 4.0, "photo_tolerance": 0.1, "preset": "fine",
                "flow_max_side": 320, "cut_error": 0.08, "cut_hist": 0.2, "consistency_check": False,
                "layer_radius": 0.05, "layer_power": 4, "edge_tolerance": 0.33, "fallback_weight": 0.5},
    # The first smoother (per-pixel flow, forward-backward check, value gate), chosen on carphone.mp4:
    # these settings reproduce it exactly.
    "legacy": {"new_weight": 0.3, "change_tolerance": 0.8, "photo_tolerance": 0.07, "preset": "ultrafast",
               "flow_max_side": 320, "cut_error": 0.08, "cut_hist": 0.2, "consistency_check": True,
               "layer_radius": 0.0, "layer_power": 4, "edge_tolerance": 0.0, "fallback_weight": 1.0},
}


class TemporalSmoother:
    """Motion-compensated temporal smoothing of per-frame maps (person probability or alpha).

    Each new map p_t is blended with the previous smoothed map warped by the backward flow, h_t:
    `s_t = p_t + k * (h_t - p_t)` with `k = g * (c * (1 - new_weight) + (1 - c) * (1 - fallback_weight))`
    where the source lies inside frame t-1, and k = 0 where it left it (new content). Here:
    - c in [0,1] is the trust in the warped history: photometric agreement of the warp (times
      forward-backward consistency with `consistency_check`), divided by
      `1 + (|grad h_t| * (1 + |flow|) / edge_tolerance)^2`: a flat map survives any flow error,
      an edge only a small one, and flow errors grow with the motion. Where the subject pauses,
      flow is ~0 and the residual small, so history is trusted most (weight new_weight).
    - g = exp(-(|p_t - h_t| / change_tolerance)^2) lets a new value far from the history through.
    - Person layer (`layer_radius` > 0): the map's soft edge lies over background pixels, which
      move with the background, yet the edge moves with the person. So the flow and confidence
      that carry the map are those of the person around each pixel: their box averages over
      `layer_radius` x frame width, weighted by `map ** layer_power`. Far from any person they
      fade to 0, and the (flat) map is averaged flow-free with weight `fallback_weight`.
    A scene cut (large photometric residual after warping, or a large histogram change) resets
    the history. Flow is computed on grey frames downscaled to `flow_max_side`.
    The defaults (`SMOOTHER_PRESETS["default"]`) were tuned on a still-part make-benchmark of real
    portraits (bench/bench_prior_flow.py) and checked on a held-out one and on carphone.mp4;
    `SMOOTHER_PRESETS["legacy"]` is the first smoother. The cut thresholds sit between the largest
    consecutive-frame values seen on the shared sample videos (residual 0.015, histogram 0.027)
    and the smallest at bikes.mp4's cuts (0.146, 0.244).

    Args:
        new_weight: weight of a new observation where the history is trusted and values agree.
        change_tolerance: disagreement scale above which the new value dominates.
        photo_tolerance: grey residual scale (in [0,1]) above which a warped pixel is not trusted.
        preset: DIS preset (`ultrafast`, `fine`, `fast`, `medium`).
        flow_max_side: longer side of the frames the flow is computed on (0: full resolution).
        cut_error: mean photometric residual (in [0,1]) above which a scene cut is declared.
        cut_hist: grey-histogram Bhattacharyya distance above which a scene cut is declared.
        consistency_check: also compute the forward flow and distrust inconsistent pixels.
        layer_radius: person-layer box radius / frame width (0: each pixel's own flow and confidence).
        layer_power: integer exponent of the map in the person-layer weights (favours the person's core).
        edge_tolerance: map gradient (per pixel) x (1 + motion in pixels) at which the trust halves (0: off).
        fallback_weight: weight of a new observation where the history is not trusted (1: take it as is).
    """

    def __init__(self, new_weight: float = 0.1, change_tolerance: float = 4.0,
                 photo_tolerance: float = 0.1, preset: str = "fine", flow_max_side: int = 320,
                 cut_error: float = 0.08, cut_hist: float = 0.2, consistency_check: bool = False,
                 layer_radius: float = 0.05, layer_power: int = 4, edge_tolerance: float = 0.33,
                 fallback_weight: float = 0.5):
        for name, weight in (("new_weight", new_weight), ("fallback_weight", fallback_weight)):
            if not 0.0 < weight <= 1.0:
                raise ValueError(f"{name} must be in (0, 1], got {weight}")
        if layer_radius < 0 or edge_tolerance < 0:
            raise ValueError("layer_radius and edge_tolerance must be >= 0 (0: off)")
        if int(layer_power) != layer_power or layer_power < 1:
            raise ValueError(f"layer_power must be a positive integer, got {layer_power}")
        _dis(preset)
        self.new_weight = float(new_weight)
        self.change_tolerance = float(change_tolerance)
        self.photo_tolerance = float(photo_tolerance)
        self.preset = preset
        self.flow_max_side = int(flow_max_side)
        self.cut_error = float(cut_error)
        self.cut_hist = float(cut_hist)
        self.consistency_check = bool(consistency_check)
        self.layer_radius = float(layer_radius)
        self.layer_power = int(layer_power)
        self.edge_tolerance = float(edge_tolerance)
        self.fallback_weight = float(fallback_weight)
        self.reset()

    @property
    def spec(self) -> dict:
        """JSON-safe settings; `TemporalSmoother(**spec)` rebuilds the smoother."""
        return {name: getattr(self, name) for name in SMOOTHER_PRESETS["default"]}

    def reset(self) -> None:
        """Forget the history (start of a new video)."""
        self._grey: np.ndarray | None = None    # previous frame, grey at flow resolution
        self._hist: np.ndarray | None = None
        self._size: tuple[int, int] | None = None
        self._state: np.ndarray | None = None   # previous smoothed map [H,W]
        self.last_track: Track | None = None

    def _grey_small(self, frame: np.ndarray) -> np.ndarray:
        grey = to_grey(frame)
        h, w = _scaled_size(*grey.shape, self.flow_max_side)
        if (h, w) != grey.shape:
            grey = cv2.resize(grey, (w, h), interpolation=cv2.INTER_AREA)
        return grey

    def track(self, frame: np.ndarray) -> Track:
        """Estimate motion from the previous frame to `frame` (uint8 [H,W,3]) and remember `frame`."""
        size = frame.shape[:2]
        grey = self._grey_small(frame)
        hist = cv2.calcHist([grey], [0], None, [32], [0, 256])
        hist /= max(float(hist.sum()), 1.0)
        prev, prev_hist = self._grey, self._hist
        same_size = self._size == size
        self._grey, self._hist, self._size = grey, hist, size
        if prev is None or not same_size:
            self._state = None
            track = Track(None, None)
        else:
            track = self._motion(grey, prev, hist, prev_hist, size)
            if track.cut:
                self._state = None
        self.last_track = track
        return track

    def _motion(self, grey, prev, hist, prev_hist, size) -> Track:
        bwd = _dis(self.preset).calc(grey, prev, None)
        maps = _maps(bwd)
        warped = cv2.remap(prev, maps[0], maps[1], cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
        residual = cv2.absdiff(grey, warped).astype(np.float32) * (1.0 / 255.0)
        error = float(residual.mean())
        hist_distance = float(cv2.compareHist(hist, prev_hist, cv2.HISTCMP_BHATTACHARYYA))
        if error > self.cut_error or hist_distance > self.cut_hist:
            return Track(None, None, cut=True, error=error, hist_distance=hist_distance)
        residual *= 1.0 / self.photo_tolerance
        mismatch = residual * residual
        if self.consistency_check:
            # one exp for both terms: forward-backward mismatch and photometric residual
            mismatch += _mismatch(bwd, _dis(self.preset).calc(prev, grey, None), maps, 0.01, 0.5)
        inside = _inside(maps)
        conf = np.exp(-mismatch)
        conf[~inside] = 0.0
        coarse = (bwd, conf, inside.astype(np.float32))
        height, width = size
        if conf.shape != (height, width):
            conf = cv2.resize(conf, (width, height), interpolation=cv2.INTER_LINEAR)
        return Track(resize_flow(bwd, size), conf, error=error, hist_distance=hist_distance, coarse=coarse)

    def _carrier(self, track: Track, weights: np.ndarray):
        """(flow, trust, inside or None) at frame resolution: what carries the map and how far to trust it."""
        if self.layer_radius <= 0:
            return track.flow, track.confidence, None
        flow, conf, inside = track.coarse or (track.flow, track.confidence,
                                              source_inside(track.flow).astype(np.float32))
        h, w = conf.shape
        if weights.shape != (h, w):
            weights = cv2.resize(weights, (w, h), interpolation=cv2.INTER_LINEAR)
        # averaged at the flow's resolution (2.5x fewer pixels at 512x288), then brought up once
        layer = cv2.merge(_layer_motion(flow, conf, weights, max(1, round(self.layer_radius * w)),
                                        self.layer_power) + [inside])
        height, width = track.flow.shape[:2]
        if (h, w) != (height, width):
            layer = cv2.resize(layer, (width, height), interpolation=cv2.INTER_LINEAR)
            layer[..., 0] *= width / w
            layer[..., 1] *= height / h
        return layer[..., :2], layer[..., 2], layer[..., 3]

    def _keep(self, value: np.ndarray, history: np.ndarray, flow: np.ndarray, trust: np.ndarray,
              inside: np.ndarray | None) -> np.ndarray:
        """Per-pixel weight of the history, k in [0,1)."""
        if self.edge_tolerance > 0:
            trust = trust * _edge_trust(history, flow, self.edge_tolerance)
        keep = (1.0 - self.new_weight) * trust
        if self.fallback_weight < 1.0:
            keep = keep + (1.0 - self.fallback_weight) * (1.0 - trust)
            # the fallback's (and the layer's) trust reaches pixels whose source left the frame: not theirs
            keep *= source_inside(flow) if inside is None else inside
        elif inside is not None:
            keep *= inside
        return keep * np.exp(-np.square((value - history) / self.change_tolerance))

    def update(self, track: Track, value: np.ndarray | None) -> np.ndarray:
        """Blend `value` (float32 [H,W], or None to carry the history by flow) into the history."""
        if value is not None:
            value = np.asarray(value, dtype=np.float32)
            if self._size is not None and value.shape != self._size:
                raise ValueError(f"map shape {value.shape} does not match frame size {self._size}")
        if self._state is None or track.flow is None:
            if value is None:
                raise ValueError("no history to carry (first frame or scene cut): a value is required")
            self._state = value.copy()
            return self._state.copy()
        flow, trust, inside = self._carrier(track, self._state if value is None else value)
        history = warp(self._state, flow)
        if value is None:
            self._state = history
            return history.copy()
        keep = self._keep(value, history, flow, trust, inside)
        self._state = (value + keep * (history - value)).astype(np.float32, copy=False)
        return self._state.copy()

    def needs_value(self, track: Track) -> bool:
        """Whether `update` needs a fresh value after `track` (no history to carry)."""
        return self._state is None or track.flow is None

    def __call__(self, frame: np.ndarray, value: np.ndarray) -> np.ndarray:
        """Smoothed map float32 [H,W] for `frame` uint8 [H,W,3] and its new map `value` [H,W]."""
        return self.update(self.track(frame), value)
