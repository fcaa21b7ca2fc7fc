"""Typed job configs: defaults, YAML, CLI overrides, and clear errors for bad keys."""
from pathlib import Path

import pytest

from pipelines import config as cfglib
from pipelines.generate import GenerateConfig

REPO = Path(__file__).resolve().parents[1]


def test_job_spec_loads_into_the_typed_config():
    cfg = cfglib.load(GenerateConfig, REPO / "jobs" / "generate.yaml")
    assert cfg.clips == 20000 and cfg.fakemotion.size == (512, 288)
    assert cfg.photos == ("s3://matting-data/photos",)
    assert abs(cfg.fakemotion.motion.shift_probability - 1 / 3) < 1e-6


def test_overrides_beat_the_file_and_parse_types(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("clips: 5\nfakemotion: {frames: 4}\n")
    cfg = cfglib.load(GenerateConfig, f, {"fakemotion.size": "320x180", "clips": "7", "overwrite": True})
    assert cfg.clips == 7 and cfg.fakemotion.size == (320, 180) and cfg.fakemotion.frames == 4 and cfg.overwrite


def test_unknown_and_badly_typed_keys_are_named(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("clipz: 5\n")
    with pytest.raises(cfglib.ConfigError, match="clipz"):
        cfglib.load(GenerateConfig, f)
    with pytest.raises(cfglib.ConfigError, match="clips"):
        cfglib.load(GenerateConfig, None, {"clips": "many"})
    with pytest.raises(cfglib.ConfigError, match="fakemotion.motion.wobble"):
        cfglib.load(GenerateConfig, None, {"fakemotion.motion.wobble": 1})
