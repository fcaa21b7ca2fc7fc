"""ACCEPTANCE (slow, about 2-3 minutes on 2 cores): the local multi-node cluster runs the whole chain.

`make cluster-up` (a Ray head and a worker node, SeaweedFS S3, an MLflow server on S3), then
`matting submit` generate -> train (registers `candidate`) -> `matting promote` to champion ->
`matting submit` infer with models:/NAME@champion into S3; then `make cluster-down` and no process
the cluster started is left. Real sources from ../shared/data (skips without them).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from infra.local.cluster import _exists, cluster_pids, read_cluster, read_env
from tests.conftest import REPO, shared_path

pytestmark = [pytest.mark.slow, pytest.mark.ray, pytest.mark.s3]

MATTING = str(Path(sys.executable).parent / "matting")
PHOTOS = ("p_015cd10e", "p_07141906", "p_0865636e", "p_09ba26b4", "p_22fc0130")
MODEL = "cluster-matting"
# Small: 12 four-frame clips, 6 steps of 2 workers at 96x64, one 120-frame video in two segments.
TRAIN_SETS = ["data=s3://matting/clips", "val_data=null", "preset=cpu-small", "workers=2", "cpus_per_worker=1",
              "gpus_per_worker=0", "storage=s3://matting/runs", f"register_as={MODEL}", "experiment=cluster",
              "max_failures=0", "backbone_weights=none",
              "recipe={steps: 6, val_every: 3, checkpoint_every: 3, log_every: 3, batch_size: 2, frames: 3, "
              "tbptt: 3, augment: {size: [96, 64]}}"]


def _run(argv: list[str], env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def _submit(spec: str, sets: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    argv = [MATTING, "submit", f"jobs/{spec}.yaml"]
    for s in sets:
        argv += ["--set", s]
    return _run(argv, env)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, selfie_model_cache):
    """`make cluster-up` into a temporary state folder; yields (ClusterInfo, its env); `make cluster-down` after."""
    state = tmp_path_factory.mktemp("cluster") / "state"
    # The test session's own S3/Ray variables must not leak into the cluster (it makes its own keys).
    base = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "RAY_", "MLFLOW_"))}
    base |= {"MATTING_MODEL_CACHE": str(selfie_model_cache)}
    make = ["make", "-s", "cluster-up", f"CLUSTER_DIR={state}", "SETUP=", f"BIN={Path(sys.executable).parent}"]
    up = _run(make, base, timeout=180)
    assert up.returncode == 0, up.stdout + up.stderr
    info = read_cluster(state / "cluster.json")
    env = base | read_env(info.env_file)
    assert f"export RAY_ADDRESS={info.ray_address}" in up.stdout and "AWS_SECRET_ACCESS_KEY=..." in up.stdout
    assert env["AWS_SECRET_ACCESS_KEY"] not in up.stdout  # the key is in env.sh (0600), not on the screen
    assert os.stat(info.env_file).st_mode & 0o077 == 0
    yield info, env
    _run(["make", "-s", "cluster-down", f"CLUSTER_DIR={state}", f"BIN={Path(sys.executable).parent}"], base)


def test_generate_train_promote_infer_on_the_local_multi_node_cluster(cluster, tmp_path):
    import boto3
    from mlflow.tracking import MlflowClient

    info, env = cluster
    # two nodes alive, each with the resources it declared
    probe = _run([sys.executable, "-c", "import json, ray; ray.init(logging_level='ERROR'); "
                  "print(json.dumps([[n['Alive'], n['Resources']] for n in ray.nodes()]))"], env, timeout=120)
    nodes = json.loads(probe.stdout.strip().splitlines()[-1])
    assert sorted(("head" in r) for alive, r in nodes if alive) == [False, True], nodes
    assert sum(1 for alive, r in nodes if alive and "worker" in r) == 1
    with urllib.request.urlopen(f"{info.mlflow}/health", timeout=5) as r:
        assert r.status == 200

    data = shared_path("data")
    photos = tmp_path / "photos"
    for sub in ("image", "alpha"):
        (photos / sub).mkdir(parents=True)
    for stem in PHOTOS:
        os.symlink(data / "photos/p3m/image" / f"{stem}.jpg", photos / "image" / f"{stem}.jpg")
        os.symlink(data / "photos/p3m/alpha" / f"{stem}.png", photos / "alpha" / f"{stem}.png")
    s3 = boto3.client("s3", endpoint_url=info.s3_endpoint, aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
                      aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"], region_name="us-east-1")
    s3.upload_file(str(data / "videos/people/carphone.mp4"), "matting", "archive/carphone.mp4")  # 120 frames

    gen = _submit("generate", [f"photos=[{photos}]", f"backgrounds=[{data / 'videos/backgrounds/bikes.mp4'}]",
                               "out=s3://matting/clips", "clips=12", "workers=2", "fakemotion.frames=4",
                               "fakemotion.size=[128, 80]"], env)
    assert gen.returncode == 0, gen.stdout[-3000:] + gen.stderr[-3000:]
    assert "clips     12/12 written" in gen.stdout and "succeeded (exit status 0)" in gen.stderr

    train = _submit("train", TRAIN_SETS, env)
    assert train.returncode == 0, train.stdout[-3000:] + train.stderr[-3000:]
    registry = MlflowClient(info.mlflow, registry_uri=info.mlflow)
    version = registry.get_model_version_by_alias(MODEL, "candidate").version
    promote = _run([MATTING, "promote", MODEL, version, "--alias", "champion"], env)
    assert promote.returncode == 0, promote.stderr
    assert registry.get_model_version_by_alias(MODEL, "champion").version == version
    # the model's file went through MLflow's artifact proxy into the cluster's S3 bucket
    assert s3.list_objects_v2(Bucket="matting", Prefix="mlflow/")["KeyCount"] > 0

    infer = _submit("infer", [f"model=models:/{MODEL}@champion", "input=s3://matting/archive",
                              "out=s3://matting/mattes", "actors=2", "cpus_per_actor=1", "segment_frames=60",
                              "formats=[pha]"], env)
    assert infer.returncode == 0, infer.stdout[-3000:] + infer.stderr[-3000:]
    assert "videos    1 ok, 0 partial, 0 failed" in infer.stdout
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket="matting", Prefix="mattes/carphone/")["Contents"]]
    assert sum(k.startswith("mattes/carphone/pha/") and k.endswith(".png") for k in keys) == 120
    result = json.loads(s3.get_object(Bucket="matting", Key="mattes/carphone/result.json")["Body"].read())
    assert result["status"] == "ok" and MODEL in json.dumps(result)  # the registry model it was matted with
    for run in (gen, train, infer):  # secrets travel by name only
        assert env["AWS_SECRET_ACCESS_KEY"] not in run.stdout + run.stderr


def test_the_jobs_own_exit_status_comes_back_and_no_wait_prints_the_id(cluster):
    from ray.job_submission import JobSubmissionClient

    info, env = cluster
    usage = _submit("train", ["data=''"], env)  # valid keys, but no data: the entrypoint's usage error
    assert usage.returncode == 2, usage.stdout[-2000:] + usage.stderr[-2000:]
    assert "missing --data" in usage.stdout and "failed (exit status 2)" in usage.stderr
    failed = _submit("infer", ["model=models:/no-such-model@champion", "input=s3://matting/archive",
                               "out=s3://matting/nothing"], env)
    assert failed.returncode == 1 and "failed (exit status 1)" in failed.stderr, failed.stderr[-2000:]
    queued = _run([MATTING, "submit", "jobs/train.yaml", "--no-wait", "--set", "data=''"], env)
    assert queued.returncode == 0, queued.stderr
    job_id = queued.stdout.strip().splitlines()[-1]
    client = JobSubmissionClient(info.dashboard)
    assert client.get_job_info(job_id).entrypoint.startswith("matting train --config .matting-job-")


def test_ctrl_c_without_a_terminal_stops_the_job(cluster):
    import signal
    import time

    from ray.job_submission import JobSubmissionClient

    info, env = cluster
    data = shared_path("data")
    # long enough to be interrupted: 500 clips of the full-size portraits
    proc = subprocess.Popen([MATTING, "submit", "jobs/generate.yaml", "--set", "out=s3://matting/long",
                             "--set", f"photos=[{data / 'photos/p3m'}]", "--set", "clips=500",
                             "--set", f"backgrounds=[{data / 'videos/backgrounds/bikes.mp4'}]"],
                            cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    line, deadline = "", time.time() + 60
    while time.time() < deadline and "submitted to" not in line:
        line = proc.stderr.readline()
    job_id = line.split("job ", 1)[1].split()[0]
    client = JobSubmissionClient(info.dashboard)
    while time.time() < deadline and str(client.get_job_status(job_id)) != "RUNNING":
        time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err[-2000:]
    assert str(client.get_job_status(job_id)) == "STOPPED" and f"job {job_id} stopped" in err


def test_cluster_down_leaves_no_process_it_started(cluster):
    info, env = cluster
    started = cluster_pids(info.processes, info.ray_temp_dir)
    assert len(started) >= 8  # s3, mlflow (+ its worker), two `ray start`, gcs, raylets, dashboard, ...
    down = _run(["make", "-s", "cluster-down", f"CLUSTER_DIR={info.state_dir}", f"BIN={Path(sys.executable).parent}"],
                {k: v for k, v in env.items() if not k.startswith("RAY_")})
    assert down.returncode == 0 and "stopped" in down.stdout, down.stdout + down.stderr
    assert [p for p in started if _exists(p)] == []
    assert cluster_pids(info.processes, info.ray_temp_dir) == []
    assert not Path(info.ray_temp_dir).exists() and not (Path(info.state_dir) / "cluster.json").exists()
