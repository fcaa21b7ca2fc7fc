"""The local multi-node cluster: a Ray head and worker nodes, an S3 server and an MLflow server.

    python -m infra.local up [--dir .cluster] [--workers 1] [--head-cpus 2] [--worker-cpus 2]
    python -m infra.local down [--dir .cluster]
    python -m infra.local status [--dir .cluster]

Everything runs from this virtualenv on free ports, each service in a session of its own
(`start_new_session`), so `down` stops exactly those sessions (and any process whose command line
names this cluster's Ray temp folder), never another Ray instance on the machine: `ray stop` would.
S3 and MLflow listen on 127.0.0.1 only; Ray resolves 127.0.0.1 to the machine's address for its
own components (services.resolve_ip_for_localhost) while clients reach it on 127.0.0.1. The Ray
temp folder is not /tmp/ray, so `ray start` writes its "current cluster" file there and another
process's bare `ray.init()` (a test session's) starts its own runtime instead of joining this one.
The cluster declares 4 logical CPUs by default (2 per node) on these 2 cores: Ray Train's workers
reserve theirs ahead of Ray Data, and with no CPU left for Data a run hangs (STACK.md).

`up` writes DIR/cluster.json (addresses, process ids: what `matting submit` and the tests read) and
DIR/env.sh (the `export` lines, keys included, mode 0600); DIR holds a `.gitignore` of `*`. S3 keys
come from AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY when set, else are generated once and kept in
DIR/credentials.json (0600), so the S3 data and MLflow store in DIR outlive a down/up.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from infra.s3_local import LocalS3, free_port

__all__ = ["ClusterInfo", "cluster_file", "cluster_pids", "read_cluster", "read_env", "up", "down", "main"]

DEFAULT_DIR = ".cluster"
CLUSTER_FILE_ENV = "MATTING_CLUSTER_FILE"  # where `matting submit` looks, else ./.cluster/cluster.json
BIN = Path(sys.executable).parent  # the virtualenv's bin: ray, mlflow, matting, weed


@dataclass
class ClusterInfo:
    """What `up` started and where it listens (DIR/cluster.json)."""

    state_dir: str
    ray_address: str  # GCS host:port: RAY_ADDRESS of drivers and of `matting submit`
    dashboard: str  # http://127.0.0.1:PORT: Ray's Job Submission API
    s3_endpoint: str
    mlflow: str
    bucket: str
    ray_temp_dir: str
    env_file: str
    nodes: list[dict] = field(default_factory=list)  # {"name", "num_cpus", "resources"}
    processes: list[dict] = field(default_factory=list)  # {"name", "pid", "start"}: session leaders


def cluster_file(state_dir: str | os.PathLike | None = None) -> Path:
    """DIR/cluster.json; without DIR: $MATTING_CLUSTER_FILE, else ./.cluster/cluster.json."""
    if state_dir is None and os.environ.get(CLUSTER_FILE_ENV):
        return Path(os.environ[CLUSTER_FILE_ENV])
    return Path(state_dir or DEFAULT_DIR) / "cluster.json"


def read_cluster(path: str | os.PathLike | None = None) -> ClusterInfo:
    """The ClusterInfo in `path` (default: cluster_file()); FileNotFoundError when no cluster is up."""
    path = Path(path) if path else cluster_file()
    return ClusterInfo(**json.loads(path.read_text()))


def read_env(env_file: str | os.PathLike) -> dict[str, str]:
    """The variables an env.sh of `up` exports."""
    env = {}
    for line in Path(env_file).read_text().splitlines():
        words = shlex.split(line, comments=True)
        if len(words) == 2 and words[0] == "export" and "=" in words[1]:
            key, value = words[1].split("=", 1)
            env[key] = value
    return env


# --- up --------------------------------------------------------------------------------------

def up(state_dir: str | os.PathLike = DEFAULT_DIR, *, workers: int = 1, head_cpus: float = 2,
       worker_cpus: float = 2, bucket: str = "matting", timeout: float = 120.0) -> ClusterInfo:
    """Start S3, MLflow, a Ray head and `workers` Ray worker nodes; write DIR/cluster.json and DIR/env.sh."""
    state = Path(state_dir).resolve()
    _refuse_if_running(state)
    (state / "logs").mkdir(parents=True, exist_ok=True)
    (state / ".gitignore").write_text("*\n")  # nothing in here is ever committed
    creds = _credentials(state)
    # Short, outside the repo: Ray's unix socket paths must stay under ~107 characters.
    temp_dir = tempfile.mkdtemp(prefix="matting-ray-")
    started: list[dict] = []
    try:
        s3 = _start_s3(state, creds, started)
        _make_bucket(s3.endpoint, creds, bucket)
        mlflow_url = _start_mlflow(state, creds, s3.endpoint, bucket, started, timeout)
        env = _service_env(creds) | {"AWS_ENDPOINT_URL": s3.endpoint, "MLFLOW_TRACKING_URI": mlflow_url}
        gcs, dash = free_port(), free_port()
        nodes = [{"name": "head", "num_cpus": head_cpus, "resources": {"head": 1}}]
        _start_ray_node(nodes[0], ["--head", f"--port={gcs}", "--include-dashboard=true",
                                   "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
                                   f"--ray-client-server-port={free_port()}"], temp_dir, env, state, started)
        dashboard = f"http://127.0.0.1:{dash}"
        _wait_http(f"{dashboard}/api/version", timeout, started, "the Ray dashboard")
        for i in range(workers):
            node = {"name": f"worker-{i + 1}", "num_cpus": worker_cpus, "resources": {"worker": 1}}
            nodes.append(node)
            _start_ray_node(node, [f"--address=127.0.0.1:{gcs}"], temp_dir, env, state, started)
        _wait_nodes(dashboard, len(nodes), timeout, started)
    except BaseException:
        _stop_sessions(started, temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)
        raise
    info = ClusterInfo(state_dir=str(state), ray_address=f"127.0.0.1:{gcs}", dashboard=dashboard,
                       s3_endpoint=s3.endpoint, mlflow=mlflow_url, bucket=bucket, ray_temp_dir=temp_dir,
                       env_file=str(state / "env.sh"), nodes=nodes, processes=started)
    _write_private(state / "env.sh", _env_lines(info, creds))
    _write_private(state / "cluster.json", json.dumps(dataclasses.asdict(info), indent=1))
    return info


def _refuse_if_running(state: Path) -> None:
    path = state / "cluster.json"
    if path.exists():
        alive = [p for p in read_cluster(path).processes if _is_same_process(p)]
        if alive:
            raise RuntimeError(f"a cluster is already up ({path}): `make cluster-down` first")
        path.unlink()  # a cluster whose processes are all gone (a reboot): start afresh


def _credentials(state: Path) -> dict[str, str]:
    """S3 keys: from the environment, else the ones generated for this folder earlier, else new ones."""
    if os.environ.get("AWS_ACCESS_KEY_ID") and os.environ.get("AWS_SECRET_ACCESS_KEY"):
        return {k: os.environ[k] for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
    path = state / "credentials.json"
    if path.exists():
        return json.loads(path.read_text())
    creds = {"AWS_ACCESS_KEY_ID": "local-" + secrets.token_hex(6), "AWS_SECRET_ACCESS_KEY": secrets.token_urlsafe(24)}
    _write_private(path, json.dumps(creds))
    return creds


def _service_env(creds: dict[str, str]) -> dict[str, str]:
    """The environment every service and every Ray job runs in: this virtualenv first on PATH."""
    return os.environ | creds | {
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "AWS_DEFAULT_REGION": os.environ.get("AWS_DEFAULT_REGION", "us-east-1"),
        "RAY_AUTH_MODE": "disabled",  # loopback only; otherwise a token file lands in the home folder
        "RAY_USAGE_STATS_ENABLED": "0",
        "PYTHONUNBUFFERED": "1",
    }


def _start_s3(state: Path, creds: dict[str, str], started: list[dict]) -> LocalS3:
    saved = {k: os.environ.get(k) for k in creds}
    os.environ.update(creds)  # LocalS3 reads the keys from (and passes on) this process's environment
    try:
        s3 = LocalS3(state / "s3", log_path=str(state / "logs" / "s3.log")).start()
    finally:
        for k, v in saved.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
    started.append(_record("s3", s3.proc.pid))
    return s3


def _make_bucket(endpoint: str, creds: dict[str, str], bucket: str) -> None:
    import boto3

    client = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id=creds["AWS_ACCESS_KEY_ID"],
                          aws_secret_access_key=creds["AWS_SECRET_ACCESS_KEY"], region_name="us-east-1")
    if bucket not in {b["Name"] for b in client.list_buckets().get("Buckets", [])}:
        client.create_bucket(Bucket=bucket)


def _start_mlflow(state: Path, creds: dict[str, str], endpoint: str, bucket: str, started: list[dict],
                  timeout: float) -> str:
    """`mlflow server`: sqlite tracking and registry in DIR, artifacts proxied to s3://BUCKET/mlflow."""
    port = free_port()
    cmd = [str(BIN / "mlflow"), "server", "--workers", "1", "--host", "127.0.0.1", "--port", str(port),
           "--backend-store-uri", f"sqlite:///{state / 'mlflow.db'}",
           "--artifacts-destination", f"s3://{bucket}/mlflow"]
    env = _service_env(creds) | {"MLFLOW_S3_ENDPOINT_URL": endpoint, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    started.append(_spawn("mlflow", cmd, env, state))
    url = f"http://127.0.0.1:{port}"
    _wait_http(f"{url}/health", timeout, started, "the MLflow server")
    return url


def _start_ray_node(node: dict, extra: list[str], temp_dir: str, env: dict[str, str], state: Path,
                    started: list[dict]) -> None:
    """`ray start --block` for one node, with its own resources, ports and temp folder.

    Nodes sharing one temp folder would share a log folder, and each node's log monitor would
    forward every worker's lines again: each line would reach the driver once per node.
    """
    node_temp = Path(temp_dir) / node["name"]
    node_temp.mkdir()
    cmd = [str(BIN / "ray"), "start", "--block", "--node-ip-address=127.0.0.1", f"--temp-dir={node_temp}",
           f"--num-cpus={node['num_cpus']:g}", f"--resources={json.dumps(node['resources'])}",
           "--disable-usage-stats", f"--node-manager-port={free_port()}", f"--object-manager-port={free_port()}",
           f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
           f"--runtime-env-agent-port={free_port()}", f"--metrics-export-port={free_port()}",
           "--object-store-memory=300000000", *extra]
    started.append(_spawn(f"ray-{node['name']}", cmd, env, state))


def _spawn(name: str, cmd: list[str], env: dict[str, str], state: Path) -> dict:
    with open(state / "logs" / f"{name}.log", "ab") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                start_new_session=True, cwd=state)
    return _record(name, proc.pid)


def _record(name: str, pid: int) -> dict:
    return {"name": name, "pid": pid, "start": _start_time(pid)}


def _wait_http(url: str, timeout: float, started: list[dict], what: str) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        _check_alive(started)
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except (OSError, urllib.error.HTTPError):
            time.sleep(0.5)
    raise RuntimeError(f"{what} did not answer on {url} within {timeout:.0f} s")


def _wait_nodes(dashboard: str, count: int, timeout: float, started: list[dict]) -> None:
    """Wait until the head's state API lists `count` alive nodes."""
    deadline = time.time() + timeout
    alive = 0
    while time.time() < deadline:
        _check_alive(started)
        try:
            with urllib.request.urlopen(f"{dashboard}/api/v0/nodes?limit=100", timeout=5) as r:
                rows = json.load(r)["data"]["result"]["result"]
            alive = sum(row.get("state") == "ALIVE" for row in rows)
            if alive >= count:
                return
        except (OSError, KeyError, ValueError):
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{alive} of {count} Ray nodes alive after {timeout:.0f} s")


def _check_alive(started: list[dict]) -> None:
    for p in started:
        if not _is_same_process(p):
            raise RuntimeError(f"{p['name']} exited while starting; see its log in logs/{p['name']}.log")


def _env_lines(info: ClusterInfo, creds: dict[str, str]) -> str:
    env = {"RAY_ADDRESS": info.ray_address, "AWS_ENDPOINT_URL": info.s3_endpoint,
           "AWS_DEFAULT_REGION": os.environ.get("AWS_DEFAULT_REGION", "us-east-1"), **creds,
           "MLFLOW_TRACKING_URI": info.mlflow, "RAY_AUTH_MODE": "disabled",
           "MATTING_CLUSTER_FILE": str(Path(info.state_dir) / "cluster.json")}
    lines = ["# the local cluster of `make cluster-up`: source it (. .cluster/env.sh) to use it"]
    return "\n".join(lines + [f"export {k}={shlex.quote(v)}" for k, v in env.items()]) + "\n"


def _write_private(path: Path, text: str) -> None:
    """Write a file only its owner can read (it may hold keys)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(path, 0o600)


# --- down ------------------------------------------------------------------------------------

def down(state_dir: str | os.PathLike = DEFAULT_DIR, timeout: float = 20.0) -> list[int]:
    """Stop every process `up` started in DIR (by session, and by the Ray temp folder); returns their pids."""
    path = Path(state_dir) / "cluster.json"
    if not path.exists():
        return []
    info = read_cluster(path)
    stopped = _stop_sessions(info.processes, info.ray_temp_dir, timeout)
    shutil.rmtree(info.ray_temp_dir, ignore_errors=True)
    path.unlink()
    return stopped


def cluster_pids(processes: list[dict], ray_temp_dir: str | None) -> list[int]:
    """Live pids of these sessions (whose leaders are still the same processes, or gone) or naming the Ray temp folder."""
    sessions = {p["pid"] for p in processes if _is_same_process(p) or not _exists(p["pid"])}
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        pid = int(entry)
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            sid = int(fields[3])
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
        except (OSError, IndexError, ValueError):
            continue
        if fields[0] == "Z":  # dead, waiting for its parent (here init) to reap it
            continue
        if sid in sessions or (ray_temp_dir and ray_temp_dir in cmdline):
            found.append(pid)
    return found


def _stop_sessions(processes: list[dict], ray_temp_dir: str | None, timeout: float = 20.0) -> list[int]:
    """SIGTERM the cluster's processes, Ray first (its workers talk to S3 and MLflow), then SIGKILL what stays."""
    ray = [p for p in processes if p["name"].startswith("ray")]
    services = [p for p in processes if not p["name"].startswith("ray")]
    # Ray nodes hold nothing to flush here, and a GCS whose raylets died waits long on SIGTERM: a short
    # grace. S3 and MLflow get longer to close their files.
    return _stop_group(ray, ray_temp_dir, min(timeout, 3.0)) + _stop_group(services, None, timeout)


def _stop_group(processes: list[dict], ray_temp_dir: str | None, grace: float) -> list[int]:
    pids = cluster_pids(processes, ray_temp_dir) if processes else []
    _signal(pids, signal.SIGTERM)
    deadline = time.time() + grace
    while time.time() < deadline and any(_exists(p) for p in pids):
        time.sleep(0.1)
    # what did not listen to SIGTERM, and what a dying raylet started in the meantime
    pids = sorted(set(pids) | set(cluster_pids(processes, ray_temp_dir) if processes else []))
    _signal(pids, signal.SIGKILL)
    deadline = time.time() + 5
    while time.time() < deadline and any(_exists(p) for p in pids):
        time.sleep(0.1)
    return pids


def _signal(pids: list[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def _start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (tells a reused pid apart), None when gone."""
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def _exists(pid: int) -> bool:
    """Alive and not a zombie."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _is_same_process(p: dict) -> bool:
    return _exists(p["pid"]) and _start_time(p["pid"]) == p["start"]


# --- command line ----------------------------------------------------------------------------

def _print_up(info: ClusterInfo) -> None:
    nodes = ", ".join(f"{n['name']} ({n['num_cpus']:g} CPU, {json.dumps(n['resources'])})" for n in info.nodes)
    print(f"Ray          {info.ray_address} (nodes: {nodes})")
    print(f"Ray jobs     {info.dashboard} (dashboard and Job Submission API)")
    print(f"S3           {info.s3_endpoint} (bucket s3://{info.bucket})")
    print(f"MLflow       {info.mlflow} (artifacts in s3://{info.bucket}/mlflow)")
    print(f"state        {info.state_dir}/cluster.json; logs in {info.state_dir}/logs")
    print(f"\nTo use it from a shell:  . {info.env_file}\n")
    for line in Path(info.env_file).read_text().splitlines():
        if line.startswith("export ") and "SECRET" not in line:
            print(line)
    print(f"export AWS_SECRET_ACCESS_KEY=...   # in {info.env_file}")


def main(argv: list[str] | None = None) -> int:
    """`python -m infra.local up|down|status`."""
    p = argparse.ArgumentParser(prog="python -m infra.local", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("action", choices=("up", "down", "status"))
    p.add_argument("--dir", default=os.environ.get("CLUSTER_DIR") or DEFAULT_DIR,
                   help=f"state folder (default: $CLUSTER_DIR or {DEFAULT_DIR})")
    p.add_argument("--workers", type=int, default=1, help="Ray worker nodes beside the head (default 1)")
    p.add_argument("--head-cpus", type=float, default=2, help="logical CPUs the head declares (default 2)")
    p.add_argument("--worker-cpus", type=float, default=2, help="logical CPUs each worker node declares (default 2)")
    args = p.parse_args(argv)
    if args.action == "up":
        try:
            info = up(args.dir, workers=args.workers, head_cpus=args.head_cpus, worker_cpus=args.worker_cpus)
        except RuntimeError as exc:
            print(f"cluster-up: {exc}", file=sys.stderr)
            return 1
        _print_up(info)
    elif args.action == "down":
        stopped = down(args.dir)
        print(f"cluster-down: stopped {len(stopped)} process(es)" if stopped else "cluster-down: no cluster was up")
    else:
        path = cluster_file(args.dir)
        if not path.exists():
            print("no cluster is up")
            return 1
        info = read_cluster(path)
        for proc in info.processes:
            print(f"{proc['name']:<16} pid {proc['pid']:<8} {'up' if _is_same_process(proc) else 'gone'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
