"""The video reader: real files, frame folders, truncation and corrupt frames."""
from __future__ import annotations

import av
import cv2
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


def write_size_change_video(path, first=(64, 48, 5), second=(80, 60, 4)):
    """An MPEG-4 MKV whose frame size changes mid-stream: `first` then `second` (w, h, frames).

    Two encodes are joined as MPEG-TS (which carries each part's headers in-band) and remuxed
    into one MKV stream, as a recording that was spliced without re-encoding would be.
    """
    import io

    parts = []
    start = 0
    for w, h, n in (first, second):
        buf = io.BytesIO()
        with av.open(buf, "w", format="mpegts") as c:
            s = c.add_stream("mpeg4", rate=25)
            s.width, s.height, s.pix_fmt = w, h, "yuv420p"
            for i in range(start, start + n):
                f = av.VideoFrame.from_ndarray(np.full((h, w, 3), 20 + 20 * i, np.uint8), format="rgb24")
                f.pts = i
                for p in s.encode(f):
                    c.mux(p)
            for p in s.encode():
                c.mux(p)
        parts.append(buf.getvalue())
        start += n
    with av.open(io.BytesIO(b"".join(parts)), "r", format="mpegts") as src, av.open(str(path), "w") as dst:
        ins = src.streams.video[0]
        out = dst.add_stream_from_template(ins)
        for p in src.demux(ins):
            if p.dts is not None:
                p.stream = out
                dst.mux(p)
    with av.open(str(path)) as c:
        sizes = [(f.width, f.height) for f in c.decode(video=0)]
    assert sizes == [first[:2]] * first[2] + [second[:2]] * second[2], sizes
    return path


def test_stream_size_is_the_first_decoded_frames(tmp_path):
    path = write_size_change_video(tmp_path / "spliced.mkv")
    info = probe(str(path), strict=False)
    assert (info.width, info.height, info.frames) == (64, 48, 9)
    assert info.numbers == tuple(range(9))


def _write_frames(folder, numbers, size=(32, 24), name="{:04d}.png"):
    folder.mkdir(parents=True, exist_ok=True)
    for n in numbers:
        w, h = size(n) if callable(size) else size
        cv2.imwrite(str(folder / name.format(n)), np.full((h, w, 3), 10 * n, np.uint8))
    return folder


def test_frame_folder_keeps_its_source_numbers(tmp_path):
    from matting_core.video import prefetch

    folder = _write_frames(tmp_path / "clip", [0, 1, 2, 4, 5])
    info = probe(str(folder))
    assert info.frames == 5 and info.numbers == (0, 1, 2, 4, 5)
    assert info.gaps == ((3, 3),)
    got = list(iter_frames(str(folder), numbered=True))
    assert [n for n, _ in got] == [0, 1, 2, 4, 5]
    assert [int(f[0, 0, 0]) for _, f in got] == [0, 10, 20, 40, 50]
    assert [n for n, _ in prefetch(iter_frames(str(folder), numbered=True))] == [0, 1, 2, 4, 5]
    # A corrupt frame is reported by its source number too.
    (folder / "0004.png").write_bytes(b"not a png")
    errors = []
    got = list(iter_frames(str(folder), numbered=True, on_error=lambda i, m: errors.append(i)))
    assert [n for n, _ in got] == [0, 1, 2, 5] and errors == [4]
    # Numbers starting past 0, in names with a prefix, are kept as they are (no gap before them).
    other = _write_frames(tmp_path / "shot", [7, 8, 10], name="frame_{:03d}.jpg")
    assert probe(str(other)).numbers == (7, 8, 10) and probe(str(other)).gaps == ((9, 9),)


def test_frame_folder_with_two_files_of_one_number_is_rejected(tmp_path):
    folder = _write_frames(tmp_path / "clip", [0, 1, 2])
    _write_frames(folder, [1], name="{:06d}.jpg")
    with pytest.raises(VideoError, match="number 1"):
        probe(str(folder))


def test_video_stem_of_relative_local_folders(tmp_path, monkeypatch):
    clip = tmp_path / "clip1"
    (clip / "inner").mkdir(parents=True)
    monkeypatch.chdir(clip)
    assert video_stem(".") == "clip1"
    assert video_stem("./") == "clip1"
    assert video_stem("inner/..") == "clip1"
    monkeypatch.chdir(clip / "inner")
    assert video_stem("..") == "clip1"
    assert video_stem("../inner/") == "inner"
    assert video_stem(f"file://{clip}/") == "clip1"
