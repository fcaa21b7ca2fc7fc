"""Invariants a library config checks in `__post_init__`, as `ValueError("field: reason")`.

The message starts with the field's name so that a job config wrapping the library config (see
`pipelines.config`) can name the dotted key, or the command-line flag, at fault.
"""
from __future__ import annotations

__all__ = ["check_range", "check_size"]


def check_range(name: str, value: float, *, ge: float | None = None, gt: float | None = None,
                le: float | None = None, lt: float | None = None) -> None:
    """Raise ValueError naming `name` when `value` is outside the given bounds."""
    bounds = [(ge, ">=", value >= ge if ge is not None else True), (gt, ">", value > gt if gt is not None else True),
              (le, "<=", value <= le if le is not None else True), (lt, "<", value < lt if lt is not None else True)]
    if not all(ok for _, _, ok in bounds):
        wanted = " and ".join(f"{op} {b}" for b, op, _ in bounds if b is not None)
        raise ValueError(f"{name}: must be {wanted}, got {value!r}")


def check_size(name: str, size: tuple[int, int], minimum: int) -> None:
    """Raise ValueError naming `name` unless `size` is (W, H) with both sides at least `minimum` pixels."""
    if len(size) != 2:
        raise ValueError(f"{name}: must be WxH (two numbers), got {'x'.join(map(str, size)) or 'nothing'}")
    if min(size) < minimum:
        raise ValueError(f"{name}: both sides must be at least {minimum} pixels, got {size[0]}x{size[1]}")
