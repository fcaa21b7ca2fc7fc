"""Credentials inside URIs never reach a report, a message, result.json or MLflow params."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np

from matting_core.redaction import redact, redact_config
from pipelines.cli import main

REPO = Path(__file__).resolve().parents[1]
SECRET = "hunter2-s3cr3t"


def test_redact_masks_user_info_and_credential_query_values():
    assert redact(f"http://user:{SECRET}@host:5000/api") == "http://***@host:5000/api"
    assert redact(f"server https://{SECRET}@mlflow.example.com is down") == \
        "server https://***@mlflow.example.com is down"
    assert redact(f"postgresql://u:{SECRET}@db/x and s3://bucket/a@b") == "postgresql://***@db/x and s3://bucket/a@b"
    assert redact(f"http://h/v.mp4?a=1&token={SECRET}&X-Amz-Signature=ab12") == \
        "http://h/v.mp4?a=1&token=***&X-Amz-Signature=***"
    for plain in ("s3://bucket/photos", "/data/x@2x.png", "file:///tmp/a@b/c", "sqlite:///mlflow.db"):
        assert redact(plain) == plain
    given = {"uri": [f"http://u:{SECRET}@h"], "n": 3}
    assert redact_config(given) == {"uri": ["http://***@h"], "n": 3}
    assert given["uri"] == [f"http://u:{SECRET}@h"], "the caller's structure is not changed"


def _tiny_benchmark(root: Path) -> Path:
    rng = np.random.default_rng(0)
    for sub in ("com", "pha"):
        (root / "clip" / sub).mkdir(parents=True)
    for i in range(3):
        alpha = (rng.random((24, 32)) > 0.5).astype(np.uint8) * 255
        cv2.imwrite(str(root / "clip" / "pha" / f"{i:04d}.png"), alpha)
        cv2.imwrite(str(root / "clip" / "com" / f"{i:04d}.png"), np.dstack([alpha] * 3))
    return root


def test_evaluate_report_does_not_hold_the_tracking_password(tmp_path, capsys):
    truth = _tiny_benchmark(tmp_path / "truth")
    out = tmp_path / "report.json"
    status = main(["evaluate", "--true", str(truth), "--pred", f"exact={truth}", "--baselines", "none",
                   "--metrics", "mad", "--tracking-uri", f"http://user:{SECRET}@127.0.0.1:9", "--out", str(out)])
    assert status == 0
    report = json.loads(out.read_text())
    assert report["config"]["tracking_uri"] == "http://***@127.0.0.1:9"
    for path in tmp_path.iterdir():
        if path.is_file():
            assert SECRET not in path.read_text(errors="replace"), path
    assert SECRET not in "".join(capsys.readouterr())


def test_matte_error_does_not_print_the_tracking_password(tmp_path):
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"http://user:{SECRET}@127.0.0.1:9",
           "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "5"}
    frames = tmp_path / "frames"
    frames.mkdir()
    for i in range(2):
        cv2.imwrite(str(frames / f"{i:04d}.png"), np.zeros((36, 64, 3), np.uint8))
    proc = subprocess.run([sys.executable, "-m", "pipelines.cli", "matte", str(frames), "-o", str(tmp_path / "out"),
                           "--model", "models:/matting@champion"], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 1, proc.stderr
    assert "models:/matting@champion" in proc.stderr and "http://***@127.0.0.1:9" in proc.stderr, proc.stderr
    assert SECRET not in proc.stdout + proc.stderr


def test_cli_messages_pass_through_redaction(tmp_path, capsys):
    # a URI the job names in its own error message: the message reaches the terminal redacted
    assert main(["evaluate", "--true", f"http://user:{SECRET}@127.0.0.1:9/bench", "--pred",
                 str(tmp_path), "--out", str(tmp_path / "r.json")]) in (1, 2)
    captured = capsys.readouterr()
    assert "http://***@127.0.0.1:9" in captured.err, captured.err
    assert SECRET not in captured.out + captured.err
