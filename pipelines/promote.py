"""`matting promote NAME VERSION --alias ALIAS`: point a registry alias at a model version."""
from __future__ import annotations

import sys
from dataclasses import dataclass

from pipelines.config import option

EPILOG = """\
examples:
  matting promote matting 3 --alias champion      # matte/infer with models:/matting@champion use version 3
  MLFLOW_TRACKING_URI=http://mlflow:5000 matting promote matting 4 --alias champion
"""


@dataclass(frozen=True)
class PromoteConfig:
    """Which registered version an alias should name."""

    name: str = option("", "registered model name", positional=True, metavar="NAME")
    version: str = option("", "model version to promote", positional=True, metavar="VERSION")
    alias: str = option("champion", "alias to move")
    tracking_uri: str | None = option(None, "MLflow store (default: MLFLOW_TRACKING_URI, else ./mlflow.db)",
                                      metavar="URI")


def add_parser(subparsers):
    """Register `matting promote`."""
    from pipelines.config import add_command

    return add_command(subparsers, "promote", PromoteConfig, run, help="move a registry alias to a model version",
                       description="Point alias ALIAS of registered model NAME at VERSION and say what it named before.",
                       epilog=EPILOG)


def promote(cfg: PromoteConfig) -> tuple[str | None, str]:
    """Move the alias; returns (the version it named before or None, the version it names now)."""
    from mlflow.tracking import MlflowClient

    from pipelines.model_ref import tracking_uri
    from pipelines.train import absolute_tracking_uri, check_tracking

    uri = absolute_tracking_uri(cfg.tracking_uri or tracking_uri())
    check_tracking(uri)
    client = MlflowClient(uri, registry_uri=uri)
    client.get_model_version(cfg.name, str(cfg.version))  # a clear error for an unknown name or version
    try:
        before = client.get_model_version_by_alias(cfg.name, cfg.alias).version
    except Exception:  # the alias did not exist yet
        before = None
    client.set_registered_model_alias(cfg.name, cfg.alias, str(cfg.version))
    return before, str(cfg.version)


def run(args) -> int:
    """`matting promote`; returns the exit status."""
    from pipelines.cli import EXIT_FAILED, EXIT_OK
    from pipelines.config import from_args, require
    from pipelines.train import TrainRefused

    cfg = from_args(PromoteConfig, args)
    require(cfg, {"NAME": "name", "VERSION": "version"})
    try:
        before, now = promote(cfg)
    except TrainRefused as exc:
        print(f"matting promote: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except Exception as exc:  # MlflowException: unknown model or version
        print(f"matting promote: {cfg.name} version {cfg.version}: {exc}", file=sys.stderr)
        return EXIT_FAILED
    was = f"was version {before}" if before else "new alias"
    print(f"{cfg.name}@{cfg.alias} -> version {now} ({was})")
    return EXIT_OK
