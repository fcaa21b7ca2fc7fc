"""KubeRay's ray.io/v1 RayCluster and RayJob fields as a JSON Schema, and a validator for manifests.

No package validates KubeRay's CRDs offline, so this is the subset of the API a manifest may write
(ray-operator/apis/ray/v1/{raycluster,rayjob}_types.go, KubeRay 1.4+, as ../shared/STACK.md lists
it): field names, types, required fields, no unknown fields. What the schema cannot say (min <=
max replicas, unique group names, the runtime env being YAML) is checked in `kuberay_errors`, and
every pod template inside is validated as a core PodTemplateSpec with kubernetes-validate.
"""
from __future__ import annotations

import functools
import json
from typing import Any, Iterator

import jsonschema
import kubernetes_validate
import yaml

# The Kubernetes API the manifests target (kubernetes-validate ships schemas for 1.25 to 1.37).
K8S_VERSION = "1.33.0"

_INT32 = {"type": "integer", "minimum": -(2**31), "maximum": 2**31 - 1}
_COUNT = {"type": "integer", "minimum": 0, "maximum": 2**31 - 1}
_STR_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
# A Kubernetes quantity ("500m", "8Gi", 1); the full grammar is checked in the pod templates.
_QUANTITY = {"anyOf": [{"type": "string", "pattern": r"^[+-]?[0-9.]+([eE][+-]?[0-9]+|[numkKMGTPE]i?)?$"},
                       {"type": "number"}]}
_RESOURCES = {"type": "object", "additionalProperties": False, "properties": {
    "requests": {"type": "object", "additionalProperties": _QUANTITY},
    "limits": {"type": "object", "additionalProperties": _QUANTITY}}}
# Core objects embedded in KubeRay types; their contents are validated by kubernetes-validate.
_CORE = {"type": "object"}
_CORE_LIST = {"type": "array", "items": {"type": "object"}}

SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "$defs": {
        "metadata": {
            "type": "object", "additionalProperties": False,
            "properties": {"name": {"type": "string", "minLength": 1}, "generateName": {"type": "string"},
                           "namespace": {"type": "string"}, "labels": _STR_MAP, "annotations": _STR_MAP},
            "anyOf": [{"required": ["name"]}, {"required": ["generateName"]}],
        },
        "autoscalerOptions": {
            "type": "object", "additionalProperties": False,
            "properties": {
                "resources": _RESOURCES, "image": {"type": "string"},
                "imagePullPolicy": {"enum": ["Always", "Never", "IfNotPresent"]},
                "env": _CORE_LIST, "envFrom": _CORE_LIST, "volumeMounts": _CORE_LIST,
                "securityContext": _CORE, "idleTimeoutSeconds": _COUNT,
                "upscalingMode": {"enum": ["Default", "Aggressive", "Conservative"]},
                "version": {"enum": ["v1", "v2"]},
            },
        },
        "headGroupSpec": {
            "type": "object", "additionalProperties": False, "required": ["template"],
            "properties": {
                "serviceType": {"enum": ["ClusterIP", "NodePort", "LoadBalancer"]},
                "headService": _CORE, "enableIngress": {"type": "boolean"},
                "rayStartParams": _STR_MAP, "template": _CORE,
            },
        },
        "workerGroupSpec": {
            "type": "object", "additionalProperties": False, "required": ["groupName", "template"],
            "properties": {
                "groupName": {"type": "string", "minLength": 1},
                "replicas": _COUNT, "minReplicas": _COUNT, "maxReplicas": _COUNT,
                "numOfHosts": {"type": "integer", "minimum": 1, "maximum": 2**31 - 1},
                "idleTimeoutSeconds": _COUNT, "suspend": {"type": "boolean"},
                "rayStartParams": _STR_MAP, "template": _CORE,
                "scaleStrategy": {"type": "object", "additionalProperties": False, "properties": {
                    "workersToDelete": {"type": "array", "items": {"type": "string"}}}},
            },
        },
        "rayClusterSpec": {
            "type": "object", "additionalProperties": False, "required": ["headGroupSpec"],
            "properties": {
                "rayVersion": {"type": "string"},
                "enableInTreeAutoscaling": {"type": "boolean"},
                "autoscalerOptions": {"$ref": "#/$defs/autoscalerOptions"},
                "headGroupSpec": {"$ref": "#/$defs/headGroupSpec"},
                "workerGroupSpecs": {"type": "array", "items": {"$ref": "#/$defs/workerGroupSpec"}},
                "headServiceAnnotations": _STR_MAP, "suspend": {"type": "boolean"},
            },
        },
        "rayJobSpec": {
            "type": "object", "additionalProperties": False,
            "properties": {
                "entrypoint": {"type": "string", "minLength": 1},
                "runtimeEnvYAML": {"type": "string"},
                "submissionMode": {"enum": ["K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode"]},
                "rayClusterSpec": {"$ref": "#/$defs/rayClusterSpec"},
                "clusterSelector": _STR_MAP,
                "shutdownAfterJobFinishes": {"type": "boolean"},
                "ttlSecondsAfterFinished": _COUNT,
                "activeDeadlineSeconds": {"type": "integer", "minimum": 1, "maximum": 2**31 - 1},
                "backoffLimit": _COUNT,
                "entrypointNumCpus": {"type": "number", "minimum": 0},
                "entrypointNumGpus": {"type": "number", "minimum": 0},
                "entrypointResources": {"type": "string"},
                "suspend": {"type": "boolean"},
                "jobId": {"type": "string"},
                "metadata": _STR_MAP,
                "submitterPodTemplate": _CORE,
                "submitterConfig": {"type": "object", "additionalProperties": False,
                                    "properties": {"backoffLimit": _INT32}},
            },
            # A job runs on the cluster it brings up or on a running one it selects, never both.
            "oneOf": [{"required": ["rayClusterSpec"]}, {"required": ["clusterSelector"]}],
            # KubeRay reads the TTL only when it deletes the cluster after the job.
            "dependentSchemas": {"ttlSecondsAfterFinished": {
                "required": ["shutdownAfterJobFinishes"],
                "properties": {"shutdownAfterJobFinishes": {"const": True}}}},
        },
    },
    "type": "object", "additionalProperties": False,
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {"apiVersion": {"const": "ray.io/v1"}, "kind": {"enum": ["RayCluster", "RayJob"]},
                   "metadata": {"$ref": "#/$defs/metadata"}, "spec": {"type": "object"}},
    "allOf": [
        {"if": {"properties": {"kind": {"const": "RayCluster"}}},
         "then": {"properties": {"spec": {"$ref": "#/$defs/rayClusterSpec"}}}},
        {"if": {"properties": {"kind": {"const": "RayJob"}}},
         "then": {"properties": {"spec": {"$ref": "#/$defs/rayJobSpec"}}}},
    ],
}

_VALIDATOR = jsonschema.Draft202012Validator(SCHEMA)


def cluster_specs(doc: dict) -> Iterator[dict]:
    """The RayClusterSpec(s) of a RayCluster or RayJob manifest."""
    spec = doc.get("spec") or {}
    if doc.get("kind") == "RayCluster":
        yield spec
    elif isinstance(spec.get("rayClusterSpec"), dict):
        yield spec["rayClusterSpec"]


def pod_templates(doc: dict) -> Iterator[tuple[str, dict]]:
    """(path, PodTemplateSpec) for every pod template in a Ray manifest."""
    spec = doc.get("spec") or {}
    if doc.get("kind") == "RayJob" and isinstance(spec.get("submitterPodTemplate"), dict):
        yield "spec.submitterPodTemplate", spec["submitterPodTemplate"]
    prefix = "spec.rayClusterSpec" if doc.get("kind") == "RayJob" else "spec"
    for cluster in cluster_specs(doc):
        head = cluster.get("headGroupSpec") or {}
        if isinstance(head.get("template"), dict):
            yield f"{prefix}.headGroupSpec.template", head["template"]
        for i, group in enumerate(cluster.get("workerGroupSpecs") or []):
            if isinstance(group, dict) and isinstance(group.get("template"), dict):
                yield f"{prefix}.workerGroupSpecs[{i}].template", group["template"]


def core_error(doc: dict) -> str | None:
    """kubernetes-validate's strict verdict on a core object: None when valid, else path and error."""
    return _core_error(json.dumps(doc, sort_keys=True))


@functools.lru_cache(maxsize=None)
def _core_error(doc_json: str) -> str | None:
    # Cached by content: each call re-reads the schema files, and tests validate the same pods often.
    try:
        kubernetes_validate.validate(json.loads(doc_json), K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as e:
        return f"{'.'.join(str(p) for p in e.path)}: {e.message}"
    return None


def pod_template_error(template: dict) -> str | None:
    """kubernetes-validate's (strict) verdict on a PodTemplateSpec: None when valid, else the error."""
    wrapped = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "check"}, "template": template}
    err = core_error(wrapped)
    return None if err is None else err.removeprefix("template.")


def _cross_field_errors(cluster: dict, prefix: str) -> Iterator[str]:
    names = [g.get("groupName") for g in cluster.get("workerGroupSpecs") or []]
    for name in {n for n in names if names.count(n) > 1}:
        yield f"{prefix}.workerGroupSpecs: groupName {name!r} is used twice"
    for i, group in enumerate(cluster.get("workerGroupSpecs") or []):
        lo, hi = group.get("minReplicas", 0), group.get("maxReplicas", 2**31 - 1)
        if lo > hi:
            yield f"{prefix}.workerGroupSpecs[{i}]: minReplicas {lo} > maxReplicas {hi}"
        if "replicas" in group and not lo <= group["replicas"] <= hi:
            yield f"{prefix}.workerGroupSpecs[{i}]: replicas {group['replicas']} outside [{lo}, {hi}]"


def kuberay_errors(doc: dict) -> list[str]:
    """Every way a RayCluster/RayJob manifest departs from the ray.io/v1 API (empty when valid)."""
    errors = [f"{'.'.join(str(p) for p in e.absolute_path) or '<root>'}: {e.message}"
              for e in _VALIDATOR.iter_errors(doc)]
    if errors:
        return errors  # the checks below assume the shapes the schema guarantees
    prefix = "spec.rayClusterSpec" if doc["kind"] == "RayJob" else "spec"
    for cluster in cluster_specs(doc):
        errors += _cross_field_errors(cluster, prefix)
    runtime_env = doc["spec"].get("runtimeEnvYAML") if doc["kind"] == "RayJob" else None
    if runtime_env is not None:
        try:
            parsed = yaml.safe_load(runtime_env)
        except yaml.YAMLError as e:
            parsed = e
        if not isinstance(parsed, dict):
            errors.append(f"spec.runtimeEnvYAML: not a YAML mapping ({parsed!r:.80})")
    for path, template in pod_templates(doc):
        if (err := pod_template_error(template)) is not None:
            errors.append(f"{path}.{err}")
    return errors
