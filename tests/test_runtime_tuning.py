"""Process tuning for matting on shared CPU cores: OpenMP's spin count must be set before torch loads."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

_PROBE = """
import json, os, sys
from pipelines.ray_runtime import GOMP_SPINCOUNT, tune_openmp
before = tune_openmp()
import torch
after = tune_openmp()
print(json.dumps({"before": before, "after": after, "env": os.environ.get("GOMP_SPINCOUNT"),
                  "default": GOMP_SPINCOUNT}))
"""


def _probe(env_extra: dict[str, str]) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "GOMP_SPINCOUNT"}
    env.update(env_extra)
    out = subprocess.run([sys.executable, "-c", _PROBE], cwd=ROOT, env=env, capture_output=True,
                         text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def test_tune_openmp_sets_spin_count_before_torch_only():
    r = _probe({})
    assert r["before"] is True and r["after"] is False  # effective only before torch is imported
    assert r["env"] == r["default"] == "1000"


def test_tune_openmp_keeps_a_users_setting():
    assert _probe({"GOMP_SPINCOUNT": "50000"})["env"] == "50000"
