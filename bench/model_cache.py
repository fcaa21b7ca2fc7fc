"""The selfie prior model for benchmarks: the model cache's, else `../shared/models` linked into a temporary cache."""
from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

SELFIE = Path(__file__).resolve().parents[2] / "shared" / "models" / "selfie_segmentation_landscape.tflite"


def ensure_model_cache() -> None:
    """Make the selfie model findable (MATTING_MODEL_CACHE, inherited by child commands and Ray workers), or exit."""
    from matting_core.prior import SELFIE_MODEL_NAME, model_cache_dir

    if (model_cache_dir() / SELFIE_MODEL_NAME).is_file():
        return
    if not SELFIE.is_file():
        sys.exit(f"selfie model absent: run `matting fetch-models` (or provide {SELFIE})")
    cache = Path(tempfile.mkdtemp(prefix="bench-models-"))
    (cache / SELFIE_MODEL_NAME).symlink_to(SELFIE)
    os.environ["MATTING_MODEL_CACHE"] = str(cache)
