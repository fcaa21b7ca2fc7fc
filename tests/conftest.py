"""Shared fixtures: the sample data beside the repo, a real S3 server, a local Ray runtime."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("MATTING_SHARED_DIR", REPO.parent / "shared"))

os.environ.setdefault("RAY_AUTH_MODE", "disabled")


def shared_path(*parts: str) -> Path:
    """A path under ../shared, or skip the test with a message when it is absent."""
    p = SHARED.joinpath(*parts)
    if not p.exists():
        pytest.skip(f"sample data absent: {p} (tests that need ../shared/data skip without it)")
    return p


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data (skips when absent)."""
    return shared_path("data")


@pytest.fixture(scope="session")
def selfie_model_cache(tmp_path_factory) -> Path:
    """A model cache holding the offline selfie model from ../shared/models (skips when absent)."""
    src = shared_path("models", "selfie_segmentation_landscape.tflite")
    cache = tmp_path_factory.mktemp("model-cache")
    (cache / src.name).symlink_to(src)
    return cache


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A real SeaweedFS S3 server on free loopback ports, with a bucket `test`.

    Sets AWS_* in this process's environment (Ray workers started later inherit it).
    """
    from infra.s3_local import LocalS3

    env = {"AWS_ACCESS_KEY_ID": "testkey", "AWS_SECRET_ACCESS_KEY": "testsecret", "AWS_DEFAULT_REGION": "us-east-1"}
    saved = {k: os.environ.get(k) for k in [*env, "AWS_ENDPOINT_URL"]}
    os.environ.update(env)
    server = LocalS3(tmp_path_factory.mktemp("s3"))
    server.start()
    os.environ["AWS_ENDPOINT_URL"] = server.endpoint
    import s3fs

    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": server.endpoint})
    fs.mkdir("test")
    yield server
    server.stop()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="session")
def ray_runtime(s3_server):
    """A local Ray runtime with 2 CPUs for the whole session (started after S3 so workers inherit its env)."""
    import ray

    from pipelines.ray_runtime import ensure_ray

    ensure_ray(num_cpus=2)  # as the CLI starts it (runtime env, worker setup hook)
    yield ray
    ray.shutdown()
