"""MattingNet checkpoints: weights and config in one file, loaded without unpickling arbitrary objects.

The file is a `torch.save` of `{"format", "version", "config" (JSON text), "state_dict", "extra"}`
and is read back with `torch.load(weights_only=True)`, which only rebuilds tensors and plain
containers. Paths may be any URI `matting_core.storage` opens (local, file://, s3://).
"""
from __future__ import annotations

import io
import json
from typing import Any, Dict, Mapping, Optional

import torch

from matting_core import storage
from matting_core.model.net import MattingNet
from matting_core.prior import LEGACY_SMOOTHER_SPEC, resolve_prior_spec

__all__ = ["CheckpointError", "save_checkpoint", "load_checkpoint", "read_checkpoint", "FORMAT", "VERSION"]

FORMAT = "matting-checkpoint"
VERSION = 1
_PLAIN = (str, int, float, bool, type(None), torch.Tensor)


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable or not a MattingNet checkpoint."""


def _check_plain(value: Any, where: str) -> None:
    if isinstance(value, Mapping):
        for k, v in value.items():
            if not isinstance(k, (str, int)):
                raise TypeError(f"{where}: key {k!r} is not a str or int")
            _check_plain(v, f"{where}.{k}")
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _check_plain(v, f"{where}[{i}]")
    elif not isinstance(value, _PLAIN):
        raise TypeError(f"{where}: {type(value).__name__} cannot be loaded with weights_only=True; "
                        f"store tensors, numbers, strings, lists and dicts only")


def save_checkpoint(net: MattingNet, path: str, extra: Optional[Dict[str, Any]] = None) -> None:
    """Write `net`'s weights, its config (prior included) and `extra` to `path` atomically.

    `extra` may hold tensors, numbers, strings, lists and dicts (for example an optimizer state
    dict or the step); anything else is refused here rather than failing at load time.
    """
    if getattr(net, "inference_optimized", False):
        raise ValueError("save_checkpoint: this MattingNet went through optimize_for_inference (batch norms "
                         "folded), so its weights no longer fit its config; save the original net instead")
    extra = dict(extra or {})
    _check_plain(extra, "extra")
    payload = {
        "format": FORMAT,
        "version": VERSION,
        "config": json.dumps(net.config, sort_keys=True),
        "state_dict": {k: v.detach().cpu() for k, v in net.state_dict().items()},
        "extra": extra,
    }
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    storage.write_bytes_atomic(path, buffer.getvalue())


def read_checkpoint(path: str, map_location: Any = "cpu", data: bytes | None = None) -> Dict[str, Any]:
    """The checkpoint at `path` as `{"config": dict, "state_dict": ..., "extra": dict}`.

    With `data`, the checkpoint's bytes already read (shared between processes): `path` then only
    names it in messages.
    """
    try:
        data = storage.read_bytes(path) if data is None else data
    except FileNotFoundError as exc:
        raise CheckpointError(f"checkpoint {path}: no such file") from exc
    except OSError as exc:
        raise CheckpointError(f"checkpoint {path}: cannot be read ({exc})") from exc
    try:
        payload = torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises several types for truncated, foreign or unsafe files
        raise CheckpointError(f"checkpoint {path}: corrupt or not a torch checkpoint ({exc})") from exc
    if not isinstance(payload, Mapping) or payload.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {path}: not a MattingNet checkpoint (no '{FORMAT}' header); "
                              f"save one with matting_core.model.save_checkpoint")
    if int(payload.get("version", 0)) > VERSION:
        raise CheckpointError(f"checkpoint {path}: format version {payload['version']} is newer than "
                              f"this code reads ({VERSION}); upgrade the package")
    try:
        config = json.loads(payload["config"])
    except (KeyError, TypeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"checkpoint {path}: config is missing or not JSON ({exc})") from exc
    return {"config": config, "state_dict": payload.get("state_dict", {}), "extra": dict(payload.get("extra") or {})}


def load_checkpoint(path: str, map_location: Any = "cpu", data: bytes | None = None) -> MattingNet:
    """Rebuild the `MattingNet` saved at `path` (or in `data`, see `read_checkpoint`), in eval mode.

    Its `extra` is on `net.checkpoint_extra`.
    """
    ckpt = read_checkpoint(path, map_location, data)
    config = dict(ckpt["config"])
    config.setdefault("arch", 1)  # written before architecture versions existed
    config.setdefault("prior_calibration", 0)  # written before the calibration existed
    if (config.get("prior") or {}).get("version") is None:
        # Written before priors were recorded in full: such a model met the smoother's settings of then.
        config["prior"] = resolve_prior_spec(config.get("prior"), smoother_defaults=LEGACY_SMOOTHER_SPEC)
    try:
        net = MattingNet(**config)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"checkpoint {path}: config does not fit MattingNet ({exc})") from exc
    try:
        net.load_state_dict(ckpt["state_dict"])
    except RuntimeError as exc:
        raise CheckpointError(f"checkpoint {path}: weights do not fit its config ({exc})") from exc
    net.checkpoint_extra = ckpt["extra"]
    net.to(map_location if isinstance(map_location, (str, torch.device)) else "cpu")
    return net.eval()
