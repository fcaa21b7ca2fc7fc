"""Resolve a model reference (local checkpoint or MLflow registry URI) to a loaded `MattingNet`.

REF is a local checkpoint path (or a folder holding one `*.pt`), any URI `matting_core.storage`
opens, `models:/NAME@ALIAS` or `models:/NAME/VERSION`. Registry references are downloaded with
`mlflow.artifacts.download_artifacts` (MLflow is imported only then) from `MLFLOW_TRACKING_URI`,
or the local default `sqlite:///mlflow.db` in the working directory.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from matting_core.redaction import redact

if TYPE_CHECKING:
    import torch

    from matting_core.model import MattingNet

__all__ = ["ModelRefError", "load_model", "tracking_uri", "is_registry_ref", "find_checkpoint", "pin_model",
           "checkpoint_bytes"]

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
_PREFERRED = ("model.pt", "checkpoint.pt")


class ModelRefError(ValueError):
    """A model reference that cannot be resolved to a checkpoint."""


def tracking_uri() -> str:
    """The MLflow store: `MLFLOW_TRACKING_URI`, else `sqlite:///mlflow.db` in the working directory."""
    return os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


def is_registry_ref(ref: str) -> bool:
    """Whether `ref` names a registered model (`models:/...`)."""
    return str(ref).startswith("models:/")


def pin_model(ref: str) -> tuple[str, str | None]:
    """(`ref` with an alias resolved to its version, that version) for `models:/NAME@ALIAS`; others as given.

    A job that runs for hours resolves the alias once, so moving it meanwhile changes nothing.
    """
    ref = str(ref)
    if not is_registry_ref(ref):
        return ref, None
    body = ref[len("models:/"):]
    if "@" in body:
        name, alias = body.split("@", 1)
        try:
            from mlflow.tracking import MlflowClient

            version = MlflowClient(tracking_uri(), registry_uri=tracking_uri()).get_model_version_by_alias(name, alias)
        except Exception as exc:  # MlflowException and store errors: say which store was asked
            raise ModelRefError(redact(f"model {ref}: cannot be resolved in the MLflow store {tracking_uri()} "
                                       f"({exc})")) from exc
        return f"models:/{name}/{version.version}", str(version.version)
    name, _, version = body.partition("/")
    return ref, version or None


def checkpoint_bytes(ref: str) -> bytes:
    """The checkpoint file `ref` names (downloaded once for a registry reference), as bytes."""
    from matting_core import storage

    ref = str(ref)
    if is_registry_ref(ref):
        with tempfile.TemporaryDirectory(prefix="matting-model-") as tmp:
            return find_checkpoint(_download(ref, tmp), ref).read_bytes()
    local = storage.local_path(ref)
    if local is not None and os.path.isdir(local):
        return find_checkpoint(local, ref).read_bytes()
    try:
        return storage.read_bytes(ref)
    except FileNotFoundError as exc:
        raise ModelRefError(f"model {ref}: no such checkpoint") from exc


def find_checkpoint(folder: str | Path, ref: str | None = None) -> Path:
    """The one checkpoint (`*.pt`) under `folder`; `model.pt`/`checkpoint.pt` win when there are several."""
    found = sorted(Path(folder).rglob("*.pt"))
    where = ref or str(folder)
    if not found:
        raise ModelRefError(f"model {where}: no checkpoint (*.pt) found in {folder}")
    if len(found) == 1:
        return found[0]
    preferred = [p for p in found if p.name in _PREFERRED]
    if len(preferred) == 1:
        return preferred[0]
    names = ", ".join(str(p.relative_to(folder)) for p in found[:5])
    raise ModelRefError(f"model {where}: several checkpoints ({names}); name one of them model.pt or pass its path")


def _download(ref: str, dst: str) -> Path:
    try:
        import mlflow.artifacts
    except ImportError as exc:
        raise ModelRefError(f"model {ref}: registry references need mlflow (pip install mlflow)") from exc
    uri = tracking_uri()
    try:
        local = mlflow.artifacts.download_artifacts(artifact_uri=ref, dst_path=dst, tracking_uri=uri,
                                                    registry_uri=uri)
    except Exception as exc:  # MlflowException and store errors: say which store was asked
        raise ModelRefError(redact(f"model {ref}: cannot be resolved in the MLflow store {uri} ({exc})")) from exc
    return Path(local)


def load_model(ref: str, device: "str | torch.device" = "cpu") -> "MattingNet":
    """Load the `MattingNet` that `ref` names onto `device`, in eval mode."""
    from matting_core import storage
    from matting_core.model import load_checkpoint

    ref = str(ref)
    if is_registry_ref(ref):
        with tempfile.TemporaryDirectory(prefix="matting-model-") as tmp:
            path = find_checkpoint(_download(ref, tmp), ref)
            net = load_checkpoint(str(path))
    else:
        local = storage.local_path(ref)
        if local is not None and os.path.isdir(local):
            ref = str(find_checkpoint(local, ref))
        net = load_checkpoint(ref)
    from matting_core.runtime import resolve_device

    return net.to(resolve_device(device)).eval()
