"""`matting submit` without a cluster: specs refused before submission, secrets, addresses, exit statuses.

The whole chain on a real multi-node cluster is tests/test_local_cluster.py.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from infra.s3_local import free_port
from pipelines import submit as sub
from pipelines.cli import main
from pipelines.config import ConfigError

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def nowhere(monkeypatch) -> str:
    """An address where no cluster listens: a spec refused before submission never gets that far."""
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    return f"http://127.0.0.1:{free_port()}"


def _spec(tmp_path: Path, text: str) -> str:
    (tmp_path / "code").mkdir(exist_ok=True)
    path = tmp_path / "spec.yaml"
    path.write_text(text.replace("WORKDIR", str(tmp_path / "code")))
    return str(path)


GOOD = "command: generate\nconfig: {clips: 3}\nruntime_env: {working_dir: WORKDIR}\nsecrets: [MY_KEY]\n"


@pytest.mark.parametrize("text, argv, named", [
    ("command: generat\nconfig: {}\nruntime_env: {working_dir: WORKDIR}\n", [], "command: unknown command 'generat'"),
    ("command: submit\nconfig: {}\nruntime_env: {working_dir: WORKDIR}\n", [], "command: unknown command 'submit'"),
    ("command: generate\nconfig: {clipz: 3}\nruntime_env: {working_dir: WORKDIR}\n", [], "config.clipz: unknown key"),
    (GOOD, ["--set", "fakemotion.wobble=1"], "config.fakemotion.wobble: unknown key"),
    (GOOD, ["--set", "clips=many"], "config.clips: input should be a valid integer"),
    (GOOD, ["--set", "clips"], "--set 'clips': expected KEY=VALUE"),
    (GOOD, ["--set", "=3"], "--set '=3': expected KEY=VALUE"),
    (GOOD, ["--set", "clips=[1"], "--set 'clips=[1': the value is not valid YAML"),
    (GOOD + "extra: 1\n", [], "extra: unknown key"),
    (GOOD.replace("[MY_KEY]", "[my-key=abc]"), [], "secrets: names of environment variables are expected"),
    ("command: generate\nconfig: {}\nruntime_env: {working_dir: s3://bucket/code.zip}\n", [],
     "runtime_env.working_dir: a local folder is needed"),
    ("clips: 3\n", [], "not a job spec"),
])
def test_a_bad_spec_or_override_is_refused_before_submission_naming_the_key(tmp_path, nowhere, capsys, text,
                                                                            argv, named):
    spec = _spec(tmp_path, text)
    assert main(["submit", spec, "--address", nowhere, *argv]) == 2
    err = capsys.readouterr().err
    assert named in err and spec in err or named.startswith("--set") and named in err
    assert not list((tmp_path / "code").iterdir())  # no config file written for a refused spec


def test_every_job_spec_is_accepted_and_its_overrides_reach_the_config():
    spec = sub.read_spec(str(REPO / "jobs" / "train.yaml"))
    config = sub.job_config(spec, ("recipe.steps=8", "val_data=null", "workers=1", "recipe.optim.lr=1e-3"))
    assert config["recipe"]["steps"] == 8 and config["recipe"]["val_every"] == 1000  # the rest kept
    assert config["val_data"] is None and config["workers"] == 1 and config["recipe"]["optim"] == {"lr": 1e-3}
    assert spec.config["recipe"]["steps"] == 20000  # the spec itself unchanged
    for path in sorted((REPO / "jobs").glob("*.yaml")):
        spec = sub.read_spec(str(path))
        assert sub.job_config(spec, ()) == spec.config


def test_secrets_travel_only_when_set_and_the_entrypoint_reads_the_config_file(tmp_path):
    spec = sub.read_spec(_spec(tmp_path, GOOD.replace("[MY_KEY]", "[MY_KEY, UNSET_KEY]")
                               + "entrypoint_resources: {CPU: 0.5, head: 1}\n"))
    built = sub.build_submission(spec, {"clips": 3}, environ={"MY_KEY": "s3cr3t", "OTHER": "x"})
    assert built.runtime_env["env_vars"] == {"MY_KEY": "s3cr3t"}
    assert built.runtime_env["working_dir"] == str((tmp_path / "code").resolve())
    assert built.entrypoint == f"matting generate --config {built.config_file.name}"
    assert built.config_file.parent == (tmp_path / "code").resolve() and not built.config_file.exists()
    assert built.resources == {"entrypoint_num_cpus": 0.5, "entrypoint_resources": {"head": 1}}


def test_nothing_listening_is_a_failure_and_leaves_no_config_file_behind(tmp_path, nowhere, capsys, monkeypatch):
    monkeypatch.setenv("MY_KEY", "s3cr3t")
    assert main(["submit", _spec(tmp_path, GOOD), "--address", nowhere]) == 1
    out = capsys.readouterr()
    assert "cannot submit to" in out.err and "s3cr3t" not in out.err + out.out
    assert not list((tmp_path / "code").iterdir())


def test_the_address_comes_from_the_flag_then_ray_address_then_the_cluster_file(tmp_path, monkeypatch):
    info = tmp_path / "cluster.json"
    info.write_text(json.dumps({"state_dir": str(tmp_path), "ray_address": "127.0.0.1:1", "dashboard": "http://x:2",
                                "s3_endpoint": "", "mlflow": "", "bucket": "b", "ray_temp_dir": "", "env_file": ""}))
    monkeypatch.setenv("MATTING_CLUSTER_FILE", str(info))
    monkeypatch.setenv("RAY_ADDRESS", "http://env:3")
    assert sub.resolve_address("http://flag:4") == "http://flag:4"
    assert sub.resolve_address(None) == "http://env:3"
    monkeypatch.delenv("RAY_ADDRESS")
    assert sub.resolve_address(None) == "http://x:2"
    monkeypatch.setenv("MATTING_CLUSTER_FILE", str(tmp_path / "absent.json"))
    with pytest.raises(ConfigError, match="make cluster-up"):
        sub.resolve_address(None)


@pytest.mark.parametrize("status, code, expected", [
    ("SUCCEEDED", 0, 0), ("SUCCEEDED", None, 0), ("FAILED", 3, 3), ("FAILED", 2, 2), ("FAILED", 1, 1),
    ("FAILED", None, 1), ("STOPPED", None, 1), ("STOPPED", 0, 1), ("FAILED", -9, 1),
])
def test_the_exit_status_is_the_entrypoints_own(status, code, expected):
    assert sub.exit_status(status, code) == expected
