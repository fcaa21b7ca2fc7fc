"""`matting submit SPEC.yaml`: run a job spec (`jobs/*.yaml`) on a Ray cluster through Job Submission.

The spec's `config` (with the `--set` overrides) is checked against its command's typed config
before anything is sent, then written as a YAML file into the working folder that Ray uploads, and
the job's entrypoint is `matting COMMAND --config THAT_FILE`: the same config path a user runs by
hand, with no config text on a command line. Secrets travel as runtime-env variables, taken by
name from this environment; submit never writes or prints them. Ray itself logs each runtime env,
values included, in the head's runtime_env_agent.log: on a shared cluster give the cluster its own
keys (KubeRay: a Secret the pods read) and leave those variables unset where you submit from.
"""
from __future__ import annotations

import asyncio
import contextlib
import copy
import logging
import os
import re
import secrets as secrets_lib
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pipelines import config as cfglib
from pipelines.config import ConfigError, NonNegativeFloat, option

__all__ = ["SubmitConfig", "JobSpec", "read_spec", "job_config", "build_submission", "resolve_address",
           "exit_status", "submit"]

EPILOG = """\
examples:
  make cluster-up                                       # a local multi-node cluster (infra/local)
  matting submit jobs/generate.yaml --set clips=16 --set out=s3://matting/clips
  matting submit jobs/train.yaml --address http://head:8265 --set recipe.steps=200
  matting submit jobs/infer.yaml --no-wait              # prints the submission id

The cluster: --address, else $RAY_ADDRESS, else the local cluster's .cluster/cluster.json
($MATTING_CLUSTER_FILE). Ctrl-C asks whether to stop the job (without a terminal: stops it).

exit status: the job's own (0 done, 3 partial, 2 usage error, 1 failure) as Ray reports it; 1 for
a job that failed otherwise or was stopped; 2 for a spec refused before submission.
"""

# Ray names its resources CPU, GPU and memory; the spec's entrypoint_resources uses those names too.
_NAMED_RESOURCES = {"CPU": "entrypoint_num_cpus", "GPU": "entrypoint_num_gpus", "memory": "entrypoint_memory"}
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
_FLOAT = re.compile(r"^[-+]?\d+(\.\d*)?[eE][-+]?\d+$")


@dataclass(frozen=True)
class SubmitConfig:
    """Settings of `matting submit`."""

    spec: str = option("", "job spec (jobs/*.yaml)", positional=True, metavar="SPEC.yaml")
    address: str | None = option(None, "Ray cluster: dashboard URL (http://HOST:8265) or HOST:GCS_PORT "
                                       "(default: $RAY_ADDRESS, else the local cluster's address file)",
                                 metavar="URL")
    set: tuple[str, ...] = option((), "override a config key: KEY=VALUE, dotted for nested keys, VALUE read "
                                      "as YAML", metavar="KEY=VALUE", repeat=True)
    wait: bool = option(True, "stream the job's logs and wait for it (--no-wait: print the submission id)")


@dataclass(frozen=True)
class JobSpec:
    """A job spec (DESIGN.md "Job specs"): the command, its config, the runtime env, secret names."""

    command: str
    config: dict[str, Any] = field(default_factory=dict)
    runtime_env: dict[str, Any] = field(default_factory=dict)
    secrets: tuple[str, ...] = ()
    entrypoint_resources: dict[str, NonNegativeFloat] = field(default_factory=dict)


def read_spec(path: str) -> JobSpec:
    """The job spec in file `path`; ConfigError naming the file and the key at fault."""
    try:
        data = yaml.safe_load(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such job spec") from None
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"{path}: cannot read the job spec: {exc}") from None
    if not cfglib.is_job_spec(data):
        raise ConfigError(f"{path}: not a job spec (a YAML mapping with `command` and `config`)")
    try:
        spec = cfglib.from_dict(JobSpec, data)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}", exc.problems) from None
    bad = [n for n in spec.secrets if not _ENV_NAME.match(n)]
    if bad:
        raise ConfigError(f"{path}: secrets: names of environment variables are expected, got {bad[0]!r}")
    return spec


def job_config(spec: JobSpec, sets: tuple[str, ...], path: str = "spec") -> dict[str, Any]:
    """The spec's config with the `--set KEY=VALUE` overrides, validated as its command's typed config."""
    config_class = _config_class(spec.command, path)
    data = cfglib.apply_overrides(copy.deepcopy(spec.config), dict(_parse_set(s) for s in sets))
    try:
        cfglib.from_dict(config_class, data)
    except ConfigError as exc:
        named = tuple((f"config.{key}", why) for key, why in exc.problems)
        raise ConfigError(f"{path}: " + "; ".join(f"{k}: {why}" for k, why in named), named) from None
    return data


def _config_class(command: str, path: str) -> type:
    from pipelines.cli import COMMANDS, build_parser

    if command not in COMMANDS or command == "submit":
        known = ", ".join(c for c in COMMANDS if c != "submit")
        raise ConfigError(f"{path}: command: unknown command {command!r} (known: {known})")
    return build_parser().parse_args([command]).config_class


def _parse_set(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or not key.strip() or not all(_ENV_NAME.match(p) for p in key.strip().split(".")):
        raise ConfigError(f"--set {text!r}: expected KEY=VALUE (dotted KEY for nested keys)")
    try:
        parsed = yaml.safe_load(value)
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {text!r}: the value is not valid YAML: {exc}") from None
    if isinstance(parsed, str) and _FLOAT.match(parsed):
        parsed = float(parsed)  # YAML 1.1 reads 1e-3 (no dot) as a string; nobody means that on a command line
    return key.strip(), parsed


def resolve_address(address: str | None) -> str:
    """--address, else $RAY_ADDRESS, else the local cluster's dashboard from its address file."""
    if address:
        return address
    if os.environ.get("RAY_ADDRESS"):
        return os.environ["RAY_ADDRESS"]
    from infra.local.cluster import cluster_file, read_cluster

    path = cluster_file()
    try:
        return read_cluster(path).dashboard
    except FileNotFoundError:
        raise ConfigError(f"no Ray cluster to submit to: give --address, set RAY_ADDRESS, or start the local "
                          f"one with `make cluster-up` (its address file {path} is absent)") from None


@dataclass(frozen=True)
class Submission:
    """What goes to Ray: the entrypoint, the runtime env (secrets inside), resources, the config file."""

    submission_id: str
    entrypoint: str
    runtime_env: dict[str, Any]
    resources: dict[str, Any]
    config_file: Path  # written into the working folder for the upload, removed after it


def build_submission(spec: JobSpec, config: dict[str, Any], path: str = "spec",
                     environ: dict[str, str] | None = None) -> Submission:
    """The submission of a validated spec; the working folder must be a local folder (the config travels in it)."""
    environ = os.environ if environ is None else environ
    runtime_env = copy.deepcopy(spec.runtime_env)
    working_dir = runtime_env.get("working_dir")
    if not isinstance(working_dir, str) or "://" in working_dir or not Path(working_dir).is_dir():
        raise ConfigError(f"{path}: runtime_env.working_dir: a local folder is needed (the job's config "
                          f"travels in it), got {working_dir!r}")
    runtime_env["working_dir"] = str(Path(working_dir).resolve())  # Ray uploads it from here
    env_vars = runtime_env.get("env_vars") or {}
    if not isinstance(env_vars, dict) or not all(isinstance(v, str) for v in env_vars.values()):
        raise ConfigError(f"{path}: runtime_env.env_vars: a mapping of names to strings is expected")
    # only the secrets that are set here: an unset one stays unset there (the cluster may provide it)
    runtime_env["env_vars"] = {**env_vars, **{n: environ[n] for n in spec.secrets if environ.get(n)}}
    submission_id = f"matting-{spec.command}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets_lib.token_hex(3)}"
    config_file = Path(runtime_env["working_dir"]) / f".matting-job-{submission_id}.yaml"
    entrypoint = f"matting {spec.command} --config {shlex.quote(config_file.name)}"
    resources: dict[str, Any] = {}
    for name, amount in spec.entrypoint_resources.items():
        if name in _NAMED_RESOURCES:
            resources[_NAMED_RESOURCES[name]] = int(amount) if name == "memory" else amount
        else:
            resources.setdefault("entrypoint_resources", {})[name] = amount
    return Submission(submission_id, entrypoint, runtime_env, resources, config_file)


def exit_status(status: str, driver_exit_code: int | None) -> int:
    """The submit's exit status for a finished job: the entrypoint's own, else 0 succeeded / 1 failed or stopped."""
    if status == "STOPPED":
        return 1
    if driver_exit_code is not None and 0 <= driver_exit_code < 256:
        if status == "SUCCEEDED" or driver_exit_code != 0:
            return driver_exit_code
    return 0 if status == "SUCCEEDED" else 1


@contextlib.contextmanager
def _without_address_env():
    """Ray's client lets RAY_ADDRESS / RAY_API_SERVER_ADDRESS override the address it is given: not here."""
    names = ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")
    saved = {n: os.environ.pop(n) for n in names if n in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


def _client(address: str):
    from ray.job_submission import JobSubmissionClient

    with _without_address_env():
        return JobSubmissionClient(address)


def submit(client, sub: Submission, config: dict[str, Any]) -> str:
    """Write the config file, submit (Ray uploads the working folder then), remove the file; returns the id."""
    sub.config_file.write_text(f"# matting submit {sub.submission_id}\n" + yaml.safe_dump(config, sort_keys=False))
    try:
        return client.submit_job(entrypoint=sub.entrypoint, runtime_env=sub.runtime_env,
                                 submission_id=sub.submission_id, metadata={"matting.command": sub.entrypoint.split()[1]},
                                 **sub.resources)
    finally:
        sub.config_file.unlink(missing_ok=True)


async def _stream_logs(client, job_id: str, out) -> None:
    async for chunk in client.tail_job_logs(job_id):
        out.write(chunk)
        out.flush()


def _wait_finished(client, job_id: str, timeout: float = 60.0):
    """The job's info once it is in a terminal state (the log stream ends slightly before)."""
    deadline = time.time() + timeout
    info = client.get_job_info(job_id)
    while str(info.status) not in _TERMINAL and time.time() < deadline:
        time.sleep(0.5)
        info = client.get_job_info(job_id)
    return info


def _follow(client, job_id: str) -> int:
    """Stream the job's logs until it ends; its exit status."""
    try:
        asyncio.run(_stream_logs(client, job_id, sys.stdout))
    except RuntimeError as exc:  # the stream broke off (the head went away): the status says the rest
        print(f"matting submit: log stream of {job_id} ended: {exc}", file=sys.stderr)
    info = _wait_finished(client, job_id)
    status = str(info.status)
    code = exit_status(status, info.driver_exit_code)
    tail = f": {info.message}" if status != "SUCCEEDED" and info.message else ""
    print(f"matting submit: job {job_id} {status.lower()} (exit status {code}){tail}", file=sys.stderr)
    return code if status in _TERMINAL else 1


def _interrupted(client, job_id: str, terminated: bool) -> int:
    """Ctrl-C: ask whether to stop the job (stop it without a terminal, or on SIGTERM)."""
    from pipelines.cli import EXIT_INTERRUPTED, EXIT_TERMINATED

    stop = True
    if not terminated and sys.stdin is not None and sys.stdin.isatty():
        answer = input(f"\nstop job {job_id} on the cluster? [y/N] ").strip().lower()
        stop = answer in ("y", "yes")
    if stop:
        client.stop_job(job_id)
        info = _wait_finished(client, job_id, timeout=30)
        print(f"matting submit: job {job_id} {str(info.status).lower()}", file=sys.stderr)
    else:
        print(f"matting submit: job {job_id} goes on; follow it with `ray job logs --follow {job_id}`",
              file=sys.stderr)
    return EXIT_TERMINATED if terminated else EXIT_INTERRUPTED


def add_parser(subparsers):
    """Register `matting submit`."""
    return cfglib.add_command(subparsers, "submit", SubmitConfig, run,
                              help="run a job spec (jobs/*.yaml) on a Ray cluster",
                              description="Submit a job spec through Ray's Job Submission API, stream its logs "
                                          "and exit with the job's own status.", epilog=EPILOG)


def run(args) -> int:
    """`matting submit`; returns the exit status."""
    from pipelines.cli import EXIT_FAILED, EXIT_OK, Terminated

    cfg = cfglib.from_args(SubmitConfig, args)
    cfglib.require(cfg, {"SPEC.yaml": "spec"})
    if not args.verbose:  # Ray's packaging chatter (one line per .gitignore it honours) hides the job's own log
        logging.getLogger("ray._private.runtime_env").setLevel(logging.ERROR)
        logging.getLogger("ray.dashboard.modules.dashboard_sdk").setLevel(logging.WARNING)
    spec = read_spec(cfg.spec)
    config = job_config(spec, cfg.set, cfg.spec)
    sub = build_submission(spec, config, cfg.spec)
    address = resolve_address(cfg.address)
    try:
        client = _client(address)
        job_id = submit(client, sub, config)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        print(f"matting submit: cannot submit to {address}: {exc}", file=sys.stderr)
        return EXIT_FAILED
    print(f"matting submit: job {job_id} submitted to {address}: {sub.entrypoint}", file=sys.stderr)
    if not cfg.wait:
        print(job_id)
        return EXIT_OK
    try:
        return _follow(client, job_id)
    except KeyboardInterrupt as exc:
        return _interrupted(client, job_id, isinstance(exc, Terminated))
