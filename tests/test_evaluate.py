"""`matting evaluate`: pairing, problems, ranking, reports (JSON, CSV, self-contained HTML)."""
from __future__ import annotations

import base64
import csv
import json
import os
import shutil
import xml.etree.ElementTree as ET
from html.parser import HTMLParser
from pathlib import Path

import cv2
import numpy as np
import pytest

from matting_core.data import benchmark as B
from matting_core.evaluation import metrics as M
from matting_core.evaluation.evaluate import ArrayClip, FolderMethod, StreamMethod, evaluate, frame_index, rank, scan_benchmark
from matting_core.data.sources import Photo

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
SIZE, FRAMES = (96, 64), 6


def run_cli(argv: list[str]) -> int:
    """Run one subcommand through the real `matting` entry point; returns the exit status."""
    from pipelines.cli import main

    return main(argv)


def _photo(seed: int) -> Photo:
    """A soft-edged ellipse subject with a textured foreground (stands in for a photo)."""
    rng = np.random.default_rng(seed)
    h, w = 60, 40
    alpha = np.zeros((h, w), np.float32)
    cv2.ellipse(alpha, (20, 30), (14, 24), 0, 0, 360, 1.0, -1)
    alpha = cv2.GaussianBlur(alpha, (0, 0), 1.5)
    fgr = cv2.GaussianBlur(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), (0, 0), 2)
    return Photo(f"synthetic-{seed}", fgr, alpha, fgr, touches_bottom=False)


@pytest.fixture(scope="module")
def bench(tmp_path_factory) -> Path:
    """Two composited clips written by the real benchmark writer."""
    out = tmp_path_factory.mktemp("bench")
    cfg = B.BenchmarkConfig(clips=2, frames=FRAMES, size=SIZE, seed=0)
    for i, name in enumerate(["walk", "turn"]):
        rng = np.random.default_rng(i)
        photo = _photo(i)
        p0 = B.Pose(1.0, -3.0, 35.0 + 5 * i, 32.0)
        p1 = B.Pose(1.1, 3.0, 60.0, 30.0)
        fg = B.foreground_track(p0, p1, FRAMES, photo.alpha.shape)
        bgs = np.stack([cv2.GaussianBlur(rng.integers(0, 256, (80, 120, 3), dtype=np.uint8), (0, 0), 3)
                        for _ in range(FRAMES)])
        bg = B.background_track(rng, FRAMES, bgs.shape[1:3], cfg)
        B.write_clip(str(out), name, B.composite_clip(photo, bgs, fg, bg, SIZE))
    return out


def _write_pred(root: Path, bench: Path, transform, digits: int = 6, fgr: bool = False) -> Path:
    """Predictions in the Mattes layout (<clip>/pha/000000.png) derived from the truth."""
    for clip in ("walk", "turn"):
        (root / clip / "pha").mkdir(parents=True, exist_ok=True)
        for f in sorted((bench / clip / "pha").glob("*.png")):
            i = int(f.stem)
            a = transform(cv2.imread(str(f), cv2.IMREAD_GRAYSCALE), i)
            cv2.imwrite(str(root / clip / "pha" / f"{i:0{digits}d}.png"), a)
            if fgr:
                (root / clip / "fgr").mkdir(exist_ok=True)
                shutil.copy(bench / clip / "fgr" / f.name, root / clip / "fgr" / f"{i:0{digits}d}.png")
    return root


class _Refs(HTMLParser):
    def __init__(self):
        super().__init__()
        self.refs, self.svgs = [], 0

    def handle_starttag(self, tag, attrs):
        for k, v in attrs:
            if k in ("src", "href") and v is not None:
                self.refs.append(v)
        self.svgs += tag == "svg"


def test_frame_index_pairs_stems_by_integer():
    assert frame_index("0007.png") == frame_index("000007.png") == 7
    assert frame_index("frame_0012.jpg") == 12 and frame_index("alpha.png") is None
    assert rank({"a": 2.0, "b": 1.0, "c": 2.0, "d": 5.0}) == {"b": 1, "a": 2, "c": 2, "d": 4}


def test_corrupted_prediction_is_reported_and_the_rest_evaluated(bench, tmp_path, capsys):
    def blur(a, i):
        return cv2.GaussianBlur(a, (0, 0), 1.0)
    pred = _write_pred(tmp_path / "pred", bench, blur)
    os.remove(pred / "turn" / "pha" / "000002.png")                       # a missing frame
    small = cv2.imread(str(pred / "walk" / "pha" / "000004.png"), 0)
    cv2.imwrite(str(pred / "walk" / "pha" / "000004.png"), cv2.resize(small, (40, 30)))  # a wrong size
    shutil.copytree(pred / "walk", pred / "ghost")                         # a clip without truth
    cv2.imwrite(str(pred / "walk" / "pha" / "000099.png"), small)          # a frame without truth
    out = tmp_path / "rep" / "report.json"
    rc = run_cli(["evaluate", "--true", str(bench), "--pred", f"blur={pred}", "--baselines", "none",
                  "--out", str(out)])
    assert rc == 3
    err = capsys.readouterr().err
    assert "turn frame 2: missing frame" in err
    assert "walk frame 4: wrong size: predicted alpha is 40x30, ground truth 96x64" in err
    assert "ghost: extra clip" in err and "walk: extra frame" in err and "99" in err
    report = json.loads(out.read_text())
    kinds = {(p["clip"], p["frame"], p["kind"]) for p in report["problems"]}
    assert {("turn", 2, "missing frame"), ("walk", 4, "wrong size"), ("ghost", None, "extra clip")} <= kinds
    method = report["methods"][0]
    assert method["clips"]["walk"]["evaluated_frames"] == FRAMES - 1
    assert method["clips"]["turn"]["evaluated_frames"] == FRAMES - 1
    assert method["evaluated_frames"] == 2 * FRAMES - 2
    # The evaluated frames are right: recompute one frame's mad by hand.
    t = cv2.imread(str(bench / "turn" / "pha" / "0003.png"), 0) / 255.0
    p = cv2.imread(str(pred / "turn" / "pha" / "000003.png"), 0) / 255.0
    frame3 = next(f for f in method["clips"]["turn"]["frames"] if f["frame"] == 3)
    assert frame3["mad"] == pytest.approx(M.mad(p, t))
    # Frame 3 follows a missing frame: no temporal pair, so dtssd 0 and no messddt (as for frame 0).
    assert frame3["dtssd"] == 0.0 and "messddt" not in frame3
    for suffix in (".csv", ".html"):
        assert out.with_suffix(suffix).exists()
    assert "missing frame" in out.with_suffix(".html").read_text()


def test_several_methods_ranked_in_terminal_csv_and_html(bench, tmp_path, capsys):
    rng = np.random.default_rng(5)
    exact = _write_pred(tmp_path / "exact", bench, lambda a, i: a, fgr=True)
    soft = _write_pred(tmp_path / "soft", bench, lambda a, i: cv2.GaussianBlur(a, (0, 0), 1.5), digits=4)
    noisy = _write_pred(tmp_path / "noisy", bench, lambda a, i: np.clip(
        a.astype(np.int16) + rng.integers(-60, 61, a.shape), 0, 255).astype(np.uint8))
    out = tmp_path / "cmp.json"
    rc = run_cli(["evaluate", "--true", str(bench), "--pred", f"exact={exact}", "--pred", f"soft={soft}",
                  "--pred", f"noisy={noisy}", "--baselines", "none", "--out", str(out)])
    assert rc == 0
    stdout = capsys.readouterr().out
    line = {ln.split()[0]: ln for ln in stdout.splitlines() if ln.split() and ln.split()[0] in ("exact", "soft", "noisy")}
    assert "(1st)" in line["exact"] and "(2nd)" in line["soft"] and "(3rd)" in line["noisy"]

    report = json.loads(out.read_text())
    assert report["ranks"]["mad"] == {"exact": 1, "soft": 2, "noisy": 3}
    assert report["ranks"]["mse"] == {"exact": 1, "soft": 2, "noisy": 3}
    exact_overall = report["methods"][0]["overall"]
    assert exact_overall["mad"] == 0.0 and exact_overall["dtssd"] == 0.0 and exact_overall["fgr_mad"] == 0.0
    assert "fgr_mad" not in report["methods"][1]["overall"]  # no predicted foreground: not evaluated
    assert "not comparable" in report["notes"]["messddt"]

    rows = list(csv.DictReader(out.with_suffix(".csv").open()))
    overall = {r["method"]: r for r in rows if r["level"] == "overall"}
    assert (overall["exact"]["mad_rank"], overall["soft"]["mad_rank"], overall["noisy"]["mad_rank"]) == ("1", "2", "3")
    frames = [r for r in rows if r["level"] == "frame" and r["method"] == "noisy" and r["clip"] == "walk"]
    assert [int(r["frame"]) for r in frames] == list(range(FRAMES))
    assert float(overall["noisy"]["mad"]) == pytest.approx(report["methods"][2]["overall"]["mad"])

    page = out.with_suffix(".html").read_text()
    assert "class='r1'" in page and "class='r2'" in page and "class='r3'" in page
    assert "exact" in page and "(1st)" in page


def test_html_report_is_self_contained_with_plots_and_contact_sheet(bench, tmp_path):
    pred = _write_pred(tmp_path / "p", bench, lambda a, i: cv2.GaussianBlur(a, (0, 0), 2.0))
    out = tmp_path / "r.json"
    assert run_cli(["evaluate", "--true", str(bench), "--pred", str(pred), "--baselines", "none",
                    "--worst-frames", "3", "--metrics", "mad,mse,dtssd", "--out", str(out)]) == 0
    page = out.with_suffix(".html").read_text()
    refs = _Refs()
    refs.feed(page)
    # Every reference is inline: nothing to fetch, nothing that can be missing.
    assert refs.refs and all(r.startswith("data:image/png;base64,") for r in refs.refs)
    images = [cv2.imdecode(np.frombuffer(base64.b64decode(r.split(",", 1)[1]), np.uint8), cv2.IMREAD_COLOR)
              for r in refs.refs]
    assert len(images) == 3 * 4 and all(i is not None and i.shape[1] == 192 for i in images)
    # One plot per clip and metric; each is well-formed SVG with a line per method.
    assert refs.svgs == 2 * 3
    start = 0
    for _ in range(refs.svgs):
        a = page.index("<svg", start)
        b = page.index("</svg>", a) + len("</svg>")
        root = ET.fromstring(page[a:b])
        assert root.findall("{http://www.w3.org/2000/svg}polyline")
        start = b
    # The worst frame by mad really is the highest per-frame mad.
    report = json.loads(out.read_text())
    frames = [(f["mad"], c, f["frame"]) for c, v in report["methods"][0]["clips"].items() for f in v["frames"]]
    worst = report["methods"][0]["worst_frames"]
    assert [w["value"] for w in worst] == sorted((f[0] for f in frames), reverse=True)[:3]
    assert all((w["value"], w["clip"], w["frame"]) in frames for w in worst)


def test_missing_prediction_clip_and_usage_errors(bench, tmp_path):
    pred = _write_pred(tmp_path / "p", bench, lambda a, i: a)
    shutil.rmtree(pred / "turn")
    out = tmp_path / "r.json"
    assert run_cli(["evaluate", "--true", str(bench), "--pred", str(pred), "--baselines", "none", "--out", str(out)]) == 3
    report = json.loads(out.read_text())
    assert any(p["kind"] == "missing clip" and p["clip"] == "turn" for p in report["problems"])
    assert report["methods"][0]["evaluated_frames"] == FRAMES
    assert run_cli(["evaluate", "--true", str(bench)]) == 2
    assert run_cli(["evaluate", "--true", str(bench), "--pred", str(pred), "--metrics", "mad,bogus"]) == 2
    assert run_cli(["evaluate", "--pred", str(pred), "--model", "x.pt"]) == 2
    assert run_cli(["evaluate", "--true", str(tmp_path / "nowhere"), "--pred", str(pred)]) == 2


def test_mattes_from_com_folders_pair_without_renaming(bench, tmp_path):
    # `matting matte bench/<clip>/com -o OUT` writes OUT/<clip>/pha/000000.png; a nested
    # OUT/<clip>/com/pha/ (a whole-tree run) pairs with <clip> as well.
    out = tmp_path / "mattes"
    _write_pred(out, bench, lambda a, i: a)
    shutil.move(str(out / "turn"), str(tmp_path / "tmp_turn"))
    (out / "turn").mkdir()
    shutil.move(str(tmp_path / "tmp_turn"), str(out / "turn" / "com"))
    method = FolderMethod("m", str(out))
    assert method.clip_names() == {"walk", "turn"}
    result = evaluate(scan_benchmark(str(bench)), [method], metrics=("mad",))
    assert not result.problems and result.methods[0].overall["mad"] == 0.0


@pytest.mark.skipif(not (SHARED / "models" / "selfie_segmentation_landscape.tflite").exists(),
                    reason="offline selfie model absent")
def test_prior_baselines_run_beside_a_method(bench, tmp_path, monkeypatch):
    monkeypatch.setenv("MATTING_MODEL_CACHE", str(SHARED / "models"))
    pred = _write_pred(tmp_path / "p", bench, lambda a, i: a)
    out = tmp_path / "r.json"
    assert run_cli(["evaluate", "--true", str(bench), "--pred", f"ours={pred}", "--baselines", "selfie",
                    "--metrics", "mad,dtssd", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    names = [m["name"] for m in report["methods"]]
    assert names == ["ours", "selfie", "selfie-thr", "selfie-smooth", "selfie-smooth-thr"]
    thr = next(m for m in report["methods"] if m["name"] == "selfie-thr")
    soft = next(m for m in report["methods"] if m["name"] == "selfie")
    assert thr["evaluated_frames"] == soft["evaluated_frames"] == 2 * FRAMES
    assert thr["overall"]["mad"] != soft["overall"]["mad"]
    assert report["ranks"]["mad"]["ours"] == 1


def test_stream_methods_and_in_memory_truth_with_flow():
    # An in-memory clip (as from a clip dataset) with ground-truth flow: messddt uses it.
    rng = np.random.default_rng(0)
    pha = np.stack([np.roll(cv2.GaussianBlur(rng.random((20, 30)).astype(np.float32), (0, 0), 2), t, axis=1)
                    for t in range(4)])
    flow = np.zeros((4, 20, 30, 2), np.float32)
    flow[1:, ..., 0] = -1.0  # content moves right by 1: x came from x - 1
    com = (pha[..., None] * 255).repeat(3, -1).astype(np.uint8)
    clip = ArrayClip("c0", pha, None, com, flow)
    offset = StreamMethod("offset", lambda name: (lambda frame: (np.clip(frame[..., 0] / 255.0 + 0.1, 0, 1), None)))
    result = evaluate([clip], [offset], metrics=("mad", "messddt"))
    frames = result.methods[0].clips["c0"].frames
    expected = M.messddt(np.clip(com[2, ..., 0] / 255.0 + 0.1, 0, 1), np.clip(com[1, ..., 0] / 255.0 + 0.1, 0, 1),
                         pha[2], pha[1], flow[2])
    assert frames[2]["messddt"] == pytest.approx(expected)
    assert not result.problems


def _tiny_checkpoint(path: Path) -> Path:
    import torch

    from matting_core.model import matting_net, save_checkpoint

    torch.manual_seed(0)
    save_checkpoint(matting_net(backbone_weights="none"), str(path))
    return path


@pytest.mark.skipif(not (SHARED / "models" / "selfie_segmentation_landscape.tflite").exists(),
                    reason="offline selfie model absent")
def test_model_run_over_a_benchmark_beside_the_baselines(bench, tmp_path, monkeypatch):
    monkeypatch.setenv("MATTING_MODEL_CACHE", str(SHARED / "models"))
    ckpt = _tiny_checkpoint(tmp_path / "model.pt")
    out = tmp_path / "m.json"
    rc = run_cli(["evaluate", "--model", str(ckpt), "--data", str(bench), "--baselines", "selfie",
                  "--metrics", "mad,dtssd,fgr_mad", "--device", "cpu", "--out", str(out)])
    assert rc == 0
    report = json.loads(out.read_text())
    names = [m["name"] for m in report["methods"]]
    assert names[0] == "model.pt" and "selfie-smooth-thr" in names
    model = report["methods"][0]
    assert model["evaluated_frames"] == 2 * FRAMES
    assert "fgr_mad" in model["overall"]  # the model predicts a foreground; the truth has one
    assert set(report["ranks"]["mad"]) == set(names)


@pytest.mark.slow
@pytest.mark.skipif(not (SHARED / "models" / "selfie_segmentation_landscape.tflite").exists()
                    or not (SHARED / "data" / "videos" / "backgrounds").exists(),
                    reason="sample data or offline selfie model absent")
def test_end_to_end_make_benchmark_matte_evaluate(tmp_path, monkeypatch):
    from pipelines import cli

    monkeypatch.setenv("MATTING_MODEL_CACHE", str(SHARED / "models"))
    bench = tmp_path / "bench"
    assert cli.main(["make-benchmark", "--photos", str(SHARED / "data" / "photos" / "p3m"),
                     "--backgrounds", str(SHARED / "data" / "videos" / "backgrounds"), "--out", str(bench),
                     "--clips", "2", "--frames", "5", "--size", "128x72"]) == 0
    ckpt = _tiny_checkpoint(tmp_path / "model.pt")
    mattes = tmp_path / "mattes"
    for clip in ("0000", "0001"):
        assert cli.main(["matte", str(bench / clip / "com"), "-o", str(mattes), "--model", str(ckpt),
                         "--formats", "pha,fgr", "--device", "cpu"]) == 0
    out = tmp_path / "e2e.json"
    assert cli.main(["evaluate", "--true", str(bench), "--pred", f"model={mattes}", "--baselines", "selfie",
                     "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert [m["name"] for m in report["methods"]][:2] == ["model", "selfie"]
    assert report["methods"][0]["evaluated_frames"] == 10 and not report["problems"]
    assert "selfie-smooth" in out.with_suffix(".html").read_text()


def test_log_to_mlflow_attaches_metrics_and_report_files(bench, tmp_path):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    exp = client.create_experiment("eval-test", artifact_location=str(tmp_path / "artifacts"))
    run_id = client.create_run(exp).info.run_id
    pred = _write_pred(tmp_path / "p", bench, lambda a, i: cv2.GaussianBlur(a, (0, 0), 1.0))
    out = tmp_path / "r.json"
    assert run_cli(["evaluate", "--true", str(bench), "--pred", f"soft={pred}", "--baselines", "none",
                    "--metrics", "mad,dtssd", "--out", str(out), "--log-to-mlflow", run_id,
                    "--tracking-uri", uri]) == 0
    report = json.loads(out.read_text())
    run = client.get_run(run_id)
    assert run.data.metrics["eval/mad"] == pytest.approx(report["methods"][0]["overall"]["mad"])
    assert "eval/dtssd" in run.data.metrics
    files = sorted(os.path.basename(f.path) for f in client.list_artifacts(run_id, "evaluation"))
    assert files == ["r.csv", "r.html", "r.json"]


@pytest.mark.skipif(not (SHARED / "models" / "selfie_segmentation_landscape.tflite").exists(),
                    reason="offline selfie model absent")
def test_baselines_over_a_clip_dataset(tmp_path, monkeypatch):
    from matting_core.data.clips import encode_clip, shard_name, write_shard
    from matting_core.data.fakemotion import FakeMotionConfig, clip_rng, synthesize_clip

    monkeypatch.setenv("MATTING_MODEL_CACHE", str(SHARED / "models"))
    data = tmp_path / "dataset"
    (data / "clips").mkdir(parents=True)
    rows = []
    for i in range(2):
        photo = _photo(i)
        rng = np.random.default_rng(i)
        bg = np.stack([cv2.GaussianBlur(rng.integers(0, 256, (80, 110, 3), dtype=np.uint8), (0, 0), 3)
                       for _ in range(4)])
        clip = synthesize_clip(photo, bg, FakeMotionConfig(frames=4, size=SIZE), clip_rng(0, i))
        rows.append(encode_clip(clip, i, 0, photo.uri, "synthetic-bg", 0))
    write_shard(str(data / "clips" / shard_name(0, 2)), rows)
    (data / "manifest.json").write_text(json.dumps({"schema_version": 1}))
    out = tmp_path / "d.json"
    assert run_cli(["evaluate", "--data", str(data), "--baselines", "selfie", "--metrics", "mad,messddt",
                    "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["clips"] == ["clip0", "clip1"]
    assert all(m["evaluated_frames"] == 8 for m in report["methods"])
    assert all("messddt" in m["overall"] for m in report["methods"])


def test_temporal_metrics_are_not_computed_across_a_gap_in_the_truth_numbering(tmp_path):
    """Truth frames 0,1,2,4,5 (no frame 3): frame 4 starts a new chain instead of pairing with 2."""
    numbers = [0, 1, 2, 4, 5]
    for root, digits, scale in ((tmp_path / "bench", 4, 30), (tmp_path / "pred", 6, 20)):
        (root / "clip" / "pha").mkdir(parents=True)
        for n in numbers:
            cv2.imwrite(str(root / "clip" / "pha" / f"{n:0{digits}d}.png"), np.full((16, 16), scale * n, np.uint8))
    result = evaluate(scan_benchmark(str(tmp_path / "bench")), [FolderMethod("m", str(tmp_path / "pred"))],
                      metrics=("mad", "dtssd", "messddt"))
    frames = {f["frame"]: f for f in result.methods[0].clips["clip"].frames}
    assert sorted(frames) == numbers and not result.problems
    assert frames[4]["dtssd"] == 0.0 and "messddt" not in frames[4]
    assert frames[5]["dtssd"] == pytest.approx(100 * 10 / 255) and "messddt" in frames[5]
