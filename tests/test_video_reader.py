"""The video reader: real files, frame folders, truncation and corrupt frames."""
from __future__ import annotations

import av
import numpy as np
import pytest

from matting_core.video import VideoError, iter_frames, probe, video_stem


def write_mjpeg_with_corrupt_frame(path, frames=10, bad=5):
    """An MJPEG AVI whose frame `bad` is replaced by random bytes (the container stays valid)."""
    with av.open(str(path), "w") as c:
        s = c.add_stream("mjpeg", rate=25)
        s.width, s.height, s.pix_fmt = 64, 48, "yuvj420p"
        for i in range(frames):
            f = np.full((48, 64, 3), i * 20, np.uint8)
            for p in s.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    data = bytearray(path.read_bytes())
    soi = [i for i in range(len(data) - 1) if data[i] == 0xFF and data[i + 1] == 0xD8]
    start, end = soi[bad], soi[bad + 1] - 8
    data[start:end] = np.random.default_rng(0).integers(0, 256, end - start, dtype=np.uint8).tobytes()
    path.write_bytes(bytes(data))


def test_probe_counts_decoded_frames_and_rejects_truncation(shared_data):
    info = probe(str(shared_data / "videos/backgrounds/bikes.mp4"))
    assert (info.width, info.height, info.frames, info.fps) == (640, 272, 250, 25.0)
    with pytest.raises(VideoError, match="declares 795 frames but only 194"):
        probe(str(shared_data / "broken/truncated-video.avi"))
    with pytest.raises(VideoError, match="cannot open"):
        probe(str(shared_data / "broken/not-a-video.mp4"))
    folder = probe(str(shared_data / "videos/people/street-two-people/frames"))
    assert folder.kind == "frames" and folder.frames == 72 and folder.width == 1920


def test_seeking_with_probe_info_gives_the_same_frames(shared_data):
    uri = str(shared_data / "videos/backgrounds/vtest.avi")
    info = probe(uri)
    ref = list(iter_frames(uri, stop=420))[400:405]
    got = list(iter_frames(uri, start=400, stop=405, info=info))
    assert len(got) == 5 and all(np.array_equal(a, b) for a, b in zip(ref, got))


def test_corrupt_frame_mid_video_is_reported_by_index(tmp_path):
    path = tmp_path / "bad.avi"
    write_mjpeg_with_corrupt_frame(path)
    with pytest.raises(VideoError, match="after frame 5"):
        probe(str(path))  # strict: not usable as a training source
    assert probe(str(path), strict=False).frames == 9
    errors = []
    frames = list(iter_frames(str(path), on_error=lambda i, m: errors.append((i, m))))
    assert len(frames) == 9 and [i for i, _ in errors] == [5] and "bad.avi" in errors[0][1]


def test_video_stem_rules():
    assert video_stem("/a/b/clip.mp4") == "clip"
    assert video_stem("s3://bucket/set/0003/com") == "0003"
    assert video_stem("/data/frames/") == "frames"


def test_prefetch_keeps_order_and_source_indices_past_corrupt_frames(tmp_path):
    from matting_core.video import prefetch

    path = tmp_path / "bad.avi"
    write_mjpeg_with_corrupt_frame(path, frames=10, bad=5)
    skipped = [0]

    def on_error(i, m):
        skipped[0] += 1

    plain = list(iter_frames(str(path), on_error=lambda i, m: None))
    got = list(prefetch(iter_frames(str(path), on_error=on_error), skipped))
    assert [i for i, _ in got] == [0, 1, 2, 3, 4, 6, 7, 8, 9]
    assert all(np.array_equal(a, b) for a, (_, b) in zip(plain, got))


def test_prefetch_reraises_decoder_errors_in_the_consumer(tmp_path):
    from matting_core.video import prefetch

    path = tmp_path / "bad.avi"
    write_mjpeg_with_corrupt_frame(path, frames=10, bad=5)
    with pytest.raises(VideoError, match="frame 5"):
        list(prefetch(iter_frames(str(path)), [0]))  # no on_error: the reader raises
