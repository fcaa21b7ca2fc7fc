"""Exports (TorchScript, ONNX through onnxruntime) match PyTorch; `matting export`; model references."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from matting_core.model import MattingNet, matting_net, save_checkpoint
from matting_core.model.export import export_onnx, export_torchscript, state_names
from pipelines import cli
from pipelines.model_ref import ModelRefError, find_checkpoint, load_model
from tests.test_model import lively


@pytest.fixture(scope="module")
def net() -> MattingNet:
    torch.manual_seed(0)
    net = lively(matting_net(backbone_weights="none"))
    net.set_output_curve(1.5, 0.45)  # what training fits: the exports must apply it too
    return net


def _frames(batch, height, width, count=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.rand(batch, 3, height, width, generator=gen), torch.rand(batch, 1, height, width, generator=gen))
            for _ in range(count)]


def _compare(net, run, batch, height, width, ratio):
    """Largest |export - PyTorch| over 3 consecutive frames, each side carrying its own state."""
    state = [torch.zeros(1, 1, 1, 1) for _ in range(10)]
    ref_state, worst = None, 0.0
    for src, prior in _frames(batch, height, width):
        with torch.no_grad():
            pha, fgr, ref_state = net(src, prior, ref_state, ratio)
        out = run(src, prior, state)
        assert out[0].shape == (batch, 1, height, width) and out[1].shape == (batch, 3, height, width)
        state = out[2:]
        worst = max(worst, max(float((a - b).abs().max()) for a, b in zip(out, [pha, fgr, *ref_state])))
    return worst


@pytest.mark.parametrize("ratio", [1.0, 0.5])
def test_torchscript_matches_pytorch_over_frames_with_state(net, tmp_path, ratio):
    path = tmp_path / "model.pt"
    export_torchscript(net, str(path), downsample_ratio=ratio)
    module = torch.jit.load(str(path))

    def run(src, prior, state):
        with torch.no_grad():
            return list(module(src, prior, *state))

    assert _compare(net, run, 1, 64, 96, ratio) < 1e-4
    assert _compare(net, run, 2, 72, 100, ratio) < 1e-4  # any size and batch
    extra = {"metadata.json": ""}
    torch.jit.load(str(path), _extra_files=extra)
    assert json.loads(json.loads(extra["metadata.json"])["matting_config"]) == net.config


@pytest.mark.parametrize("ratio", [1.0, 0.5])
def test_onnx_through_onnxruntime_matches_pytorch_at_other_sizes(net, tmp_path, ratio):
    import onnx
    import onnxruntime as ort

    path = tmp_path / "model.onnx"
    export_onnx(net, str(path), downsample_ratio=ratio, height=64, width=96)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["src", "prior", *state_names()]
    assert [o.name for o in session.get_outputs()] == ["pha", "fgr", *state_names("_out")]

    def run(src, prior, state):
        feed = {"src": src.numpy(), "prior": prior.numpy(), **{n: s.numpy() for n, s in zip(state_names(), state)}}
        return [torch.from_numpy(np.asarray(x)) for x in session.run(None, feed)]

    assert _compare(net, run, 1, 64, 96, ratio) < 1e-4
    assert _compare(net, run, 2, 80, 120, ratio) < 1e-4  # shapes are dynamic, not the tracing example's
    meta = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    assert json.loads(meta["matting_config"]) == net.config and float(meta["downsample_ratio"]) == ratio


def test_matting_export_command(net, tmp_path, capsys):
    ckpt = tmp_path / "model.pt"
    save_checkpoint(net, str(ckpt))
    out = tmp_path / "out" / "model.onnx"
    assert cli.main(["export", "--model", str(ckpt), "--format", "onnx", str(out)]) == 0
    assert "verified" in capsys.readouterr().err  # the command compared its export with PyTorch
    import onnxruntime as ort

    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()][:2] == ["pha", "fgr"]
    ts = tmp_path / "model.torchscript"
    assert cli.main(["export", "--model", str(tmp_path), "--format", "torchscript", "--no-verify", str(ts)]) == 0
    module = torch.jit.load(str(ts))
    with torch.no_grad():
        pha, fgr, *state = module(torch.rand(1, 3, 32, 48), torch.rand(1, 1, 32, 48),
                                  *[torch.zeros(1, 1, 1, 1)] * 10)
    assert pha.shape == (1, 1, 32, 48) and len(state) == 10

    assert cli.main(["export", "--model", str(tmp_path / "missing.pt"), "--format", "onnx",
                     str(tmp_path / "x.onnx")]) == 1
    assert "missing.pt" in capsys.readouterr().err and not (tmp_path / "x.onnx").exists()
    assert cli.main(["export", "--model", str(ckpt), "--format", "onnx"]) == 2  # no OUT
    assert cli.main(["export", "--model", str(ckpt), "--format", "onnx", "--downsample-ratio", "2",
                     str(tmp_path / "y.onnx")]) == 2


def test_load_model_from_a_path_or_a_folder(net, tmp_path):
    ckpt = tmp_path / "run" / "model.pt"
    save_checkpoint(net, str(ckpt))
    for ref in (str(ckpt), str(ckpt.parent)):
        loaded = load_model(ref, device="cpu")
        assert loaded.config == net.config and not loaded.training
        assert torch.equal(loaded.output_conv.weight, net.output_conv.weight)
    save_checkpoint(net, str(tmp_path / "run" / "other.pt"))
    assert find_checkpoint(ckpt.parent) == ckpt  # model.pt wins among several
    (tmp_path / "run" / "model.pt").unlink()
    (tmp_path / "run" / "third.pt").write_bytes(b"")
    with pytest.raises(ModelRefError, match="several checkpoints"):
        load_model(str(ckpt.parent))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelRefError, match="no checkpoint"):
        load_model(str(empty))


def test_load_model_from_the_mlflow_registry(net, tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.chdir(tmp_path)  # the default store is ./mlflow.db
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = "sqlite:///mlflow.db"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    exp = client.create_experiment("matting", artifact_location=(tmp_path / "artifacts").as_uri())
    run = client.create_run(exp)
    ckpt = tmp_path / "model.pt"
    save_checkpoint(net, str(ckpt))
    client.log_artifact(run.info.run_id, str(ckpt), artifact_path="checkpoint")
    client.set_terminated(run.info.run_id)
    client.create_registered_model("matting")
    source = f"{run.info.artifact_uri}/checkpoint"
    version = client.create_model_version("matting", source, run_id=run.info.run_id)
    client.set_registered_model_alias("matting", "candidate", version.version)

    for ref in ("models:/matting@candidate", f"models:/matting/{version.version}"):
        loaded = load_model(ref)
        assert loaded.config == net.config and torch.equal(loaded.output_conv.weight, net.output_conv.weight)
    with pytest.raises(ModelRefError, match="models:/absent@candidate.*sqlite:///mlflow.db"):
        load_model("models:/absent@candidate")
