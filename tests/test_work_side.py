"""The network runs at the scale it was trained at: `work_side` recorded by training, used by `Matter`."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from matting_core.inference.matter import Matter
from matting_core.model import matting_net
from matting_core.model.checkpoint import load_checkpoint, save_checkpoint
from matting_core.prior import ConstantPrior, PriorStream
from matting_core.training.config import PRESETS
from matting_core.training.engine import build_model
from tests.nets import lively


def _frame(h: int = 288, w: int = 512) -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)


def _matter(net, **kw) -> Matter:
    return Matter(net, PriorStream(ConstantPrior(0.4)), device="cpu", **kw)


def test_training_records_the_frames_longer_side():
    for name, recipe in PRESETS.items():
        recipe = dataclasses.replace(recipe, backbone_weights="none")  # no ImageNet weights offline
        assert build_model(recipe).config["work_side"] == max(recipe.augment.size), name


def test_matter_runs_a_trained_net_at_its_training_scale():
    torch.manual_seed(0)
    trained = lively(matting_net(work_side=256))
    frame = _frame()
    m = _matter(trained)
    m.step(frame)
    assert m.spec["max_side"] == 256 and m.spec["downsample_ratio"] == 0.5
    # Without a recorded side the default stays what it was; an explicit max_side wins.
    legacy = _matter(lively(matting_net()))
    legacy.step(frame)
    assert legacy.spec["max_side"] == 512 and legacy.spec["downsample_ratio"] == 1.0
    full = _matter(trained, max_side=512)
    full.step(frame)
    assert full.spec["downsample_ratio"] == 1.0
    # The net really ran at half size: its output equals the explicit half-size run, not the full-size one.
    half = _matter(trained, downsample_ratio=0.5)
    assert np.array_equal(_matter(trained).step(frame).pha, half.step(frame).pha)
    assert not np.allclose(_matter(trained).step(frame).pha, full.step(frame).pha, atol=1e-3)


def test_work_side_survives_checkpoints_and_old_ones_load(tmp_path):
    path = str(tmp_path / "m.pt")
    save_checkpoint(matting_net(work_side=256), path)
    assert load_checkpoint(path).config["work_side"] == 256
    # A checkpoint written before the key existed loads with None (inference keeps its old default).
    net = matting_net()
    del net.config["work_side"]
    save_checkpoint(net, path)
    assert load_checkpoint(path).config["work_side"] is None
    with pytest.raises(ValueError, match="work_side"):
        matting_net(work_side=8)
