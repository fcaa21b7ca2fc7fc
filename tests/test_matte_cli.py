"""`matting matte` end to end: real videos and frame folders, a fresh checkpoint, the selfie prior."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import av
import cv2
import numpy as np
import pytest

from matting_core.model import matting_net, save_checkpoint
from matting_core.video.writers import read_alpha_video
from pipelines.cli import main

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
CARPHONE = SHARED / "data" / "videos" / "people" / "carphone.mp4"
STREET = SHARED / "data" / "videos" / "people" / "street-two-people" / "frames"
SELFIE = SHARED / "models" / "selfie_segmentation_landscape.tflite"
ALL_FORMATS = "pha,fgr,rgba.mov,rgba.webm,composite.mp4"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("model") / "model.pt"
    save_checkpoint(matting_net(backbone_weights="none"), str(path))
    return str(path)


@pytest.fixture(autouse=True)
def model_cache(tmp_path_factory, monkeypatch):
    """A model cache holding (a link to) the shared selfie model, as `matting fetch-models` would."""
    if not SELFIE.exists():
        pytest.skip(f"{SELFIE} absent")
    cache = tmp_path_factory.getbasetemp() / "model-cache"
    cache.mkdir(exist_ok=True)
    link = cache / SELFIE.name
    if not link.exists():
        link.symlink_to(SELFIE)
    monkeypatch.setenv("MATTING_MODEL_CACHE", str(cache))


def _png_stack(folder: Path) -> list[np.ndarray]:
    return [cv2.imread(str(p), cv2.IMREAD_UNCHANGED) for p in sorted(folder.glob("*.png"))]


def _check_outputs(out: Path, frames: int, width: int, height: int) -> dict:
    """Every format decodes back with `frames` frames of width x height; video alpha matches PNG alpha."""
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")], "temporary folders left behind"
    result = json.loads((out / "result.json").read_text())
    assert result["frames"] == frames and (result["width"], result["height"]) == (width, height)
    pha = _png_stack(out / "pha")
    fgr = _png_stack(out / "fgr")
    assert len(pha) == len(fgr) == frames
    assert all(a.shape == (height, width) and a.dtype == np.uint8 for a in pha)
    assert all(f.shape == (height, width, 3) for f in fgr)
    for name in ("rgba.mov", "rgba.webm"):
        alphas = list(read_alpha_video(str(out / name)))
        assert len(alphas) == frames, name
        assert alphas[0].shape == (height, width), name
        diffs = [np.abs(a.astype(float) - p).mean() for a, p in zip(alphas, pha)]
        assert max(diffs) <= 3.0, (name, max(diffs))
    with av.open(str(out / "composite.mp4")) as c:
        stream = c.streams.video[0]
        assert abs(float(stream.average_rate) - result["fps"]) < 0.01
        comp = [f for f in c.decode(stream)]
    assert len(comp) == frames and (comp[0].width, comp[0].height) == (width, height)
    return result


def test_matte_video_all_formats(tmp_path, checkpoint, capsys):
    if not CARPHONE.exists():
        pytest.skip(f"{CARPHONE} absent")
    rc = main(["matte", str(CARPHONE), "-o", str(tmp_path), "--formats", ALL_FORMATS, "--model", checkpoint])
    assert rc == 0, capsys.readouterr().err
    result = _check_outputs(tmp_path / "carphone", 120, 176, 144)
    assert result["status"] == "ok" and result["lost_frames"] == []
    assert abs(result["fps"] - 29.97) < 0.01
    assert result["model"] == checkpoint
    assert result["prior"]["prior"]["backend"] == "selfie"
    assert result["prior"]["smoother"] is not None
    for stage in ("prior", "smoothing", "net", "decode", "encode"):
        assert result["timings"]["ms_per_frame"][stage] > 0
    # Not a degenerate output: the composite is not just the background colour everywhere.
    pha = _png_stack(tmp_path / "carphone" / "pha")
    assert 0 < np.mean([p.mean() for p in pha]) < 255


def _copy_frames(dst: Path, count: int, size: tuple[int, int] | None = None) -> Path:
    dst.mkdir(parents=True)
    for src in sorted(STREET.glob("*.jpg"))[:count]:
        if size is None:
            shutil.copy(src, dst / src.name)
        else:
            img = cv2.resize(cv2.imread(str(src)), size, interpolation=cv2.INTER_AREA)
            cv2.imwrite(str(dst / src.name), img)
    return dst


def test_matte_frame_folder_1080p(tmp_path, checkpoint, capsys):
    if not STREET.exists():
        pytest.skip(f"{STREET} absent")
    folder = _copy_frames(tmp_path / "street8", 8)
    out = tmp_path / "out"
    rc = main(["matte", str(folder), "-o", str(out), "--formats", ALL_FORMATS, "--model", checkpoint,
               "--composite-bg", str(CARPHONE)])
    assert rc == 0, capsys.readouterr().err
    result = _check_outputs(out / "street8", 8, 1920, 1080)
    assert result["fps"] == 25.0
    # 1080p goes through the downsample path: the network's input's longer side is 512.
    assert result["matter"]["downsample_ratio"] == pytest.approx(512 / 1920)
    assert result["matter"]["prior_size"] == [512, 288]  # the prior stream runs at the network's size


@pytest.mark.slow
def test_matte_full_frame_folder(tmp_path, checkpoint, capsys):
    if not STREET.exists():
        pytest.skip(f"{STREET} absent")
    rc = main(["matte", str(STREET), "-o", str(tmp_path), "--formats", ALL_FORMATS, "--model", checkpoint])
    assert rc == 0, capsys.readouterr().err
    _check_outputs(tmp_path / "frames", 72, 1920, 1080)


def test_corrupt_frame_is_reported_and_the_rest_comes_out(tmp_path, checkpoint, capsys):
    if not STREET.exists():
        pytest.skip(f"{STREET} absent")
    folder = _copy_frames(tmp_path / "clip", 6, size=(320, 180))
    corrupt = sorted(folder.glob("*.jpg"))[3]
    corrupt.write_bytes(b"\xff\xd8 this is not a JPEG any more")
    out = tmp_path / "out"
    rc = main(["matte", str(folder), "-o", str(out), "--formats", "pha,rgba.webm", "--model", checkpoint,
               "--alpha-bits", "16"])
    err = capsys.readouterr().err
    assert rc == 3
    assert "frame 3" in err and corrupt.name in err
    result = json.loads((out / "clip" / "result.json").read_text())
    assert result["status"] == "partial" and result["lost_frames"] == [3]
    assert result["frames"] == 5 and corrupt.name in result["errors"][0]["message"]
    names = sorted(p.name for p in (out / "clip" / "pha").iterdir())
    assert names == ["000000.png", "000001.png", "000002.png", "000004.png", "000005.png"]
    assert cv2.imread(str(out / "clip" / "pha" / names[0]), cv2.IMREAD_UNCHANGED).dtype == np.uint16
    assert len(list(read_alpha_video(str(out / "clip" / "rgba.webm")))) == 5


def test_failures_publish_nothing(tmp_path, checkpoint, capsys):
    out = tmp_path / "out"
    assert main(["matte", str(tmp_path / "missing.mp4"), "-o", str(out), "--model", checkpoint]) == 1
    assert "missing.mp4" in capsys.readouterr().err
    assert not out.exists() or not any(out.iterdir())
    if CARPHONE.exists():
        rc = main(["matte", str(CARPHONE), "-o", str(out), "--model", str(tmp_path / "nope.pt")])
        assert rc == 1 and "nope.pt" in capsys.readouterr().err
        assert not out.exists() or not any(out.iterdir())
    assert main(["matte", str(CARPHONE), "-o", str(out), "--model", checkpoint, "--formats", "pha,gif"]) == 2
    assert "gif" in capsys.readouterr().err
    assert main(["matte", str(CARPHONE), "-o", str(out)]) == 2
    assert "--model" in capsys.readouterr().err


def test_config_file_and_flags(tmp_path, checkpoint, capsys):
    if not CARPHONE.exists():
        pytest.skip(f"{CARPHONE} absent")
    # Flags override the YAML file; the resolved config is recorded in result.json.
    cfg = tmp_path / "matte.yaml"
    cfg.write_text(f"model: {checkpoint}\nformats: [pha]\nprior: none\nsmooth_alpha: true\n"
                   f"downsample_ratio: 0.5\ndevice: cpu\n")
    clip = tmp_path / "clip"
    clip.mkdir()
    with av.open(str(CARPHONE)) as c:
        for i, frame in zip(range(4), c.decode(video=0)):
            cv2.imwrite(str(clip / f"{i:04d}.png"), frame.to_ndarray(format="bgr24"))
    rc = main(["matte", str(clip), "-o", str(tmp_path / "out"), "--config", str(cfg), "--formats", "pha,fgr",
               "--encoder-threads", "2"])
    assert rc == 0, capsys.readouterr().err
    result = json.loads((tmp_path / "out" / "clip" / "result.json").read_text())
    assert result["formats"] == ["pha", "fgr"]
    assert result["prior"]["prior"]["backend"] == "none"
    assert result["matter"]["downsample_ratio"] == 0.5
    assert result["matter"]["alpha_smoother"] is not None
    assert result["config"]["device"] == "cpu"
    assert result["config"]["encoder_threads"] == 2
    assert result["matter"]["prior_size"] == [88, 72]  # carphone is 176x144
    assert len(os.listdir(tmp_path / "out" / "clip" / "pha")) == 4


def test_corrupt_frame_inside_a_video_file_is_reported_and_the_rest_comes_out(tmp_path, checkpoint, capsys):
    from tests.test_video_reader import write_mjpeg_with_corrupt_frame

    video = tmp_path / "talk.avi"
    write_mjpeg_with_corrupt_frame(video, frames=10, bad=5)
    out = tmp_path / "out"
    rc = main(["matte", str(video), "-o", str(out), "--formats", "pha,rgba.webm", "--model", checkpoint])
    err = capsys.readouterr().err
    assert rc == 3 and "frame 5" in err and "talk.avi" in err
    result = json.loads((out / "talk" / "result.json").read_text())
    assert result["status"] == "partial" and result["frames"] == 9
    assert len(list((out / "talk" / "pha").iterdir())) == 9
    assert len(list(read_alpha_video(str(out / "talk" / "rgba.webm")))) == 9


def test_tune_malloc_applies_in_process():
    from matting_core.runtime import tune_malloc

    assert tune_malloc() is True  # glibc (Linux) machines: mallopt accepted both settings


def _one_line_failure(capsys, rc: int, *fragments: str) -> str:
    err = capsys.readouterr().err
    assert rc == 1, err
    assert "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if ln.startswith("matting matte")]
    assert len(lines) == 1 and all(f in lines[0] for f in fragments), err
    return lines[0]


def test_output_folder_that_is_a_file_is_one_clear_line(tmp_path, checkpoint, capsys):
    if not CARPHONE.exists():
        pytest.skip(f"{CARPHONE} absent")
    taken = tmp_path / "mattes"
    taken.write_text("not a folder")
    rc = main(["matte", str(CARPHONE), "-o", str(taken), "--model", checkpoint, "--formats", "pha"])
    _one_line_failure(capsys, rc, str(taken), "is a file")
    rc = main(["matte", str(CARPHONE), "-o", str(taken / "sub"), "--model", checkpoint, "--formats", "pha"])
    _one_line_failure(capsys, rc, str(taken / "sub"), "not a folder")
    assert taken.read_text() == "not a folder"


@pytest.fixture
def read_only_folder(tmp_path):
    """A folder this process cannot write into: mode 0o555, or (as root, whom modes do not stop) immutable."""
    import subprocess

    folder = tmp_path / "read-only"
    folder.mkdir()
    if os.geteuid() != 0:
        folder.chmod(0o555)
        yield folder
        folder.chmod(0o755)
        return
    if subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode != 0:
        pytest.skip("running as root, where chmod does not stop writes, and chattr +i is not allowed here")
    try:
        yield folder
    finally:
        subprocess.run(["chattr", "-i", str(folder)], check=True)


def test_read_only_output_folder_is_one_clear_line(read_only_folder, checkpoint, capsys):
    if not CARPHONE.exists():
        pytest.skip(f"{CARPHONE} absent")
    rc = main(["matte", str(CARPHONE), "-o", str(read_only_folder), "--model", checkpoint, "--formats", "pha"])
    _one_line_failure(capsys, rc, str(read_only_folder), "permission denied")
    assert os.listdir(read_only_folder) == []
