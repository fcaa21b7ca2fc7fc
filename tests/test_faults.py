"""The fault table: bad inputs and faults, each run through the real `matting` CLI.

One row per case: what is broken, the command, the exit status it must end with, a fragment the
user must read (on stderr or stdout), and what must still be produced (or must not be). New
bad-input classes are added here. The shipped broken inputs (`../shared/data/broken`) are rows too.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import cv2
import numpy as np
import pytest
import torch

from matting_core.model import matting_net, save_checkpoint
from pipelines.cli import main
from tests.conftest import SHARED

BROKEN = SHARED / "data" / "broken"
CARPHONE = SHARED / "data" / "videos" / "people" / "carphone.mp4"


@dataclass(frozen=True)
class Case:
    """`setup(tmp)` prepares the inputs and returns the argv; `check(tmp)` asserts what must (not) exist."""

    name: str
    setup: Callable[[Path], list[str]]
    status: int
    fragment: str
    check: Callable[[Path], None] = lambda tmp: None


def _model(tmp: Path) -> str:
    path = tmp / "model.pt"
    if not path.exists():
        save_checkpoint(matting_net(prior={"backend": "none", "value": 0.5}), str(path))
    return str(path)


def _frames(tmp: Path, numbers, name: str = "clip", broken: dict[int, Path] | None = None) -> Path:
    folder = tmp / name
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for n in numbers:
        if broken and n in broken:
            shutil.copy(broken[n], folder / f"{n:04d}.png")
        else:
            cv2.imwrite(str(folder / f"{n:04d}.png"), rng.integers(0, 255, (36, 64, 3), dtype=np.uint8))
    return folder


def _matte(video: Path | str, tmp: Path, *extra: str) -> list[str]:
    return ["matte", str(video), "-o", str(tmp / "out"), "--model", _model(tmp), "--formats", "pha",
            "--no-progress", *extra]


def _broken(name: str, tmp: Path) -> Path:
    if not (BROKEN / name).exists():
        pytest.skip(f"{BROKEN / name} absent")
    return BROKEN / name


def _nothing_published(tmp: Path) -> None:
    out = tmp / "out"
    assert not out.exists() or not [p for p in out.iterdir() if not p.name.startswith(".")], list(out.iterdir())


def _pha(tmp: Path, stem: str) -> list[int]:
    return sorted(int(p.stem) for p in (tmp / "out" / stem / "pha").glob("*.png"))


def _result(tmp: Path, stem: str) -> dict:
    return json.loads((tmp / "out" / stem / "result.json").read_text())


def _pickled_checkpoint(tmp: Path) -> list[str]:
    class Payload:  # unpickling it would run code: weights-only loading must refuse it
        def __reduce__(self):
            return (print, ("payload ran",))

    torch.save({"format": "matting-checkpoint", "config": {}, "state_dict": {}, "extra": Payload()},
               tmp / "evil.pt")
    return ["matte", str(_frames(tmp, range(2))), "-o", str(tmp / "out"), "--model", str(tmp / "evil.pt")]


def _taken_name(tmp: Path) -> list[str]:
    (tmp / "out").mkdir()
    (tmp / "out" / "clip").write_text("the user's file")
    return _matte(_frames(tmp, range(3)), tmp)


def _truth_with_corrupt_prediction(tmp: Path) -> list[str]:
    for clip in ("c",):
        for sub in ("com", "pha"):
            (tmp / "truth" / clip / sub).mkdir(parents=True)
        (tmp / "pred" / clip / "pha").mkdir(parents=True)
        for i in range(3):
            alpha = np.zeros((24, 32), np.uint8)
            alpha[4:20, 8:24] = 255
            for sub in ("com", "pha"):
                cv2.imwrite(str(tmp / "truth" / clip / sub / f"{i:04d}.png"), alpha)
            cv2.imwrite(str(tmp / "pred" / clip / "pha" / f"{i:06d}.png"), alpha)
        shutil.copy(_broken("truncated.png", tmp), tmp / "pred" / clip / "pha" / "000001.png")
    return ["evaluate", "--true", str(tmp / "truth"), "--pred", f"p={tmp / 'pred'}", "--baselines", "none",
            "--metrics", "mad", "--out", str(tmp / "report.json")]


CASES = [
    Case("random bytes named .mp4", lambda t: _matte(_broken("not-a-video.mp4", t), t), 1,
         "not-a-video.mp4: cannot open as a video", _nothing_published),
    Case("mp4 cut before its index", lambda t: _matte(_broken("truncated-video.mp4", t), t), 1,
         "truncated-video.mp4: cannot open as a video", _nothing_published),
    Case("avi that declares 795 frames and decodes 194", lambda t: _matte(_broken("truncated-video.avi", t), t), 3,
         "truncated: declares 795 frames but only 194 decode",
         lambda t: (_pha(t, "truncated-video") == list(range(194))
                    and _result(t, "truncated-video")["status"] == "partial") or pytest.fail("194 frames, partial")),
    Case("three-frame video", lambda t: _matte(_broken("three-frames.mp4", t), t), 0, "3 frames",
         lambda t: _pha(t, "three-frames") == [0, 1, 2] or pytest.fail("three mattes")),
    Case("corrupt frame mid-folder", lambda t: _matte(_frames(t, range(5), broken={2: _broken("text-as-image.png", t)}),
                                                      t), 3, "frame 2 lost",
         lambda t: _pha(t, "clip") == [0, 1, 3, 4] or pytest.fail("the other frames are delivered")),
    Case("truncated PNG frame", lambda t: _matte(_frames(t, range(4), broken={3: _broken("truncated.png", t)}), t), 3,
         "frame 3 lost", lambda t: _pha(t, "clip") == [0, 1, 2] or pytest.fail("frames 0-2 delivered")),
    Case("gap in a frame folder's numbering", lambda t: _matte(_frames(t, [0, 1, 2, 4, 5]), t), 0, "5 frames",
         lambda t: (_pha(t, "clip") == [0, 1, 2, 4, 5] and _result(t, "clip")["gaps"] == [[3, 3]])
         or pytest.fail("source numbers kept, gap listed")),
    Case("two files with one number", lambda t: (_frames(t, range(3)), shutil.copy(t / "clip" / "0001.png",
                                                                                   t / "clip" / "1.png"),
                                                 _matte(t / "clip", t))[-1], 1, "share the number 1",
         _nothing_published),
    Case("output name '..'", lambda t: (_frames(t, range(2), name="x/y"),
                                        ["matte", str(t / "x" / "y" / ".."), "-o", str(t / "out"), "--model",
                                         _model(t), "--formats", "pha"])[-1], 1, "x",
         lambda t: None),
    Case("output name taken by a file", _taken_name, 1, "clip: is a file, where a folder is needed",
         lambda t: (t / "out" / "clip").read_text() == "the user's file" or pytest.fail("the file is kept")),
    Case("checkpoint that is not one", lambda t: (Path(t / "m.pt").write_text("text"),
                                                  ["matte", str(_frames(t, range(2))), "-o", str(t / "out"),
                                                   "--model", str(t / "m.pt")])[-1], 1,
         "corrupt or not a torch checkpoint", _nothing_published),
    Case("pickled payload in a checkpoint", _pickled_checkpoint, 1, "checkpoint", _nothing_published),
    Case("missing checkpoint", lambda t: ["matte", str(_frames(t, range(2))), "-o", str(t / "out"), "--model",
                                          str(t / "nowhere.pt")], 1, "nowhere.pt", _nothing_published),
    Case("numeric option out of range", lambda t: _matte(_frames(t, range(2)), t, "--max-side", "4"), 2,
         "--max-side: input should be greater than or equal to 32", _nothing_published),
    Case("corrupt predicted frame", _truth_with_corrupt_prediction, 3, "frame 1",
         lambda t: json.loads((t / "report.json").read_text())["methods"][0]["evaluated_frames"] == 2
         or pytest.fail("the other frames are evaluated")),
    Case("benchmark folder that does not exist", lambda t: ["evaluate", "--true", str(t / "nowhere"), "--pred",
                                                            str(t)], 2, "nowhere", lambda t: None),
    Case("infer with a model that cannot be loaded", lambda t: (Path(t / "m.pt").write_text("x"), (t / "in").mkdir(),
                                                                ["infer", "--model", str(t / "m.pt"), "--input",
                                                                 str(t / "in"), "--out", str(t / "out")])[-1], 1,
         "cannot be loaded", _nothing_published),
]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_fault(case: Case, tmp_path, capsys, monkeypatch):
    if not SHARED.joinpath("data").exists():
        pytest.skip(f"sample data absent: {SHARED / 'data'}")
    monkeypatch.chdir(tmp_path)
    argv = case.setup(tmp_path)
    status = main(argv)
    captured = capsys.readouterr()
    text = captured.out + captured.err
    assert status == case.status, f"{case.name}: exit {status}, expected {case.status}\n{text}"
    assert case.fragment in text, f"{case.name}: {case.fragment!r} not in\n{text}"
    assert "Traceback" not in text, text
    case.check(tmp_path)


def test_an_input_error_survives_pickling_as_ray_sends_it_from_a_worker():
    import pickle

    from matting_core.errors import InputError

    err = pickle.loads(pickle.dumps(InputError("s3://bucket/clips", "not a clip dataset")))
    assert isinstance(err, InputError) and (err.uri, err.reason) == ("s3://bucket/clips", "not a clip dataset")
    assert str(err) == "s3://bucket/clips: not a clip dataset"
