"""`matting generate` end to end on a real Ray runtime: local paths, S3, bad inputs, resume."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from matting_core.data.clips import iter_clips, list_shards
from pipelines.generate import GenerateConfig, GenerateRefused, run_generate
from tests.conftest import shared_path

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> tuple[str, str]:
    """Good real photos/videos plus one broken input of each kind, in a temporary folder."""
    data = shared_path("data")
    root = tmp_path_factory.mktemp("sources")
    img, pha = root / "photos" / "image", root / "photos" / "alpha"
    img.mkdir(parents=True)
    pha.mkdir(parents=True)
    for stem in ("p_015cd10e", "p_07141906", "p_0865636e"):
        os.symlink(data / "photos/p3m/image" / f"{stem}.jpg", img / f"{stem}.jpg")
        os.symlink(data / "photos/p3m/alpha" / f"{stem}.png", pha / f"{stem}.png")
    for stem in ("GT01", "GT04"):
        os.symlink(data / "photos/alphamatting/image" / f"{stem}.png", img / f"{stem}.png")
        os.symlink(data / "photos/alphamatting/alpha" / f"{stem}.png", pha / f"{stem}.png")
    broken = data / "broken"
    shutil.copy(broken / "truncated.jpg", img / "bad_truncated.jpg")
    shutil.copy(data / "photos/p3m/alpha/p_09ba26b4.png", pha / "bad_truncated.png")
    shutil.copy(broken / "truncated.png", img / "bad_truncpng.png")
    shutil.copy(data / "photos/p3m/alpha/p_09ba26b4.png", pha / "bad_truncpng.png")
    shutil.copy(broken / "text-as-image.png", img / "bad_text.png")
    shutil.copy(data / "photos/p3m/alpha/p_09ba26b4.png", pha / "bad_text.png")
    shutil.copy(data / "photos/alphamatting/image/GT02.png", img / "bad_size.png")
    shutil.copy(broken / "alpha-wrong-size.png", pha / "bad_size.png")
    shutil.copy(data / "photos/p3m/image/p_22fc0130.jpg", img / "bad_noalpha.jpg")
    bg = root / "backgrounds"
    bg.mkdir()
    os.symlink(data / "videos/backgrounds/bikes.mp4", bg / "bikes.mp4")
    for name in ("not-a-video.mp4", "truncated-video.mp4", "truncated-video.avi", "three-frames.mp4"):
        os.symlink(broken / name, bg / name)
    return str(root / "photos"), str(bg)


def config(photos, backgrounds, out, **kw) -> GenerateConfig:
    base = GenerateConfig(photos=(photos,), backgrounds=(backgrounds,), out=out, clips=12, shard_size=4,
                          progress=False)
    fm = dataclasses.replace(base.fakemotion, size=(256, 144))
    return dataclasses.replace(base, fakemotion=fm, **kw)


def read_all(uri) -> dict[int, object]:
    return {c.clip_id: c for c in iter_clips(uri)}


@pytest.fixture(scope="module")
def two_worker_run(ray_runtime, sources, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("gen") / "ds2")
    summary = run_generate(config(*sources, out, workers=2))
    return out, summary


def test_local_run_writes_a_readable_dataset_and_lists_every_bad_input(two_worker_run):
    out, summary = two_worker_run
    assert summary.status == 0, summary.message
    manifest = json.loads(Path(out, "manifest.json").read_text())
    assert manifest["counts"]["clips_written"] == 12 and manifest["schema_version"] == 1
    assert {"numpy", "ray", "av"} <= set(manifest["versions"])
    clips = read_all(out)
    assert sorted(clips) == list(range(12))
    c = clips[0]
    assert c.frames.shape == (8, 144, 256, 3) and c.alpha.shape == (8, 144, 256)
    assert c.flow.shape == (8, 144, 256, 2) and c.flow.dtype == np.float32
    assert len(list_shards(out)) == 3
    errors = [json.loads(line) for line in Path(out, "errors.jsonl").read_text().splitlines()]
    by_name = {os.path.basename(e["uri"]): e["reason"] for e in errors}
    assert "corrupt or truncated image" in by_name["bad_truncated.jpg"]
    assert "corrupt or truncated image" in by_name["bad_truncpng.png"]
    assert "corrupt or truncated image" in by_name["bad_text.png"]
    assert "differs from image size" in by_name["bad_size.png"]
    assert "missing alpha" in by_name["bad_noalpha.jpg"]
    assert "cannot open" in by_name["not-a-video.mp4"]
    assert "cannot open" in by_name["truncated-video.mp4"]
    assert "declares 795 frames but only 194" in by_name["truncated-video.avi"]
    assert "three-frames.mp4" not in by_name  # short but valid: played ping-pong
    # every good input is usable: the plan draws from all 5 photos and both videos
    good_photos = {"p_015cd10e.jpg", "p_07141906.jpg", "p_0865636e.jpg", "GT01.png", "GT04.png"}
    good_videos = {"bikes.mp4", "three-frames.mp4"}
    assert manifest["counts"]["photos_valid"] == 5 and manifest["counts"]["backgrounds_valid"] == 2
    assert {os.path.basename(u) for u in manifest["sources"]["photos"]} == good_photos
    assert {os.path.basename(u) for u in manifest["sources"]["backgrounds"]} == good_videos
    assert {os.path.basename(c.photo) for c in clips.values()} == good_photos
    assert {os.path.basename(c.background) for c in clips.values()} == good_videos
    assert "clips/s" in summary.message and "rejected" in summary.message


def test_reading_some_columns_reads_only_those(two_worker_run, monkeypatch):
    import pyarrow.parquet as pq

    out, _ = two_worker_run
    full = read_all(out)
    read = []
    iter_batches = pq.ParquetFile.iter_batches

    def spy(self, *args, columns=None, **kw):
        read.append(set(columns))
        return iter_batches(self, *args, columns=columns, **kw)

    monkeypatch.setattr(pq.ParquetFile, "iter_batches", spy)
    part = {c.clip_id: c for c in iter_clips(out, columns=["frames", "alpha", "flow"])}
    assert sorted(part) == sorted(full)
    for k, c in part.items():
        assert c.bgr is None and c.fgr is None
        for name in ("frames", "alpha", "flow"):
            assert np.array_equal(getattr(c, name), getattr(full[k], name)), (k, name)
        assert (c.photo, c.background, c.shifted, c.seed) == (full[k].photo, full[k].background, full[k].shifted,
                                                              full[k].seed)
    assert read and all(not ({"bgr", "fgr"} & cols) and {"frames", "alpha", "flow", "clip_id"} <= cols
                        for cols in read)
    only_flow = next(iter_clips(out, columns=["flow"]))
    assert only_flow.frames is None and only_flow.alpha is None
    assert np.array_equal(only_flow.flow, full[only_flow.clip_id].flow)
    with pytest.raises(ValueError, match="'matte'"):
        iter_clips(out, columns=["alpha", "matte"])


def test_same_content_per_clip_for_one_and_two_workers(two_worker_run, sources, tmp_path):
    out2, _ = two_worker_run
    out1 = str(tmp_path / "ds1")
    assert run_generate(config(*sources, out1, workers=1)).status == 0
    a, b = read_all(out1), read_all(out2)
    assert sorted(a) == sorted(b)
    for k in a:
        for name in ("frames", "fgr", "bgr", "alpha", "flow"):
            assert np.array_equal(getattr(a[k], name), getattr(b[k], name)), (k, name)
        assert (a[k].photo, a[k].background, a[k].shifted) == (b[k].photo, b[k].background, b[k].shifted)
    assert [os.path.basename(u) for u in list_shards(out1)] == [os.path.basename(u) for u in list_shards(out2)]


def test_resume_after_interruption_makes_only_missing_shards(two_worker_run, sources, tmp_path):
    out_ref, _ = two_worker_run
    out = tmp_path / "resume"
    shutil.copytree(out_ref, out)
    # an interrupted run: the manifest (written last) and one shard are missing, a temp file remains
    (out / "manifest.json").unlink()
    shards = sorted((out / "clips").glob("*.parquet"))
    shards[1].unlink()
    (out / "clips" / ".clips-00000004-00000007.parquet.1234abcd.tmp").write_bytes(b"partial")
    summary = run_generate(config(*sources, str(out), workers=2))
    assert summary.status == 0, summary.message
    # the run held the output's lock, so no other writer can own a temporary file: it was abandoned
    assert not list((out / "clips").glob(".*.tmp")) and not (out / "_lock.json").exists()
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["this_run"]["clips_made"] == 4
    assert manifest["counts"]["clips_written"] == 12
    ref, got = read_all(out_ref), read_all(str(out))
    assert all(np.array_equal(ref[k].frames, got[k].frames) for k in ref)
    # rerunning a finished dataset makes nothing
    again = run_generate(config(*sources, str(out), workers=2))
    assert again.status == 0 and again.manifest["this_run"]["clips_made"] == 0


def test_other_configuration_is_refused_unless_overwrite(two_worker_run, sources, tmp_path):
    out = tmp_path / "refuse"
    shutil.copytree(two_worker_run[0], out)
    with pytest.raises(GenerateRefused, match="different configuration"):
        run_generate(config(*sources, str(out), seed=5))
    summary = run_generate(config(*sources, str(out), seed=5, clips=4, overwrite=True))
    assert summary.status == 0
    assert sorted(read_all(str(out))) == [0, 1, 2, 3]


def test_dataset_of_another_generator_version_is_refused_unless_overwrite(two_worker_run, sources, tmp_path,
                                                                          monkeypatch):
    import pipelines.generate as gen

    out = tmp_path / "old-generator"
    shutil.copytree(two_worker_run[0], out)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["generator_version"] == gen.GENERATOR_VERSION
    # as the code before generator versions wrote them: no version, a fingerprint of config and sources only
    content = {k: v for k, v in manifest["config"].items() if k not in gen._NOT_CONTENT}
    old_fp = hashlib.sha256(json.dumps({"config": content, "sources": manifest["sources"]},
                                       sort_keys=True).encode()).hexdigest()[:16]
    for name in ("manifest.json", gen.MARKER):
        record = json.loads((out / name).read_text())
        del record["generator_version"]
        (out / name).write_text(json.dumps({**record, "fingerprint": old_fp}))
    refusal = f"generator version 1 \\(this code is version {gen.GENERATOR_VERSION}\\)"
    with pytest.raises(GenerateRefused, match=refusal):
        run_generate(config(*sources, str(out)))
    (out / "manifest.json").unlink()  # an interrupted old run: only its marker and shards
    with pytest.raises(GenerateRefused, match="generator version 1"):
        run_generate(config(*sources, str(out)))
    assert len(list_shards(str(out))) == 3  # refusing touches nothing
    summary = run_generate(config(*sources, str(out), clips=4, overwrite=True))
    assert summary.status == 0 and summary.manifest["generator_version"] == gen.GENERATOR_VERSION
    assert summary.manifest["this_run"]["clips_made"] == 4 and sorted(read_all(str(out))) == [0, 1, 2, 3]
    # a later bump of the version refuses this dataset in turn
    monkeypatch.setattr(gen, "GENERATOR_VERSION", gen.GENERATOR_VERSION + 1)
    with pytest.raises(GenerateRefused, match=f"version {gen.GENERATOR_VERSION - 1} \\(this code"):
        run_generate(config(*sources, str(out), clips=4))


def test_shard_maker_runs_foreground_estimation_on_one_thread(sources, tmp_path):
    # Each actor has one Ray CPU: pymatting's numba loops with a thread per core in every actor
    # made the actors fight over the cores. A fresh interpreter, as an actor is, before numba loads.
    if (os.cpu_count() or 1) < 2:
        pytest.skip("numba's default is already one thread on a single core")
    code = f"""
import dataclasses, json
from matting_core.data.sources import (discover_backgrounds, discover_photos, validate_all, validate_background,
                                       validate_photo)
from pipelines.config import to_dict
from pipelines.generate import GenerateConfig, ShardMaker

def infos(found, validate):
    return [json.loads(json.dumps(dataclasses.asdict(i))) for i in validate_all(found, validate)[0]]

photos = infos(discover_photos({sources[0]!r})[0], validate_photo)
backgrounds = infos(discover_backgrounds({sources[1]!r})[0], validate_background)
cfg = GenerateConfig(out={str(tmp_path / "ds")!r}, clips=1, progress=False)
out = ShardMaker(to_dict(cfg), photos, backgrounds, "fp")({{"start": [0], "stop": [1]}})
import numba  # loaded by the shard's foreground estimation
print(out["clips"][0], numba.get_num_threads())
"""
    import subprocess
    import sys

    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=Path(__file__).parents[1])
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.split() == ["1", "1"]


def test_no_valid_background_fails_with_a_clear_message(ray_runtime, sources, tmp_path, shared_data):
    bad = tmp_path / "bad-bg"
    bad.mkdir()
    os.symlink(shared_data / "broken" / "not-a-video.mp4", bad / "x.mp4")
    summary = run_generate(config(sources[0], str(bad), str(tmp_path / "out")))
    assert summary.status == 1 and "no valid background" in summary.message
    assert "not-a-video" in (tmp_path / "out" / "errors.jsonl").read_text().replace("x.mp4", "not-a-video")


@pytest.mark.s3
def test_s3_in_and_out(s3_server, ray_runtime, sources, tmp_path):
    import s3fs

    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_server.endpoint})
    photos, backgrounds = sources
    for local, prefix in ((photos, "test/in/photos"), (backgrounds, "test/in/bg")):
        for path in Path(local).rglob("*"):
            if path.is_file() and not path.name.startswith("bad_") and "video" not in path.name:
                fs.put(str(path.resolve()), f"{prefix}/{path.relative_to(local)}")
    cfg = config("s3://test/in/photos", "s3://test/in/bg", "s3://test/out/ds", clips=6, shard_size=3)
    summary = run_generate(cfg)
    assert summary.status == 0, summary.message
    assert fs.exists("test/out/ds/manifest.json") and fs.exists("test/out/ds/errors.jsonl")
    clips = read_all("s3://test/out/ds")
    assert sorted(clips) == list(range(6))
    assert clips[0].photo.startswith("s3://test/in/photos/image/")
    assert not [p for p in fs.find("test/out/ds") if p.endswith(".tmp")]
    assert not fs.exists("test/out/ds/_lock.json")  # the lock is released at the end


def test_cli_generate_exit_status_and_config_file(ray_runtime, sources, tmp_path):
    from pipelines.cli import main

    cfg_file = tmp_path / "gen.yaml"
    cfg_file.write_text("clips: 3\nshard_size: 3\nfakemotion:\n  size: [128, 72]\n  frames: 4\n")
    out = tmp_path / "cli"
    rc = main(["generate", "--config", str(cfg_file), "--photos", sources[0], "--backgrounds", sources[1],
               "--out", str(out), "--frames", "5"])
    assert rc == 0
    clip = next(iter_clips(str(out)))
    assert clip.frames.shape == (5, 72, 128, 3)  # flag beats file, file beats default
    assert main(["generate", "--photos", sources[0], "--backgrounds", sources[1], "--out", str(out), "--seed", "9"]) == 2
    assert main(["generate", "--photos", sources[0], "--out", str(out), "--clips", "x"]) == 2


# --- bad photos, failed clips, interrupted and concurrent runs ------------------------------------

def _rewrite_shard(path: Path, keep=None, **footer) -> None:
    """Rewrite a shard with only the rows whose clip_id is in `keep` and footer fields replaced."""
    import pyarrow.parquet as pq

    from matting_core.data.clips import shard_metadata, write_shard

    _, meta = shard_metadata(str(path))
    rows = [r for r in pq.read_table(path).to_pylist() if keep is None or r["clip_id"] in keep]
    write_shard(str(path), rows, {**meta, **footer})


def test_tiny_photo_is_rejected_up_front_and_no_clip_is_lost(ray_runtime, sources, tmp_path):
    import cv2

    photos = tmp_path / "photos"
    shutil.copytree(sources[0], photos, symlinks=True)
    cv2.imwrite(str(photos / "tiny.png"), np.full((1, 1, 4), 200, np.uint8))  # RGBA, one opaque pixel
    summary = run_generate(config(str(photos), sources[1], str(tmp_path / "out"), clips=6, shard_size=3))
    assert summary.status == 0, summary.message
    assert summary.manifest["counts"]["clips_written"] == 6
    errors = {os.path.basename(e["uri"]): e["reason"]
              for e in map(json.loads, (tmp_path / "out" / "errors.jsonl").read_text().splitlines())}
    assert "subject too small" in errors["tiny.png"] and "1x1" in errors["tiny.png"]


def test_failed_clips_are_retried_on_rerun(two_worker_run, sources, tmp_path):
    out = tmp_path / "retry"
    shutil.copytree(two_worker_run[0], out)
    shards = sorted((out / "clips").glob("*.parquet"))
    # as a run where clips 6 and 7 failed (a source unreadable for a while) leaves its shard
    failed = [{"clip_id": i, "uri": "s3://x/photo.jpg", "reason": "timeout"} for i in (6, 7)]
    _rewrite_shard(shards[1], keep={4, 5}, failed=failed)
    untouched = {p.name: p.stat().st_mtime_ns for p in (shards[0], shards[2])}
    summary = run_generate(config(*sources, str(out), workers=2))
    assert summary.status == 0, summary.message
    assert summary.manifest["this_run"]["clips_made"] == 4  # that shard only
    assert summary.manifest["counts"]["clips_written"] == 12 and summary.manifest["counts"]["clips_failed"] == 0
    assert {p: (out / "clips" / p).stat().st_mtime_ns for p in untouched} == untouched
    assert sorted(read_all(str(out))) == list(range(12))


def test_shard_of_another_fingerprint_is_remade(two_worker_run, sources, tmp_path):
    from matting_core.data.clips import shard_metadata

    out = tmp_path / "mixed"
    shutil.copytree(two_worker_run[0], out)
    first = sorted((out / "clips").glob("*.parquet"))[0]
    _rewrite_shard(first, fingerprint="0000000000000000")  # as a concurrent run of another config writes
    summary = run_generate(config(*sources, str(out), workers=2))
    assert summary.status == 0, summary.message
    assert summary.manifest["this_run"]["clips_made"] == 4
    assert shard_metadata(str(first))[1]["fingerprint"] == summary.manifest["fingerprint"]


def test_marker_of_a_run_that_wrote_nothing_does_not_block_the_corrected_run(ray_runtime, sources, tmp_path):
    import pipelines.generate as gen

    out = tmp_path / "crashed"
    out.mkdir()
    # a run with another configuration crashed after writing its marker, before any shard
    (out / gen.MARKER).write_text(json.dumps({"fingerprint": "0123456789abcdef",
                                              "generator_version": gen.GENERATOR_VERSION}))
    summary = run_generate(config(*sources, str(out), clips=2, shard_size=2))
    assert summary.status == 0, summary.message
    assert json.loads((out / gen.MARKER).read_text())["fingerprint"] == summary.manifest["fingerprint"]


def test_failed_clip_lists_its_photo_and_background(sources, tmp_path, monkeypatch):
    from matting_core.data.sources import (discover_backgrounds, discover_photos, validate_all, validate_background,
                                           validate_photo)
    from pipelines.config import to_dict
    from pipelines.generate import ShardMaker

    monkeypatch.setenv("NUMBA_NUM_THREADS", os.environ.get("NUMBA_NUM_THREADS", "1"))  # ShardMaker sets it
    photos = tmp_path / "photos"
    shutil.copytree(sources[0], photos)
    infos = [dataclasses.asdict(i) for i in validate_all(discover_photos(str(photos))[0], validate_photo)[0]][:1]
    bgs = [json.loads(json.dumps(dataclasses.asdict(i)))
           for i in validate_all(discover_backgrounds(sources[1])[0], validate_background)[0]][:1]
    cfg = to_dict(GenerateConfig(out=str(tmp_path / "ds"), clips=1, progress=False))

    def failure(photos, backgrounds):
        res = ShardMaker(cfg, photos, backgrounds, "fp")({"start": [0], "stop": [1]})
        assert res["clips"] == [0]
        return json.loads(res["failed"][0])[0]

    # an unexpected error (a background whose probe says 0 px wide): both sources named all the same
    broken_bg = [{**bgs[0], "width": 0}]
    entry = failure(infos, broken_bg)
    assert entry["uri"] and entry["photo"] == infos[0]["image"] and entry["background"] == bgs[0]["uri"], entry
    # a photo gone after validation: the error names it, and the clip's background too
    os.remove(infos[0]["image"])
    entry = failure(infos, bgs)
    assert entry["uri"] == infos[0]["image"] and entry["background"] == bgs[0]["uri"], entry


def test_cli_refuses_a_locked_output_and_takes_over_a_killed_run(ray_runtime, sources, tmp_path, capsys):
    from pipelines.cli import main
    from tests.test_output_lock import held_then_killed

    out = tmp_path / "locked"
    args = ["generate", "--photos", sources[0], "--backgrounds", sources[1], "--out", str(out), "--clips", "2",
            "--shard-size", "2", "--size", "128x72", "--frames", "4", "--no-progress"]
    with held_then_killed(str(out)) as other:
        assert main(args) == 2
        err = capsys.readouterr().err
        assert "in use by another run" in err and f"pid {other.pid}" in err, err
        assert not (out / "clips").exists()  # refused before any work
    (out / "clips").mkdir()
    (out / "clips" / ".clips-00000000-00000001.parquet.0badc0de.tmp").write_bytes(b"left by SIGKILL")
    assert main(args) == 0
    assert not list((out / "clips").glob(".*.tmp")) and not (out / "_lock.json").exists()
    assert sorted(read_all(str(out))) == [0, 1]
