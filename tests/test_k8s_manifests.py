"""The Kubernetes manifests in infra/k8s: valid core kinds, valid KubeRay objects, one image, and
consistent with the job specs in jobs/ (entrypoints, environment variable names)."""
from __future__ import annotations

import copy
import functools
import importlib.metadata
import re
import shlex
import urllib.parse
from pathlib import Path

import pytest
import yaml

from tests.kuberay_schema import cluster_specs, core_error, kuberay_errors, pod_templates

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "infra" / "k8s"
JOBS = ROOT / "jobs"
DOCKERFILE = ROOT / "infra" / "docker" / "Dockerfile"
COMMANDS = ("generate", "train", "infer")
RAY_KINDS = ("RayCluster", "RayJob")


def manifest_files() -> list[Path]:
    """Every YAML file under infra/k8s."""
    return sorted(p for p in K8S.rglob("*") if p.suffix in (".yaml", ".yml"))


def load_docs(path: Path) -> list[dict]:
    """The non-empty YAML documents of a file."""
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


@functools.lru_cache(maxsize=1)
def all_docs() -> tuple[tuple[str, dict], ...]:
    """(file relative to infra/k8s, document) for every manifest (parsed once: tests copy before changing)."""
    return tuple((str(p.relative_to(K8S)), d) for p in manifest_files() for d in load_docs(p))


def docs_of(kind: str) -> list[dict]:
    return [d for _, d in all_docs() if d["kind"] == kind]


def by_name(kind: str) -> dict[str, dict]:
    return {d["metadata"]["name"]: d for d in docs_of(kind)}


def all_pod_specs() -> list[tuple[str, dict]]:
    """(where, PodSpec) for every pod any manifest creates: Ray pods, submitters, Deployments."""
    pods = []
    for name, doc in all_docs():
        if doc["kind"] in RAY_KINDS:
            pods += [(f"{name}:{path}", t["spec"]) for path, t in pod_templates(doc)]
        elif doc["kind"] == "Deployment":
            pods.append((f"{name}:spec.template", doc["spec"]["template"]["spec"]))
    return pods


def all_containers() -> list[tuple[str, dict]]:
    """(where, container) for every container of every pod, init containers included."""
    return [(f"{where}/{c['name']}", c) for where, spec in all_pod_specs()
            for c in spec.get("initContainers", []) + spec["containers"]]


def ray_containers() -> list[tuple[str, dict]]:
    """(where, container) for the Ray head and worker containers (not the submitters)."""
    out = []
    for name, doc in all_docs():
        if doc["kind"] in RAY_KINDS:
            out += [(f"{name}:{path}/{c['name']}", c) for path, t in pod_templates(doc)
                    if "submitterPodTemplate" not in path for c in t["spec"]["containers"]]
    return out


def env_names(container: dict) -> set[str]:
    """The environment variable names a container gets: env, plus every key of an envFrom source."""
    names = {e["name"] for e in container.get("env", [])}
    configmaps, secrets = by_name("ConfigMap"), by_name("Secret")
    for source in container.get("envFrom", []):
        prefix = source.get("prefix", "")
        if "configMapRef" in source:
            names |= {prefix + k for k in configmaps[source["configMapRef"]["name"]]["data"]}
        if "secretRef" in source:
            names |= {prefix + k for k in secrets[source["secretRef"]["name"]]["stringData"]}
    return names


def rayjobs() -> dict[str, dict]:
    """The RayJob manifests by the matting command their entrypoint runs."""
    out = {}
    for doc in docs_of("RayJob"):
        argv = shlex.split(doc["spec"]["entrypoint"])
        out[argv[1]] = doc
    return out


# -- every manifest is valid ----------------------------------------------------------------

def test_the_manifests_are_there():
    kinds = {d["kind"] for _, d in all_docs()}
    assert {"ConfigMap", "Secret", "PersistentVolumeClaim", "Deployment", "Service",
            "RayCluster", "RayJob"} <= kinds
    assert sorted(rayjobs()) == sorted(COMMANDS)


@pytest.mark.parametrize("name,doc", [(n, d) for n, d in all_docs() if d["kind"] not in RAY_KINDS],
                         ids=lambda v: v if isinstance(v, str) else v["kind"])
def test_core_kinds_validate_strictly(name, doc):
    assert core_error(doc) is None, f"{name} {doc['kind']}: {core_error(doc)}"


@pytest.mark.parametrize("name,doc", [(n, d) for n, d in all_docs() if d["kind"] in RAY_KINDS],
                         ids=lambda v: v if isinstance(v, str) else v["kind"])
def test_ray_kinds_follow_the_kuberay_v1_api(name, doc):
    assert kuberay_errors(doc) == [], name


def test_a_string_container_port_is_rejected():
    doc = copy.deepcopy(by_name("Deployment")["mlflow"])
    doc["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] = "5000"
    assert "containerPort" in core_error(doc)
    job = copy.deepcopy(rayjobs()["train"])
    job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["ports"][0][
        "containerPort"] = "6379"
    assert any("headGroupSpec.template.spec.containers.0.ports.0.containerPort" in e
               for e in kuberay_errors(job))


def test_an_unknown_core_field_is_rejected():
    doc = copy.deepcopy(by_name("Service")["mlflow"])
    doc["spec"]["port"] = 5000
    assert "port" in core_error(doc)


@pytest.mark.parametrize("where,change,expected", [
    ("spec", lambda s: s.update(entrypointCPUs=1), "entrypointCPUs"),
    ("cluster", lambda c: c.update(enableAutoscaling=True), "enableAutoscaling"),
    ("worker", lambda g: g.update(maxReplica=4), "maxReplica"),
    ("worker", lambda g: g.update(minReplicas="0"), "'0' is not of type 'integer'"),
    ("worker", lambda g: g.update(minReplicas=9, maxReplicas=2), "minReplicas 9 > maxReplicas 2"),
    ("worker", lambda g: g.pop("groupName"), "'groupName' is a required property"),
    ("worker", lambda g: g["rayStartParams"].update({"num-cpus": 8}), "8 is not of type 'string'"),
    ("head", lambda h: h.pop("template"), "'template' is a required property"),
    ("spec", lambda s: s.update(shutdownAfterJobFinishes=False), "True was expected"),
    ("spec", lambda s: s.pop("shutdownAfterJobFinishes"), "'shutdownAfterJobFinishes' is a required property"),
    ("spec", lambda s: s.update(submissionMode="K8sMode"), "K8sMode"),
    ("spec", lambda s: s.update(clusterSelector={"ray.io/cluster": "matting"}), "is valid under each of"),
    ("spec", lambda s: s.update(runtimeEnvYAML="env_vars: [unclosed"), "runtimeEnvYAML"),
    ("worker", lambda g: g["template"]["spec"]["containers"][0].update(imagePullPolice="Always"),
     "imagePullPolice"),
])
def test_kuberay_schema_rejects_broken_rayjobs(where, change, expected):
    job = copy.deepcopy(rayjobs()["train"])
    target = {"spec": job["spec"], "cluster": job["spec"]["rayClusterSpec"],
              "head": job["spec"]["rayClusterSpec"]["headGroupSpec"],
              "worker": job["spec"]["rayClusterSpec"]["workerGroupSpecs"][1]}[where]
    change(target)
    errors = kuberay_errors(job)
    assert any(expected in e for e in errors), errors


def test_kuberay_schema_rejects_an_unknown_raycluster_field():
    cluster = copy.deepcopy(by_name("RayCluster")["matting"])
    cluster["spec"]["headGroupSpec"]["replicas"] = 1
    assert any("'replicas' was unexpected" in e for e in kuberay_errors(cluster))


# -- what the issue asks of the clusters and the jobs ----------------------------------------

def test_every_cluster_has_head_cpu_and_gpu_groups_and_autoscales():
    specs = [c for d in docs_of("RayCluster") + docs_of("RayJob") for c in cluster_specs(d)]
    assert len(specs) == 1 + len(COMMANDS)  # the RayJobs each bring their own cluster
    for cluster in specs:
        assert cluster["enableInTreeAutoscaling"] is True
        assert cluster["rayVersion"] == importlib.metadata.version("ray")
        gpus = {g["groupName"]: [c["resources"]["limits"].get("nvidia.com/gpu", 0)
                                 for c in g["template"]["spec"]["containers"]]
                for g in cluster["workerGroupSpecs"]}
        assert any(all(n == 0 for n in v) for v in gpus.values()), "no CPU worker group"
        assert any(any(n >= 1 for n in v) for v in gpus.values()), "no GPU worker group"
        for group in cluster["workerGroupSpecs"]:
            assert {"minReplicas", "maxReplicas"} <= set(group), group["groupName"]


def test_all_clusters_have_one_shape_but_their_sizes():
    # The four copies (RayCluster + three RayJobs) are written out in full; they must not drift apart.
    shapes = []
    for doc in docs_of("RayCluster") + docs_of("RayJob"):
        for cluster in cluster_specs(doc):
            shape = copy.deepcopy(cluster)
            for group in shape["workerGroupSpecs"]:
                group.pop("maxReplicas")
            shapes.append(shape)
    assert all(shape == shapes[0] for shape in shapes[1:])


def test_the_rayjobs_clean_up_after_themselves():
    for cmd, job in rayjobs().items():
        assert job["spec"]["shutdownAfterJobFinishes"] is True, cmd
        assert job["spec"]["ttlSecondsAfterFinished"] >= 0, cmd
        assert "rayClusterSpec" in job["spec"], cmd


def test_every_container_has_requests_and_limits():
    autoscalers = [c["autoscalerOptions"] for d in docs_of("RayCluster") + docs_of("RayJob")
                   for c in cluster_specs(d)]
    assert all("autoscalerOptions" in c for d in docs_of("RayCluster") + docs_of("RayJob")
               for c in cluster_specs(d)), "the autoscaler sidecar needs its resources set"
    containers = all_containers() + [("autoscaler", a) for a in autoscalers]
    for where, c in containers:
        for part in ("requests", "limits"):
            assert {"cpu", "memory"} <= set(c["resources"].get(part, {})), f"{where}: {part}"


def test_gpu_requests_equal_limits():
    # Kubernetes refuses an extended resource whose request differs from its limit.
    for where, c in all_containers():
        limit = c["resources"]["limits"].get("nvidia.com/gpu")
        assert c["resources"]["requests"].get("nvidia.com/gpu") == limit, where


def test_one_image_for_everything_and_the_dockerfile_builds_it():
    images = {c["image"] for _, c in all_containers()}
    assert len(images) == 1, images
    (image,) = images
    assert f"-t {image} " in DOCKERFILE.read_text(), "the Dockerfile's build example tags another image"


def test_ray_pods_run_in_the_images_repository():
    workdir = re.search(r"^WORKDIR (\S+)$", DOCKERFILE.read_text(), re.M).group(1)
    for where, c in ray_containers():
        assert c.get("workingDir") == workdir, where


def test_pods_run_as_non_root():
    for where, spec in all_pod_specs():
        assert spec["securityContext"]["runAsNonRoot"] is True, where


# -- settings from the ConfigMap, keys from the Secret ---------------------------------------

def test_the_secret_is_a_template_with_placeholders_only():
    (secret,) = docs_of("Secret")
    assert secret["stringData"] and "data" not in secret
    for key, value in secret["stringData"].items():
        assert value.startswith("REPLACE_WITH_"), f"{key} holds something other than a placeholder"


def test_every_key_reference_names_an_existing_configmap_or_secret_key():
    configmaps, secrets = by_name("ConfigMap"), by_name("Secret")
    for where, c in all_containers():
        for e in c.get("env", []):
            ref = e.get("valueFrom", {})
            if "configMapKeyRef" in ref:
                r = ref["configMapKeyRef"]
                assert r["key"] in configmaps[r["name"]]["data"], f"{where}: {e['name']}"
            if "secretKeyRef" in ref:
                r = ref["secretKeyRef"]
                assert r["key"] in secrets[r["name"]]["stringData"], f"{where}: {e['name']}"
            assert "value" not in e or not e["name"].startswith("AWS_SECRET"), f"{where}: a key in a manifest"
        for source in c.get("envFrom", []):
            if "configMapRef" in source:
                assert source["configMapRef"]["name"] in configmaps, where


def secret_refs(container: dict) -> set[str]:
    return {e["name"] for e in container.get("env", []) if "secretKeyRef" in e.get("valueFrom", {})}


def test_ray_pods_get_the_endpoint_and_mlflow_from_the_configmap_and_keys_from_the_secret():
    (secret,) = docs_of("Secret")
    configmap_names = set(by_name("ConfigMap")["matting-env"]["data"])
    assert {"AWS_ENDPOINT_URL", "MLFLOW_TRACKING_URI"} <= configmap_names
    for where, c in ray_containers():
        assert {"AWS_ENDPOINT_URL", "MLFLOW_TRACKING_URI"} <= env_names(c) - secret_refs(c), where
        assert secret_refs(c) >= set(secret["stringData"]), f"{where}: a key of the Secret is not given"
        optional = {e["name"] for e in c["env"] if e.get("valueFrom", {}).get("secretKeyRef", {}).get("optional")}
        assert not optional & {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}, f"{where}: the key pair is required"


def test_a_missing_secret_key_ref_is_caught():
    job = copy.deepcopy(rayjobs()["infer"])
    worker = job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
    worker["env"] = [e for e in worker["env"] if e["name"] != "AWS_SECRET_ACCESS_KEY"]
    (secret,) = docs_of("Secret")
    assert not secret_refs(worker) >= set(secret["stringData"])
    assert "AWS_SECRET_ACCESS_KEY" not in env_names(worker)


def test_mlflow_server_has_a_database_backend_and_s3_artifacts():
    deployment, service = by_name("Deployment")["mlflow"], by_name("Service")["mlflow"]
    pod = deployment["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    settings = {**by_name("ConfigMap")["mlflow-server"]["data"]}
    args = dict(a.removeprefix("--").split("=", 1) for a in c["args"] if "=" in a)
    resolve = lambda v: re.sub(r"\$\((\w+)\)", lambda m: settings[m.group(1)], v)  # noqa: E731
    assert resolve(args["artifacts-destination"]).startswith("s3://")
    backend = resolve(args["backend-store-uri"])
    assert backend.startswith("sqlite:////")
    db_dir = str(Path(backend.removeprefix("sqlite:///")).parent)
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    claims = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"]
              if "persistentVolumeClaim" in v}
    assert claims[mounts[db_dir]] in by_name("PersistentVolumeClaim"), "the sqlite file is not on the claim"
    assert deployment["spec"]["replicas"] == 1 and deployment["spec"]["strategy"]["type"] == "Recreate"
    assert {"MLFLOW_S3_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= env_names(c)
    # The Service reaches the pod, on the port MLFLOW_TRACKING_URI names.
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    port_names = {p["name"] for p in c["ports"]}
    uri_port = int(by_name("ConfigMap")["matting-env"]["data"]["MLFLOW_TRACKING_URI"].rsplit(":", 1)[1])
    assert any(p["port"] == uri_port and p["targetPort"] in port_names for p in service["spec"]["ports"])



def test_mlflow_server_accepts_the_host_names_clients_use():
    # MLflow 3 answers 403 to a Host header outside its allowed list; check with its own matcher.
    from mlflow.server.security_utils import is_allowed_host_header

    hosts = by_name("ConfigMap")["mlflow-server"]["data"]["MLFLOW_SERVER_ALLOWED_HOSTS"]
    allowed = [h.strip() for h in hosts.split(",")]
    in_cluster = urllib.parse.urlsplit(by_name("ConfigMap")["matting-env"]["data"]["MLFLOW_TRACKING_URI"]).netloc
    for host in (in_cluster, "mlflow.matting.svc.cluster.local:5000", "localhost:5000"):  # last: port-forward
        assert is_allowed_host_header(allowed, host), host
    assert not is_allowed_host_header(allowed, "evil.example.com")


# -- consistent with jobs/ (the DESIGN.md job-spec format) -----------------------------------

def job_spec(cmd: str) -> dict:
    """jobs/<cmd>.yaml, read as DESIGN.md's job spec (command, config, runtime_env, secrets)."""
    return yaml.safe_load((JOBS / f"{cmd}.yaml").read_text())


@pytest.mark.parametrize("cmd", COMMANDS)
def test_rayjob_entrypoint_runs_the_job_spec_of_its_command(cmd):
    argv = shlex.split(rayjobs()[cmd]["spec"]["entrypoint"])
    assert argv == ["matting", cmd, "--config", f"jobs/{cmd}.yaml"]
    assert (ROOT / argv[3]).is_file()
    spec = job_spec(cmd)
    assert spec.get("command") == cmd, f"jobs/{cmd}.yaml: command is {spec.get('command')!r}"


@pytest.mark.parametrize("cmd", COMMANDS)
def test_rayjob_provides_every_variable_the_job_spec_names(cmd):
    spec, job = job_spec(cmd), rayjobs()[cmd]
    env_vars = (spec.get("runtime_env") or {}).get("env_vars") or {}
    needed = set(spec.get("secrets") or []) | set(env_vars)
    assert "secrets" in spec and "runtime_env" in spec, f"jobs/{cmd}.yaml is not a job spec"
    job_env = (yaml.safe_load(job["spec"].get("runtimeEnvYAML") or "{}") or {}).get("env_vars") or {}
    for where, c in ray_containers():
        if where.startswith(f"rayjobs/{cmd}.yaml:"):
            missing = needed - env_names(c) - set(job_env)
            assert not missing, f"{where}: jobs/{cmd}.yaml needs {sorted(missing)}"
    # The same env_vars as the spec, and no working_dir: the image holds the code (a local path would
    # be uploaded from the submitter pod).
    runtime_env = yaml.safe_load(job["spec"]["runtimeEnvYAML"])
    assert {k: str(v) for k, v in job_env.items()} == {k: str(v) for k, v in env_vars.items()}
    assert "working_dir" not in runtime_env
    for name in set(spec.get("secrets") or []):
        assert name not in job_env, f"secret {name} given a value in runtimeEnvYAML"
