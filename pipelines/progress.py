"""A progress bar on a terminal, silent elsewhere (logs and CI stay readable)."""
from __future__ import annotations

import sys


class Progress:
    """tqdm when `enabled` and stderr is a terminal; otherwise a no-op with the same methods."""

    def __init__(self, total: int, unit: str, desc: str, enabled: bool = True):
        self._bar = None
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=total, unit=unit, desc=desc, dynamic_ncols=True, smoothing=0.1)

    def update(self, n: int = 1) -> None:
        """Advance by `n` items."""
        if self._bar is not None:
            self._bar.update(n)

    def set_postfix(self, **values) -> None:
        """Show `values` after the bar (videos done/total, ...)."""
        if self._bar is not None:
            self._bar.set_postfix(values, refresh=False)

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        if self._bar is not None:
            self._bar.close()
