"""Frames keep their source numbers and size from `matting matte` to `matting evaluate` (real files, real CLI)."""
from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from matting_core.evaluation import metrics as M
from matting_core.model import matting_net, save_checkpoint
from pipelines.cli import main
from tests.test_video_reader import write_size_change_video

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
CARPHONE = SHARED / "data" / "videos" / "people" / "carphone.mp4"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("model") / "model.pt"
    save_checkpoint(matting_net(backbone_weights="none"), str(path))
    return str(path)


def _matte(video, out, checkpoint, *extra) -> int:
    return main(["matte", str(video), "-o", str(out), "--model", checkpoint, "--formats", "pha,fgr",
                 "--prior", "none", "--device", "cpu", *extra])


def _textured(n: int, size: tuple[int, int]) -> np.ndarray:
    """A BGR frame that differs from frame to frame (so mattes and temporal terms are not trivial)."""
    w, h = size
    rng = np.random.default_rng(n)
    img = cv2.GaussianBlur(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), (0, 0), 3)
    cv2.circle(img, (w // 2 + 3 * n, h // 2), h // 3, (40 * n % 256, 200, 90), -1)
    return img


def _frame_folder(folder: Path, numbers, size=(64, 48)) -> Path:
    folder.mkdir(parents=True)
    for n in numbers:
        cv2.imwrite(str(folder / f"{n:04d}.png"), _textured(n, size(n) if callable(size) else size))
    return folder


def test_gap_in_a_frame_folder_survives_matte_and_evaluate(tmp_path, checkpoint, capsys):
    numbers = [0, 1, 2, 4, 5]
    clip = _frame_folder(tmp_path / "input" / "clip", numbers)
    out = tmp_path / "mattes"
    assert _matte(clip, out, checkpoint) == 0, capsys.readouterr().err
    names = [f"{n:06d}.png" for n in numbers]
    assert sorted(p.name for p in (out / "clip" / "pha").iterdir()) == names
    assert sorted(p.name for p in (out / "clip" / "fgr").iterdir()) == names
    result = json.loads((out / "clip" / "result.json").read_text())
    assert result["status"] == "ok" and result["frames"] == 5 and result["lost_frames"] == []
    assert result["gaps"] == [[3, 3]] and (result["first_frame"], result["last_frame"]) == (0, 5)

    # Truth with the same gap: frame 4 follows frame 2, so no temporal term pairs them.
    truth = tmp_path / "bench" / "clip" / "pha"
    truth.mkdir(parents=True)
    for n in numbers:
        cv2.imwrite(str(truth / f"{n:04d}.png"), cv2.cvtColor(_textured(n + 10, (64, 48)), cv2.COLOR_BGR2GRAY))
    report_path = tmp_path / "report.json"
    assert main(["evaluate", "--true", str(tmp_path / "bench"), "--pred", f"model={out}", "--baselines", "none",
                 "--metrics", "mad,dtssd,messddt", "--out", str(report_path)]) == 0
    report = json.loads(report_path.read_text())
    frames = {f["frame"]: f for f in report["methods"][0]["clips"]["clip"]["frames"]}
    assert sorted(frames) == numbers
    assert frames[4]["dtssd"] == 0.0 and "messddt" not in frames[4]  # a new temporal chain
    assert frames[5]["dtssd"] > 0 and "messddt" in frames[5] and "messddt" in frames[1]
    # Each truth frame is scored against the matte of the same source frame.
    for n in numbers:
        pred = cv2.imread(str(out / "clip" / "pha" / f"{n:06d}.png"), cv2.IMREAD_GRAYSCALE) / 255.0
        true = cv2.imread(str(truth / f"{n:04d}.png"), cv2.IMREAD_GRAYSCALE) / 255.0
        assert frames[n]["mad"] == pytest.approx(M.mad(pred, true), rel=1e-6)


def test_evaluation_does_not_pair_frames_across_a_gap_in_the_predictions(tmp_path):
    from matting_core.evaluation.evaluate import FolderMethod, evaluate, scan_benchmark

    truth, pred = tmp_path / "bench" / "clip" / "pha", tmp_path / "pred" / "clip" / "pha"
    truth.mkdir(parents=True)
    pred.mkdir(parents=True)
    for n in range(5):
        cv2.imwrite(str(truth / f"{n:04d}.png"), np.full((16, 16), 30 * n, np.uint8))
        if n != 2:
            cv2.imwrite(str(pred / f"{n:06d}.png"), np.full((16, 16), 20 * n, np.uint8))
    result = evaluate(scan_benchmark(str(tmp_path / "bench")), [FolderMethod("m", str(tmp_path / "pred"))],
                      metrics=("mad", "dtssd", "messddt"))
    frames = {f["frame"]: f for f in result.methods[0].clips["clip"].frames}
    assert sorted(frames) == [0, 1, 3, 4]
    assert frames[3]["dtssd"] == 0.0 and "messddt" not in frames[3]
    assert frames[4]["dtssd"] > 0 and "messddt" in frames[4]
    assert [p.kind for p in result.problems] == ["missing frame"]


def test_video_whose_size_changes_mid_stream_keeps_every_frame(tmp_path, checkpoint, capsys, caplog):
    video = write_size_change_video(tmp_path / "spliced.mkv")
    out = tmp_path / "out"
    assert _matte(video, out, checkpoint) == 0, capsys.readouterr().err
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any("frame 5 is 80x60, resized" in w and "spliced.mkv" in w for w in warnings), warnings
    result = json.loads((out / "spliced" / "result.json").read_text())
    assert result["status"] == "ok" and result["frames"] == 9 and (result["width"], result["height"]) == (64, 48)
    assert result["resized_frames"] == [{"index": i, "width": 80, "height": 60} for i in range(5, 9)]
    pha = sorted((out / "spliced" / "pha").iterdir())
    assert [p.name for p in pha] == [f"{i:06d}.png" for i in range(9)]
    assert all(cv2.imread(str(p), cv2.IMREAD_UNCHANGED).shape == (48, 64) for p in pha)


def test_frame_folder_whose_frames_differ_in_size(tmp_path, checkpoint, capsys):
    clip = _frame_folder(tmp_path / "mixed", [0, 1, 2, 3], size=lambda n: (80, 60) if n == 2 else (64, 48))
    out = tmp_path / "out"
    assert _matte(clip, out, checkpoint) == 0, capsys.readouterr().err
    result = json.loads((out / "mixed" / "result.json").read_text())
    assert result["status"] == "ok" and result["frames"] == 4 and result["gaps"] == []
    assert result["resized_frames"] == [{"index": 2, "width": 80, "height": 60}]
    fgr = sorted((out / "mixed" / "fgr").iterdir())
    assert len(fgr) == 4 and all(cv2.imread(str(p)).shape == (48, 64, 3) for p in fgr)


def test_matte_dot_writes_the_folders_real_name(tmp_path, checkpoint, capsys, monkeypatch):
    clip = _frame_folder(tmp_path / "clip1", [0, 1])
    monkeypatch.chdir(clip)
    assert _matte(".", tmp_path / "out", checkpoint) == 0, capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["clip1"]
    assert (tmp_path / "out" / "clip1" / "result.json").is_file()
