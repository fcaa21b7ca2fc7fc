"""SIGTERM is handled as Ctrl-C: real subprocesses killed mid-run leave no temporary output and no child."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import av
import pytest

from infra.s3_local import free_port, weed_binary

REPO = Path(__file__).resolve().parents[1]
MATTING = str(Path(sys.executable).parent / "matting")
CARPHONE = Path(os.environ.get("MATTING_SHARED_DIR", REPO.parent / "shared")) / "data" / "videos" / "people" / "carphone.mp4"


def _children(pid: int) -> list[int]:
    """Pids whose parent is `pid` (from /proc: psutil is not a dependency)."""
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path("/proc", entry, "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(entry))
    return out


def _running(pid: int) -> bool:
    """Whether `pid` exists and is not a zombie."""
    try:
        state = Path("/proc", str(pid), "stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _wait_for(predicate, timeout: float, what: str):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    pytest.fail(f"{what} within {timeout:.0f} s")


def _answers(url: str) -> bool:
    try:
        urllib.request.urlopen(url, timeout=1)
    except urllib.error.HTTPError:
        return True  # 403 without credentials: the S3 API is up
    except OSError:
        return False
    return True


@pytest.mark.s3
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_s3_local_stops_its_weed_child_when_signalled(tmp_path, sig):
    weed_binary()  # FileNotFoundError fails loudly: the dev extra installs it
    port = free_port()
    env = {**os.environ, "AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "s", "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "infra.s3_local", "--dir", str(tmp_path / "s3"), "--port", str(port)],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    weed: list[int] = []
    try:
        _wait_for(lambda: _answers(f"http://127.0.0.1:{port}"), 60, "the S3 endpoint did not answer")
        weed = [p for p in _children(proc.pid) if "weed" in Path("/proc", str(p), "cmdline").read_bytes().decode()]
        assert len(weed) == 1, weed
        proc.send_signal(sig)
        proc.wait(30)
        assert not _running(weed[0]), f"weed (pid {weed[0]}) still running after {sig.name}"
        assert proc.returncode == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        for pid in weed:  # a leaked server (the defect) is not left behind by the test
            if _running(pid):
                os.kill(pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def long_video(tmp_path_factory) -> Path:
    """A real 1200-frame video: carphone's frames ten times over (about a minute of matting on 2 cores)."""
    if not CARPHONE.exists():
        pytest.skip(f"{CARPHONE} absent")
    with av.open(str(CARPHONE)) as c:
        frames = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
    path = tmp_path_factory.mktemp("video") / "long.mp4"
    with av.open(str(path), "w") as out:
        stream = out.add_stream("mpeg4", rate=25)
        stream.width, stream.height, stream.pix_fmt = frames[0].shape[1], frames[0].shape[0], "yuv420p"
        for i in range(10 * len(frames)):
            out.mux(stream.encode(av.VideoFrame.from_ndarray(frames[i % len(frames)], format="rgb24")))
        out.mux(stream.encode())
    return path


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
    from matting_core.model import matting_net, save_checkpoint

    path = tmp_path_factory.mktemp("model") / "model.pt"
    save_checkpoint(matting_net(backbone_weights="none"), str(path))
    return str(path)


def test_sigterm_during_matte_publishes_nothing_and_leaves_no_temporary(tmp_path, long_video, checkpoint):
    out = tmp_path / "out"
    proc = subprocess.Popen([MATTING, "matte", str(long_video), "-o", str(out), "--model", checkpoint, "--prior", "none",
                             "--formats", "pha,rgba.webm", "--threads", "1"],
                            cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        tmp = _wait_for(lambda: out.exists() and [p for p in out.iterdir() if p.name.startswith(".long.tmp-")],
                        120, "no temporary output folder appeared")
        _wait_for(lambda: (tmp[0] / "pha").exists() and len(os.listdir(tmp[0] / "pha")) >= 5, 120,
                  "no frame was written")
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, err
    assert "matting matte: terminated" in err and "Traceback" not in err, err
    assert sorted(p.name for p in out.iterdir()) == [], "published output or temporary folder left behind"
