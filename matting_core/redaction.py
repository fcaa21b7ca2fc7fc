"""Secrets out of everything written: messages, configs, manifests, result.json, MLflow params.

A URI's user-info (`http://user:password@host`, `s3://KEY:SECRET@bucket`, `https://TOKEN@host`)
and the values of query parameters that carry credentials (`?token=`, `&X-Amz-Signature=`, ...)
become `***`, wherever they stand in a text.
"""
from __future__ import annotations

import re
from typing import Any, TextIO

__all__ = ["MASK", "redact", "redact_config", "RedactingStream"]

MASK = "***"
# user-info cannot hold '/', '@', whitespace or quotes, so the match never crosses into the path
_USERINFO = re.compile(r"(\b[A-Za-z][A-Za-z0-9+.-]*://)[^/\s@'\"<>]+@")
_SECRET_QUERY = re.compile(
    r"([?&][A-Za-z0-9_.-]*(?:token|secret|passw(?:or)?d|signature|sig|credential|api[_-]?key|access[_-]?key)"
    r"[A-Za-z0-9_.-]*=)[^&\s'\"<>]+", re.IGNORECASE)


def redact(text: str) -> str:
    """`text` with the user-info of every URI in it, and credential query values, replaced by `***`."""
    if "://" not in text and "=" not in text:
        return text
    return _SECRET_QUERY.sub(r"\1" + MASK, _USERINFO.sub(r"\1" + MASK + "@", text))


def redact_config(value: Any) -> Any:
    """A copy of a (nested) dict/list/str structure with every string passed through `redact`."""
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {redact_config(k): redact_config(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(redact_config(v) for v in value)
    return value


class RedactingStream:
    """A text stream that writes through `redact` (stdout/stderr of the CLI, so no message leaks)."""

    def __init__(self, stream: TextIO):
        self._stream = stream

    def write(self, text: str) -> int:
        """Write `text` redacted; returns the length of `text`, as callers expect."""
        self._stream.write(redact(text))
        return len(text)

    def writelines(self, lines) -> None:
        """Write each line redacted."""
        for line in lines:
            self.write(line)

    def __getattr__(self, name: str) -> Any:  # isatty, fileno, flush, encoding, ... of the real stream
        return getattr(self._stream, name)
