"""Storage faults: an endpoint that never answers, wrong keys; one clear line and exit 1, never a hang."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

from infra.s3_local import free_port

REPO = Path(__file__).resolve().parents[1]
MATTING = [str(Path(sys.executable).parent / "matting")]  # the console script, as a user runs it
# Low limits so a silent endpoint gives up in seconds; the defaults are measured by hand (README).
FAST = {"MATTING_STORAGE_CONNECT_TIMEOUT": "1", "MATTING_STORAGE_READ_TIMEOUT": "1", "MATTING_STORAGE_RETRIES": "1"}


@contextmanager
def silent_endpoint():
    """An HTTP endpoint on loopback that accepts connections and never answers: yields its URL."""
    server = socket.socket()
    server.bind(("127.0.0.1", free_port()))
    server.listen(64)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept():
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(server.accept()[0])  # keep it open, read nothing, send nothing
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.getsockname()[1]}"
    finally:
        stop.set()
        thread.join()
        for conn in held + [server]:
            conn.close()


def _env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "MATTING_STORAGE_"))}
    env.update({"AWS_ACCESS_KEY_ID": "dummy", "AWS_SECRET_ACCESS_KEY": "dummy", "AWS_DEFAULT_REGION": "us-east-1",
                "RAY_AUTH_MODE": "disabled", "PYTHONPATH": str(REPO)}, **extra)
    return env


def _matting(args: list[str], env: dict, timeout: float) -> tuple[int, str, float]:
    t0 = time.time()
    try:
        p = subprocess.run(MATTING + args, env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"matting {args[0]} still running after {timeout:.0f} s; stderr: {exc.stderr!r}")
    return p.returncode, p.stderr, time.time() - t0


def _one_clear_line(err: str) -> str:
    """The error line of `err`; fails unless it has no traceback and is a single line."""
    assert "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if ln.startswith("matting ")]
    assert len(lines) == 1, err
    return lines[0]


@pytest.fixture
def fast_storage(monkeypatch):
    for k, v in FAST.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "dummy")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "dummy")
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)


def test_every_storage_call_gives_up_on_a_silent_endpoint_naming_it(fast_storage, monkeypatch):
    from matting_core import storage

    with silent_endpoint() as url:
        monkeypatch.setenv("AWS_ENDPOINT_URL", url)
        calls = {"list_files": lambda: storage.list_files("s3://test/photos"),
                 "read_bytes": lambda: storage.read_bytes("s3://test/photos/a.jpg"),
                 "write_bytes_atomic": lambda: storage.write_bytes_atomic("s3://test/out/a.json", b"{}"),
                 "remove": lambda: storage.remove("s3://test/out/a.json")}
        for name, call in calls.items():
            t0 = time.time()
            with pytest.raises(storage.StorageError) as info:
                call()
            assert time.time() - t0 < 30, name
            assert info.value.endpoint == url and info.value.uri.startswith("s3://test/"), name
            assert url in str(info.value) and "answer" in str(info.value), (name, str(info.value))


def test_timeouts_reach_every_filesystem(monkeypatch):
    """The limits are options of the filesystem itself, so fs.open file objects (PyAV's reads) have them."""
    from matting_core import storage

    monkeypatch.setenv("MATTING_STORAGE_READ_TIMEOUT", "7")
    monkeypatch.setenv("MATTING_STORAGE_RETRIES", "4")
    opts = storage.storage_options("s3://bucket/x")
    assert opts["config_kwargs"]["read_timeout"] == 7.0
    assert opts["config_kwargs"]["retries"] == {"total_max_attempts": 5, "mode": "standard"}
    fs, _ = storage.filesystem("s3://bucket/x")
    assert fs.config_kwargs["read_timeout"] == 7.0 and fs.retries == 1
    monkeypatch.setenv("MATTING_STORAGE_READ_TIMEOUT", "soon")
    with pytest.raises(ValueError, match="MATTING_STORAGE_READ_TIMEOUT"):
        storage.storage_options("s3://bucket/x")


def test_generate_against_a_silent_endpoint_exits_1_naming_it(tmp_path):
    with silent_endpoint() as url:
        rc, err, seconds = _matting(["generate", "--photos", "s3://test/photos", "--backgrounds", "s3://test/bg",
                                     "--out", "s3://test/out", "--clips", "2"],
                                    _env(AWS_ENDPOINT_URL=url, **FAST), timeout=90)
    assert rc == 1, err
    line = _one_clear_line(err)
    assert url in line and "no answer" in line and "s3://test/" in line, line


@pytest.mark.s3
def test_wrong_secret_key_is_one_line_naming_uri_and_cause(s3_server, tmp_path, monkeypatch):
    import s3fs

    from matting_core import storage

    # In process: every storage function says access denied, with the URI and the endpoint.
    s3fs.S3FileSystem.clear_instance_cache()
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong")
    try:
        for call in (lambda: storage.list_files("s3://test/photos"), lambda: storage.read_bytes("s3://test/a"),
                     lambda: storage.write_bytes_atomic("s3://test/a", b"x")):
            with pytest.raises(storage.StorageError) as info:
                call()
            assert "access denied" in str(info.value) and s3_server.endpoint in str(info.value)
            assert "AWS_SECRET_ACCESS_KEY" in str(info.value) and "wrong" not in str(info.value)
    finally:
        s3fs.S3FileSystem.clear_instance_cache()
    # Through the real CLI: inputs on S3 (fails while listing them).
    env = _env(AWS_ENDPOINT_URL=s3_server.endpoint, AWS_ACCESS_KEY_ID="testkey", AWS_SECRET_ACCESS_KEY="wrong")
    rc, err, _ = _matting(["generate", "--photos", "s3://test/photos", "--backgrounds", "s3://test/bg",
                           "--out", str(tmp_path / "ds"), "--clips", "2"], env, timeout=120)
    assert rc == 1, err
    line = _one_clear_line(err)
    assert "s3://test/photos" in line and "access denied" in line and s3_server.endpoint in line, line
    assert "AWS_ACCESS_KEY_ID" in line


@pytest.mark.s3
def test_wrong_secret_key_for_an_s3_output_is_one_line(s3_server, shared_data, tmp_path):
    photos, bg = tmp_path / "photos", tmp_path / "bg"
    (photos / "image").mkdir(parents=True)
    (photos / "alpha").mkdir()
    bg.mkdir()
    os.symlink(shared_data / "photos/p3m/image/p_015cd10e.jpg", photos / "image/p_015cd10e.jpg")
    os.symlink(shared_data / "photos/p3m/alpha/p_015cd10e.png", photos / "alpha/p_015cd10e.png")
    os.symlink(shared_data / "videos/backgrounds/bikes.mp4", bg / "bikes.mp4")
    env = _env(AWS_ENDPOINT_URL=s3_server.endpoint, AWS_ACCESS_KEY_ID="testkey", AWS_SECRET_ACCESS_KEY="wrong")
    rc, err, _ = _matting(["generate", "--photos", str(photos), "--backgrounds", str(bg), "--out", "s3://test/denied",
                           "--clips", "2", "--workers", "1", "--size", "128x72", "--frames", "4"], env, timeout=240)
    assert rc == 1, err
    line = _one_clear_line(err)
    assert "s3://test/denied" in line and "access denied" in line, line


def _read_denied(uri: str) -> bytes:
    from matting_core import storage

    return storage.read_bytes(uri)


@pytest.mark.s3
@pytest.mark.ray
def test_a_storage_fault_inside_ray_tasks_is_still_one_line(s3_server, ray_runtime):
    """Ray wraps a task's exception; the CLI's message is found through the wrapping (plain tasks and Ray Data)."""
    import ray

    from pipelines.cli import failure_message

    denied = {"env_vars": {"AWS_SECRET_ACCESS_KEY": "wrong"}}  # the real server refuses this worker's requests
    task = ray.remote(_read_denied).options(runtime_env=denied, max_retries=0)
    with pytest.raises(Exception) as info:
        ray.get(task.remote("s3://test/secret.bin"))
    assert failure_message(info.value) == (f"s3://test/secret.bin: access denied by {s3_server.endpoint} "
                                           "(check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY)")
    ds = ray.data.from_items([{"uri": "s3://test/in/a.png"}]).map(
        lambda row: {"n": len(_read_denied(row["uri"]))}, runtime_env=denied)
    with pytest.raises(Exception) as info:
        ds.take_all()
    message = failure_message(info.value)
    assert message and message.startswith("s3://test/in/a.png: access denied by"), message


def test_an_endpoint_nobody_listens_on_is_named(fast_storage, monkeypatch):
    from matting_core import storage

    url = f"http://127.0.0.1:{free_port()}"  # closed: connections are refused at once
    monkeypatch.setenv("AWS_ENDPOINT_URL", url)
    with pytest.raises(storage.StorageError) as info:
        storage.read_bytes("s3://test/a.png")
    assert str(info.value).startswith(f"s3://test/a.png: cannot connect to {url}"), str(info.value)


def test_training_storage_takes_the_same_limits(monkeypatch):
    """Ray Train's checkpoint filesystem (pyarrow) gives up as every other storage call does (default pyarrow: ~11 s)."""
    from pipelines.train import storage_target

    for name, value in {**FAST, "MATTING_STORAGE_RETRIES": "0"}.items():
        monkeypatch.setenv(name, value)
    for name, value in {"AWS_ACCESS_KEY_ID": "dummy", "AWS_SECRET_ACCESS_KEY": "dummy",
                        "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    with silent_endpoint() as url:
        monkeypatch.setenv("AWS_ENDPOINT_URL", url)
        path, filesystem = storage_target("s3://bucket/runs")
        t0 = time.time()
        with pytest.raises(OSError, match="bucket"):
            filesystem.get_file_info(path)
        assert time.time() - t0 < 4
