"""The one error type for bad input: it names the file and the reason, and a job skips only it."""
from __future__ import annotations


class InputError(Exception):
    """An input that cannot be used: `uri` names the file, `reason` says why."""

    def __init__(self, uri: str, reason: str):
        super().__init__(f"{uri}: {reason}")
        self.uri, self.reason = uri, reason

    def __reduce__(self):
        # Ray sends a worker's exception to the driver pickled; the default rebuilds it from the
        # one formatted message, which this constructor does not take.
        return type(self), (self.uri, self.reason)
