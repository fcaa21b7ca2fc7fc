"""Every numeric option is range-checked before any work: exit 2, naming the flag (or YAML key)."""
from __future__ import annotations

import pytest

from pipelines.cli import main

GEN = ["generate", "--photos", "p", "--backgrounds", "b"]
BENCH = ["make-benchmark", "--photos", "p", "--backgrounds", "b"]
MATTE = ["matte", "video.mp4", "--model", "m.pt"]

CASES = [
    (GEN + ["--clips", "0"], "--clips"),
    (GEN + ["--size", "64"], "--size"),
    (GEN + ["--size", "8x8"], "--size"),
    (GEN + ["--frames", "1"], "--frames"),
    (GEN + ["--shard-size", "0"], "--shard-size"),
    (GEN + ["--seed", "-1"], "--seed"),
    (GEN + ["--jpeg-quality", "500"], "--jpeg-quality"),
    (GEN + ["--workers", "-1"], "--workers"),
    (GEN + ["--cache-mb", "0"], "--cache-mb"),
    (BENCH + ["--clips", "0"], "--clips"),
    (BENCH + ["--frames", "1"], "--frames"),
    (BENCH + ["--seed", "-2"], "--seed"),
    (BENCH + ["--still-share", "1.5"], "--still-share"),
    (MATTE + ["--fps", "0"], "--fps"),
    (MATTE + ["--downsample-ratio", "1.5"], "--downsample-ratio"),
    (MATTE + ["--max-side", "4"], "--max-side"),
    (MATTE + ["--threads", "-1"], "--threads"),
    (MATTE + ["--frames-per-call", "0"], "--frames-per-call"),
    (MATTE + ["--frames-per-call", "65"], "--frames-per-call"),
    (["train", "--data", "d", "--workers", "0"], "--workers"),
    (["train", "--data", "d", "--steps", "0"], "--steps"),
    (["train", "--data", "d", "--cpus-per-worker", "0"], "--cpus-per-worker"),
    (["evaluate", "--true", "t", "--pred", "p", "--threshold", "1.0"], "--threshold"),
    (["evaluate", "--true", "t", "--pred", "p", "--max-clips", "-1"], "--max-clips"),
    (["export", "out.onnx", "--model", "m.pt", "--format", "onnx", "--opset", "3"], "--opset"),
    (["demo", "--clips", "0"], "--clips"),
    (["demo", "--benchmark-frames", "1"], "--benchmark-frames"),
]


@pytest.mark.parametrize("argv,flag", CASES, ids=[" ".join(c[0][:1] + c[0][-2:]) for c in CASES])
def test_bad_number_is_a_usage_error_naming_the_flag(argv, flag, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = ["--out", str(tmp_path / "out")] if argv[0] in ("generate", "make-benchmark", "demo") else \
          (["-o", str(tmp_path / "out")] if argv[0] == "matte" else [])
    assert main(argv + out) == 2
    err = capsys.readouterr().err
    assert f"error: {flag}:" in err, err
    assert list(tmp_path.iterdir()) == [], "nothing may be written before the check"


def test_bad_number_in_a_config_file_names_the_dotted_key(tmp_path, capsys):
    spec = tmp_path / "gen.yaml"
    spec.write_text("clips: -3\nfakemotion:\n  frames: 1\n")
    assert main(["generate", "--config", str(spec), "--photos", "p", "--backgrounds", "b",
                 "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "clips: input should be greater than 0, got -3" in err
    assert "fakemotion.frames: must be >= 2, got 1" in err
    assert not (tmp_path / "out").exists()


def test_library_configs_check_themselves():
    from matting_core.data.benchmark import BenchmarkConfig
    from matting_core.data.fakemotion import FakeMotionConfig
    from matting_core.training.config import RecipeConfig

    with pytest.raises(ValueError, match="^size: both sides must be at least 32"):
        FakeMotionConfig(size=(16, 300))
    with pytest.raises(ValueError, match="^still_share: must be >= 0.0 and < 1.0"):
        BenchmarkConfig(still_share=1.0)
    with pytest.raises(ValueError, match="^tbptt: must be >= 1"):
        RecipeConfig(tbptt=0)
