"""Procedural sample sources, so the demo and tests run on a fresh machine with no data.

`person_photo` draws a person-like figure (head, hair with soft strand-like edges, neck, torso,
arms) with an exact alpha; `background_video` draws a textured scene that pans and has moving
objects. `write_sources` puts both on disk in the layouts `matting generate` reads.
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import av
import cv2
import numpy as np

from matting_core.runtime import available_cpus

__all__ = ["person_photo", "background_video", "write_sources"]

_SKIN = np.array([[224, 172, 140], [198, 134, 96], [141, 85, 56], [255, 205, 170]], np.float32)
_HAIR = np.array([[40, 28, 20], [90, 60, 30], [200, 160, 90], [20, 20, 20], [120, 50, 20]], np.float32)


def _texture(rng: np.random.Generator, h: int, w: int, base: np.ndarray, strength: float) -> np.ndarray:
    """Cloth-like texture: low-frequency shading plus stripes, float32 [h,w,3] in 0-255."""
    low = cv2.resize(rng.normal(0, 1, (4, 4)).astype(np.float32), (w, h), interpolation=cv2.INTER_CUBIC)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    angle, period = rng.uniform(0, np.pi), rng.uniform(6, 30)
    stripes = np.sin((xx * np.cos(angle) + yy * np.sin(angle)) * 2 * np.pi / period)
    shade = 1 + strength * (0.25 * low + 0.15 * stripes * (rng.random() < 0.5))
    return np.clip(base[None, None, :] * shade[..., None], 0, 255)


def person_photo(rng: np.random.Generator, size: tuple[int, int] = (360, 480)) -> tuple[np.ndarray, np.ndarray]:
    """A person-like subject cut at chest height. Returns (image uint8 [H,W,3] RGB, alpha float32 [H,W]).

    The figure is drawn at 4x and downsampled, so edges are anti-aliased; hair strands are thin
    lines, which after downsampling give the fractional, hair-like alpha that matting is about.
    """
    w, h = size
    S = 4
    W, H = w * S, h * S
    mask = np.zeros((H, W), np.uint8)
    cx = W * rng.uniform(0.42, 0.58)
    head_r = H * rng.uniform(0.11, 0.15)
    head_c = (cx, H * rng.uniform(0.24, 0.30))
    shoulder_y = head_c[1] + head_r * rng.uniform(1.7, 2.0)
    torso_w = head_r * rng.uniform(2.6, 3.4)
    # torso: a rounded trapezoid down to the bottom edge
    torso = np.array([[cx - torso_w * 0.75, shoulder_y], [cx + torso_w * 0.75, shoulder_y],
                      [cx + torso_w * 1.05, H + 10], [cx - torso_w * 1.05, H + 10]], np.int32)
    cloth = np.zeros_like(mask)
    cv2.fillPoly(cloth, [torso], 255)
    for side in (-1, 1):  # shoulders and arms
        sx = cx + side * torso_w * 0.75
        cv2.circle(cloth, (int(sx), int(shoulder_y + head_r * 0.35)), int(head_r * 0.55), 255, -1)
        ex = sx + side * head_r * rng.uniform(0.2, 1.2)
        cv2.line(cloth, (int(sx), int(shoulder_y + head_r * 0.4)), (int(ex), H), 255, int(head_r * 0.75))
    skin = np.zeros_like(mask)
    cv2.rectangle(skin, (int(cx - head_r * 0.4), int(head_c[1])), (int(cx + head_r * 0.4), int(shoulder_y + 5)), 255, -1)
    cv2.ellipse(skin, (int(head_c[0]), int(head_c[1])), (int(head_r * 0.85), int(head_r)), 0, 0, 360, 255, -1)
    hair = np.zeros_like(mask)
    cv2.ellipse(hair, (int(head_c[0]), int(head_c[1] - head_r * 0.2)), (int(head_r * 0.95), int(head_r * 0.9)),
                0, 180, 360, 255, -1)
    long_hair = rng.random() < 0.5
    for _ in range(int(rng.integers(150, 300))):  # strands leaving the head outline
        a = rng.uniform(np.pi * 0.9, np.pi * 2.1)
        r0 = head_r * rng.uniform(0.7, 0.95)
        p0 = (head_c[0] + r0 * np.cos(a), head_c[1] - head_r * 0.2 + r0 * np.sin(a))
        length = head_r * (rng.uniform(0.2, 0.5) + (rng.uniform(0.5, 2.0) if long_hair and np.sin(a) > -0.3 else 0))
        bend = rng.normal(0, 0.3)
        pts = [(p0[0] + length * t * np.cos(a + bend * t), p0[1] + length * t * (np.sin(a + bend * t) + (1.2 * t if long_hair else 0)))
               for t in np.linspace(0, 1, 6)]
        cv2.polylines(hair, [np.array(pts, np.int32)], False, 255, int(rng.integers(1, 4)))
    mask = np.maximum.reduce([cloth, skin, hair])

    img = _texture(rng, H, W, rng.uniform(30, 230, 3).astype(np.float32), 1.0)
    skin_rgb = _SKIN[rng.integers(len(_SKIN))]
    hair_rgb = _HAIR[rng.integers(len(_HAIR))]
    img[skin > 0] = skin_rgb
    img[hair > 0] = hair_rgb
    for side in (-1, 1):  # eyes, so the face is a face
        cv2.circle(img, (int(head_c[0] + side * head_r * 0.35), int(head_c[1])), int(head_r * 0.08), (30, 30, 30), -1)
    cv2.ellipse(img, (int(head_c[0]), int(head_c[1] + head_r * 0.45)), (int(head_r * 0.3), int(head_r * 0.1)),
                0, 0, 180, (150, 60, 60), -1)
    img = cv2.resize(img, (w, h), interpolation=cv2.INTER_AREA)
    alpha = cv2.resize(mask.astype(np.float32) / 255.0, (w, h), interpolation=cv2.INTER_AREA)
    # The photo's own background bleeds into soft edges, as in real photos (so foreground
    # estimation has something to undo).
    bg = _texture(rng, h, w, rng.uniform(40, 220, 3).astype(np.float32), 0.5)
    comp = alpha[..., None] * img + (1 - alpha[..., None]) * bg
    return np.clip(comp + 0.5, 0, 255).astype(np.uint8), np.clip(alpha, 0, 1).astype(np.float32)


def background_video(rng: np.random.Generator, frames: int = 60, size: tuple[int, int] = (640, 360)) -> np.ndarray:
    """A textured scene panning slowly, with a few objects crossing it. uint8 [T,H,W,3] RGB."""
    w, h = size
    pad = 80
    big = _texture(rng, h + 2 * pad, w + 2 * pad, rng.uniform(60, 200, 3).astype(np.float32), 1.5)
    for _ in range(int(rng.integers(8, 20))):  # static scenery: boxes and discs
        colour = rng.uniform(0, 255, 3).tolist()
        x, y = int(rng.integers(0, w + 2 * pad)), int(rng.integers(0, h + 2 * pad))
        if rng.random() < 0.5:
            cv2.rectangle(big, (x, y), (x + int(rng.integers(20, 160)), y + int(rng.integers(20, 160))), colour, -1)
        else:
            cv2.circle(big, (x, y), int(rng.integers(10, 60)), colour, -1)
    big = cv2.GaussianBlur(big, (0, 0), 1.0)
    vx, vy = rng.uniform(-1.0, 1.0, 2)
    movers = [(rng.uniform(0, w), rng.uniform(0, h), rng.uniform(-4, 4), rng.uniform(-2, 2),
               int(rng.integers(8, 30)), rng.uniform(0, 255, 3).tolist()) for _ in range(int(rng.integers(2, 5)))]
    out = np.empty((frames, h, w, 3), np.uint8)
    for t in range(frames):
        ox = int(np.clip(pad + vx * t, 0, 2 * pad))
        oy = int(np.clip(pad + vy * t, 0, 2 * pad))
        frame = big[oy:oy + h, ox:ox + w].copy()
        for x, y, dx, dy, r, colour in movers:
            cv2.circle(frame, (int(x + dx * t) % w, int(y + dy * t) % h), r, colour, -1)
        out[t] = np.clip(frame + rng.normal(0, 2, frame.shape) + 0.5, 0, 255)
    return out


def write_video(path: str, frames: np.ndarray, fps: int = 25) -> None:
    """Write uint8 [T,H,W,3] RGB frames as an H.264 MP4 with PyAV."""
    with av.open(path, "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": "18", "preset": "veryfast"}
        for f in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def write_sources(out_dir: str, photos: int = 12, videos: int = 3, frames: int = 60, seed: int = 0) -> dict[str, str]:
    """Write synthetic photos (`photos/image`, `photos/alpha`) and background videos under `out_dir`.

    Returns {"photos": dir, "backgrounds": dir}. Existing files are reused (same seed, same content).
    """
    photo_dir, bg_dir = os.path.join(out_dir, "photos"), os.path.join(out_dir, "backgrounds")
    os.makedirs(os.path.join(photo_dir, "image"), exist_ok=True)
    os.makedirs(os.path.join(photo_dir, "alpha"), exist_ok=True)
    os.makedirs(bg_dir, exist_ok=True)

    def photo(i: int) -> None:
        img_path = os.path.join(photo_dir, "image", f"person{i:03d}.png")
        pha_path = os.path.join(photo_dir, "alpha", f"person{i:03d}.png")
        if os.path.exists(img_path) and os.path.exists(pha_path):
            return
        image, alpha = person_photo(np.random.default_rng([seed, 1, i]))
        cv2.imwrite(pha_path, np.clip(alpha * 255 + 0.5, 0, 255).astype(np.uint8))
        cv2.imwrite(img_path, cv2.cvtColor(image, cv2.COLOR_RGB2BGR))

    def video(i: int) -> None:
        path = os.path.join(bg_dir, f"scene{i:03d}.mp4")
        if not os.path.exists(path):
            tmp = path + ".tmp.mp4"
            write_video(tmp, background_video(np.random.default_rng([seed, 2, i]), frames))
            os.replace(tmp, path)

    # Each source has its own generator, so the order they are drawn in changes nothing; numpy's
    # and OpenCV's array work releases the GIL, so threads share the cores.
    with ThreadPoolExecutor(max_workers=available_cpus()) as pool:
        for done in [pool.submit(video, i) for i in range(videos)] + [pool.submit(photo, i) for i in range(photos)]:
            done.result()
    return {"photos": photo_dir, "backgrounds": bg_dir}
