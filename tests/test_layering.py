"""matting_core is a pure library: importing all of it must not pull in Ray or MLflow."""
import pkgutil
import subprocess
import sys
from pathlib import Path

import matting_core

REPO = Path(__file__).resolve().parents[1]


def test_matting_core_imports_neither_ray_nor_mlflow():
    modules = [m.name for m in pkgutil.walk_packages(matting_core.__path__, "matting_core.")]
    assert "matting_core.data.fakemotion" in modules and "matting_core.model" in modules
    code = ("import importlib, sys\n"
            f"for m in {modules!r}: importlib.import_module(m)\n"
            "bad = sorted(k for k in sys.modules if k.split('.')[0] in ('ray', 'mlflow'))\n"
            "print(','.join(bad))\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"matting_core pulled in: {out.stdout}"
