"""`matting train` on a real Ray runtime (2 workers on 2 CPUs), a real MLflow store and real clips.

The clip dataset is made by `matting generate` from the real portraits in ../shared/data.
"""
from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from pipelines.cli import main as cli
from tests.conftest import REPO, shared_path

pytestmark = [pytest.mark.ray, pytest.mark.slow]

PHOTOS = ("p_015cd10e", "p_07141906", "p_0865636e", "p_09ba26b4", "p_22fc0130")
# Small and short, so that the whole file stays within a few minutes on 2 cores.
RECIPE = {"augment": {"size": [96, 64]}, "batch_size": 2, "frames": 3, "tbptt": 3,
          "optim": {"lr": 3e-3, "warmup_steps": 2}, "val_every": 10, "checkpoint_every": 10, "log_every": 5}
STEPS = 30


@pytest.fixture(scope="module")
def clips(tmp_path_factory, ray_runtime) -> str:
    """24 four-frame 128x80 clips of 5 real people over a real background video."""
    data = shared_path("data")
    root = tmp_path_factory.mktemp("train-sources")
    for sub in ("image", "alpha"):
        (root / "photos" / sub).mkdir(parents=True)
    for stem in PHOTOS:
        os.symlink(data / "photos/p3m/image" / f"{stem}.jpg", root / "photos/image" / f"{stem}.jpg")
        os.symlink(data / "photos/p3m/alpha" / f"{stem}.png", root / "photos/alpha" / f"{stem}.png")
    out = str(root / "clips")
    rc = cli(["generate", "--photos", str(root / "photos"), "--backgrounds",
              str(data / "videos/backgrounds/bikes.mp4"), "--out", out, "--clips", "24", "--frames", "4",
              "--size", "128x80", "--no-progress"])
    assert rc == 0
    return out


def _config(clips: str, tmp: Path, **kw):
    from pipelines.train import TrainConfig

    base = TrainConfig(data=clips, recipe=RECIPE, steps=STEPS, workers=2, cpus_per_worker=1.0,
                       storage=str(tmp / "runs"), tracking_uri=f"sqlite:///{tmp / 'mlflow.db'}",
                       experiment="test", register_as="test-matting")
    return dataclasses.replace(base, **kw)


def _untrained_val_mad(cfg) -> float:
    """Validation MAD of the untrained model (it returns the smoothed prior) on the run's own split."""
    from matting_core.data.clip_index import ClipIndex
    from matting_core.training.engine import build_model, build_prior_stream, evaluate, split_by_photo
    from pipelines.train import resolve_recipe, validation_batches

    recipe = resolve_recipe(cfg.preset, cfg.recipe, cfg.steps, cfg.backbone_weights)
    index = ClipIndex(cfg.data)
    _, val_ids = split_by_photo([(i, index.photo_key(i)) for i in index.ids], recipe.val_share, recipe.seed)
    batches = validation_batches(index, val_ids[:recipe.val_clips], recipe, build_prior_stream(recipe))
    return evaluate(build_model(recipe), batches, recipe, torch.device("cpu"))["mad"]


def test_two_workers_train_track_register_and_the_registry_reproduces_the_run(clips, tmp_path, capsys, monkeypatch):
    from mlflow.tracking import MlflowClient

    from pipelines.train import run_train

    # the dataset named relative to where the command runs: Ray workers run elsewhere
    monkeypatch.chdir(Path(clips).parent)
    cfg = _config(os.path.basename(clips), tmp_path)
    summary = run_train(cfg)
    assert summary.steps == STEPS and summary.registered == "models:/test-matting/1"

    uri = cfg.tracking_uri
    client = MlflowClient(uri, registry_uri=uri)
    run = client.get_run(summary.run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == summary.run_name
    assert run.data.params["recipe.batch_size"] == "2" and run.data.params["recipe.steps"] == str(STEPS)
    assert {"train/loss", "train/lr", "val/mad", "val/mse", "val/grad", "val/dtssd", "val/loss"} <= set(run.data.metrics)
    # Validation ran on the held-out photos' clips exactly as the untrained model (the prior) is
    # scored there, and training lowered it.
    untrained = _untrained_val_mad(cfg)
    assert run.data.metrics["val/mad"] == pytest.approx(summary.metrics["val/mad"])
    assert run.data.metrics["val/mad"] < untrained
    steps_logged = [m.step for m in client.get_metric_history(summary.run_id, "train/loss")]
    assert steps_logged == list(range(RECIPE["log_every"], STEPS + 1, RECIPE["log_every"]))
    assert [d.dataset.name for d in run.inputs.dataset_inputs] == ["clips"]
    artifacts = {a.path for a in client.list_artifacts(summary.run_id)}
    assert {"model", "dataset", "loss_curve.png", "probe"} <= artifacts
    assert any(a.path.startswith("previews/") for a in client.list_artifacts(summary.run_id, "previews"))
    assert str(client.get_model_version_by_alias("test-matting", "candidate").version) == "1"

    # A fresh process resolving the registry reproduces what the run recorded at its end.
    probe = Path(client.download_artifacts(summary.run_id, "probe/probe.npz", str(tmp_path)))
    code = ("import json, sys, numpy as np\n"
            "from pipelines.model_ref import load_model\n"
            "from pipelines.train import probe_outputs\n"
            "net = load_model('models:/test-matting@candidate')\n"
            "np.savez(sys.argv[1], curve=np.array(net.config['output_curve']),\n"
            "         radius=np.array(net.config['refine_radius']), **probe_outputs(net))\n")
    out = tmp_path / "fresh.npz"
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri}
    subprocess.run([sys.executable, "-c", code, str(out)], cwd=REPO, env=env, check=True, capture_output=True)
    recorded, fresh = np.load(probe), np.load(out)
    for key in recorded.files:
        np.testing.assert_allclose(fresh[key], recorded[key], atol=1e-6)
    # with the refiner radius and output curve fitted on the validation clips after the last step
    assert list(fresh["curve"]) == [run.data.metrics["val/curve_gain"], run.data.metrics["val/curve_centre"]]
    assert int(fresh["radius"]) == run.data.metrics["val/refine_radius"]

    # The same command again: the finished run reports itself and exits 0.
    capsys.readouterr()
    again = run_train(cfg)
    assert again.run_id == summary.run_id
    assert "finished earlier" in capsys.readouterr().err


def test_a_killed_worker_costs_one_restart_from_the_last_checkpoint(clips, tmp_path):
    import psutil

    from pipelines.train import run_train

    cfg = _config(clips, tmp_path, run_name="killed", steps=18)
    run_dir = tmp_path / "runs" / "killed"
    killed: list[int] = []

    def kill_one_worker_after_the_first_checkpoint():
        deadline = time.time() + 300
        while time.time() < deadline and not killed:
            if run_dir.exists() and any(p.name.startswith("checkpoint_") for p in run_dir.iterdir()):
                for proc in psutil.process_iter(["cmdline"]):
                    if any("RayTrainWorker" in part for part in (proc.info["cmdline"] or [])):
                        proc.send_signal(signal.SIGKILL)
                        killed.append(proc.pid)
                        return
            time.sleep(0.2)

    killer = threading.Thread(target=kill_one_worker_after_the_first_checkpoint, daemon=True)
    killer.start()
    summary = run_train(cfg)
    killer.join(timeout=1)
    assert killed, "no training worker was found to kill"
    assert summary.steps == 18 and summary.registered


def _run_cli_subprocess(args: list[str], tmp: Path) -> subprocess.Popen:
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    return subprocess.Popen([sys.executable, "-m", "pipelines.cli", *args], cwd=tmp, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_stop_and_rerun_continues_the_same_schedule_and_mlflow_run(clips, tmp_path):
    """A run interrupted after its first checkpoint resumes from that step, in the same MLflow run."""
    from mlflow.tracking import MlflowClient

    from matting_core.training.engine import build_model, build_optimizer
    from pipelines.train import resolve_recipe

    recipe_file = tmp_path / "train.yaml"
    recipe_file.write_text(json.dumps({"recipe": RECIPE}))
    args = ["train", "--data", clips, "--steps", str(STEPS), "--workers", "1", "--cpus-per-worker", "1",
            "--storage", str(tmp_path / "runs"), "--run-name", "stopped", "--experiment", "test",
            "--register-as", "test-resume", "--config", str(recipe_file)]
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    first = _run_cli_subprocess([*args, "--tracking-uri", uri], tmp_path)
    run_dir = tmp_path / "runs" / "stopped"
    deadline = time.time() + 300
    while time.time() < deadline and first.poll() is None:
        if run_dir.exists() and any(p.name.startswith("checkpoint_") for p in run_dir.iterdir()):
            break
        time.sleep(0.2)
    assert first.poll() is None, first.stdout.read()
    first.send_signal(signal.SIGINT)  # STACK.md: stop drivers with SIGINT
    first.wait(timeout=120)
    run_id = json.loads((run_dir / "mlflow_run.json").read_text())["run_id"]
    client = MlflowClient(uri, registry_uri=uri)
    assert client.get_run(run_id).info.status != "FINISHED"

    second = _run_cli_subprocess([*args, "--tracking-uri", uri], tmp_path)
    output, _ = second.communicate(timeout=600)
    assert second.returncode == 0, output
    assert "resumed" in output and run_id in output
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert client.get_model_version_by_alias("test-resume", "candidate").run_id == run_id
    # The learning rate at every logged step is the one an uninterrupted schedule gives.
    recipe = resolve_recipe("cpu-small", RECIPE, STEPS, None)
    history = client.get_metric_history(run_id, "train/lr")
    assert max(m.step for m in history) == STEPS
    lr_at = {}
    optimizer, scheduler = build_optimizer(build_model(recipe), recipe)
    for step in range(1, STEPS + 1):
        lr_at[step] = max(g["lr"] for g in optimizer.param_groups)  # what train_step logs
        optimizer.step()
        scheduler.step()
    for m in history:
        assert m.value == pytest.approx(lr_at[m.step], rel=1e-6), m.step


@pytest.mark.parametrize("case", ["empty", "small-clips", "tracking", "preset", "key"])
def test_bad_inputs_are_refused_before_any_worker_starts(clips, tmp_path, case, capsys):
    base = tmp_path / "small.yaml"
    base.write_text(json.dumps({"recipe": RECIPE}))
    args = ["train", "--data", clips, "--storage", str(tmp_path / "runs"), "--config", str(base),
            "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"]
    if case == "empty":
        (tmp_path / "empty").mkdir()
        args[2] = str(tmp_path / "empty")
        expect, message = 1, "not a clip dataset"
    elif case == "small-clips":
        base.write_text(json.dumps({"recipe": {**RECIPE, "augment": {"size": [512, 288]}}}))
        expect, message = 2, "smaller than the training crop 512x288"
    elif case == "tracking":
        args[-1] = "http://user:secret@127.0.0.1:9"
        expect, message = 2, "tracking server http://***@127.0.0.1:9 is unreachable"
    elif case == "preset":
        args += ["--preset", "huge"]
        expect, message = 2, "unknown preset 'huge'"
    else:
        base.write_text(json.dumps({"recipe": {**RECIPE, "optim": {"bogus": 1}}}))
        expect, message = 2, "optim.bogus"
    started = time.perf_counter()
    assert cli(args) == expect
    err = capsys.readouterr().err
    assert message in err and "secret" not in err
    assert time.perf_counter() - started < 30
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_promote_moves_champion_and_matte_uses_the_promoted_version(clips, tmp_path, capsys, monkeypatch):
    from mlflow.tracking import MlflowClient

    from matting_core.model import matting_net, save_checkpoint
    from pipelines.train import run_train

    cfg = _config(clips, tmp_path, steps=6, register_as="promoted")
    first = run_train(cfg)
    uri = cfg.tracking_uri
    client = MlflowClient(uri, registry_uri=uri)
    # A second version: another run's checkpoint, with a different prior recorded.
    run = client.create_run(client.get_experiment_by_name("test").experiment_id)
    other = tmp_path / "other" / "model.pt"
    save_checkpoint(matting_net(prior={"backend": "none", "value": 0.25}), str(other))
    client.log_artifact(run.info.run_id, str(other), "model")
    client.create_model_version("promoted", f"{run.info.artifact_uri}/model", run_id=run.info.run_id)

    capsys.readouterr()
    assert cli(["promote", "promoted", "2", "--alias", "champion", "--tracking-uri", uri]) == 0
    assert "promoted@champion -> version 2 (new alias)" in capsys.readouterr().out
    assert cli(["promote", "promoted", "1", "--alias", "champion", "--tracking-uri", uri]) == 0
    assert "-> version 1 (was version 2)" in capsys.readouterr().out
    assert cli(["promote", "promoted", "9", "--alias", "champion", "--tracking-uri", uri]) == 1
    assert first.registered == "models:/promoted/1"

    video = shared_path("data", "videos", "people", "carphone.mp4")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    for version, backend in (("2", "none"), ("1", "selfie")):
        assert cli(["promote", "promoted", version, "--alias", "champion"]) == 0
        out = tmp_path / f"mattes-{version}"
        assert cli(["matte", str(video), "-o", str(out), "--model", "models:/promoted@champion",
                    "--formats", "pha", "--no-progress"]) == 0
        result = json.loads((out / "carphone" / "result.json").read_text())
        assert result["prior"]["prior"]["backend"] == backend


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """A real `mlflow server` (sqlite backend, served artifacts) on a free loopback port."""
    import socket
    import urllib.request

    root = tmp_path_factory.mktemp("mlflow-server")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    proc = subprocess.Popen([str(Path(sys.executable).parent / "mlflow"), "server", "--workers", "1",
                             "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
                             "--artifacts-destination", str(root / "artifacts"),
                             "--host", "127.0.0.1", "--port", str(port)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    uri = f"http://127.0.0.1:{port}"
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(uri + "/health", timeout=2):
                break
        except OSError:
            time.sleep(0.5)
    else:
        proc.kill()
        pytest.fail("mlflow server did not become healthy in 60 s")
    yield uri
    proc.terminate()
    proc.wait(timeout=30)


def test_training_against_a_tracking_server_with_data_and_checkpoints_on_s3(clips, tmp_path, mlflow_server,
                                                                             s3_server, monkeypatch):
    import s3fs
    from mlflow.tracking import MlflowClient

    from pipelines.model_ref import load_model
    from pipelines.train import run_train

    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_server.endpoint})
    fs.put(clips.rstrip("/") + "/", "test/train-clips/", recursive=True)
    cfg = _config("s3://test/train-clips", tmp_path, storage="s3://test/runs", tracking_uri=mlflow_server,
                  steps=6, register_as="served", run_name="served")
    summary = run_train(cfg)
    assert summary.registered == "models:/served/1"
    assert fs.exists("test/runs/served/summary.json")
    assert any(p.rsplit("/", 1)[-1].startswith("checkpoint_") for p in fs.ls("test/runs/served"))
    client = MlflowClient(mlflow_server, registry_uri=mlflow_server)
    assert str(client.get_model_version_by_alias("served", "candidate").version) == "1"
    assert "val/mad" in client.get_run(summary.run_id).data.metrics
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    net = load_model("models:/served@candidate")
    assert net.config["prior"]["prior"]["backend"] == "selfie"


def test_clip_index_reads_any_clip_by_id_as_iter_clips_does(clips):
    from matting_core.data.clip_index import ClipIndex
    from matting_core.data.clips import iter_clips

    index = ClipIndex(clips)
    records = list(iter_clips(clips, columns=["alpha", "flow"]))
    assert index.ids == [r.clip_id for r in records] and index.sizes() == {(128, 80)}
    for record in records[::-7]:  # out of order, across shards
        got = index.read(record.clip_id, ["alpha", "flow"])
        assert got.frames is None and got.photo == record.photo
        np.testing.assert_array_equal(got.alpha, record.alpha)
        np.testing.assert_array_equal(got.flow, record.flow)
    assert index.photo_key(records[0].clip_id) in PHOTOS


def test_ray_workers_neither_repeat_the_cleaners_warning_log_each_report_nor_print_twice(ray_runtime):
    """Every worker runs the setup hook: Ray Train's placement-group cleaner, which cannot reach the
    dashboard's state API on a local runtime, does not warn once a second, reports are not logged
    one long line each, and prints are not teed."""
    import logging

    from pipelines.ray_runtime import _NOISY_LOGGERS

    @ray_runtime.remote(num_cpus=0)
    def worker_view():
        from ray.train.v2._internal.execution import context  # Ray Train's own logger, as it names it

        root, level = logging.getLogger(), logging.getLogger().level
        root.setLevel(logging.INFO)  # as Ray Train sets up its workers' logging
        try:
            return ([logging.getLogger(name).isEnabledFor(logging.WARNING) for name in _NOISY_LOGGERS],
                    context.logger.isEnabledFor(logging.INFO), os.environ.get("RAY_TRAIN_ENABLE_PRINT_PATCH"))
        finally:
            root.setLevel(level)

    warns, reports, patch = ray_runtime.get(worker_view.remote())
    assert warns == [False] * len(_NOISY_LOGGERS) and not reports and patch == "0"


def test_the_runs_dataset_input_is_logged_without_mlflows_ambiguity_warning(clips, tmp_path):
    """MLflow warns that a local dataset path matches two (identical) sources; the run says nothing."""
    import warnings

    from mlflow.tracking import MlflowClient

    from pipelines.train import TrainJob, _mlflow_run

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    job = TrainJob(data=clips, val_data=None, workers=1, cpus_per_worker=1.0, gpus_per_worker=0.0,
                   storage=str(tmp_path / "runs"), run_name="quiet", experiment="quiet", register_as="quiet",
                   tracking_uri=uri, max_failures=0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run_id, resumed = _mlflow_run(job, str(tmp_path / "runs" / "quiet"), {"steps": 1}, clips)
    assert not resumed
    assert [str(w.message) for w in caught if "interpreted in multiple ways" in str(w.message)] == []
    inputs = MlflowClient(uri).get_run(run_id).inputs.dataset_inputs
    assert [(i.dataset.name, i.dataset.source_type) for i in inputs] == [("clips", "local")]


def test_the_logged_training_curve_is_the_mean_of_the_steps_since_the_last_log():
    from pipelines.train import StepMeans

    means = StepMeans()
    for step, total in enumerate((1.0, 0.2, 0.3), 1):
        means.add({"total": total, "l1": total / 2, "lr": 1e-3 * step, "frames_per_s": 10.0 + step,
                   "skipped_clips": step // 3})
    assert means.take() == pytest.approx({"total": 0.5, "l1": 0.25, "lr": 3e-3, "frames_per_s": 13.0,
                                          "skipped_clips": 1})
    means.add({"total": 0.5, "lr": 4e-3})
    assert means.take() == {"total": 0.5, "lr": 4e-3}  # a new window


def test_the_workers_setup_hook_imports_nothing_of_ray_train():
    """Every Ray worker (generate's, infer's) runs the hook at start: importing ray.train there costs seconds."""
    code = ("import sys, ray\n"
            "from pipelines.ray_runtime import quiet_worker_logs\n"
            "quiet_worker_logs()\n"
            "print(sorted(m for m in sys.modules if m.startswith('ray.train')))\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, capture_output=True, text=True).stdout
    assert out.strip() == "[]"
