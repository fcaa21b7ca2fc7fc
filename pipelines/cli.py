"""The `matting` command line: one subcommand per job, each in its own module.

Exit status (DESIGN.md): 0 everything produced, 3 partial, 2 usage error, 1 failure; 130 after
Ctrl-C (SIGINT) and 143 after SIGTERM, both of which abort outputs as an error does. A storage fault
(`StorageError`) or an unusable output location is one line on stderr and exit 1 (the traceback
only with -v).
"""
from __future__ import annotations

import argparse
import importlib
import logging
import os
import signal
import sys
import threading
import traceback

from pipelines.config import ConfigError

# subcommand -> module exposing `add_parser(subparsers)` and `run(args) -> int`
COMMANDS = {
    "generate": "pipelines.generate",
    "fetch-models": "pipelines.fetch_models",
    "matte": "pipelines.matte",
    "export": "pipelines.export",
    "make-benchmark": "pipelines.make_benchmark",
    "evaluate": "pipelines.evaluate",
    "infer": "pipelines.infer",
    "train": "pipelines.train",
    "promote": "pipelines.promote",
    "demo": "pipelines.demo",
    "submit": "pipelines.submit",
}

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_PARTIAL = 0, 1, 2, 3
EXIT_INTERRUPTED, EXIT_TERMINATED = 130, 143  # 128 + SIGINT, 128 + SIGTERM, as a shell reports them


class UsageError(Exception):
    """Bad flags or arguments: exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse exits 2 as well; keep its message format
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with every subcommand registered."""
    parser = _Parser(
        prog="matting",
        description="Temporally coherent person video matting: data generation, matting, evaluation.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name, module in COMMANDS.items():
        importlib.import_module(module).add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `matting` console script."""
    from matting_core.redaction import RedactingStream

    # Everything a command prints (its messages, logging, Ray's forwarded worker logs, a
    # traceback) passes through redaction, so a password inside a URI never reaches the terminal.
    saved = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = RedactingStream(sys.stdout), RedactingStream(sys.stderr)
    try:
        return _main(argv)
    finally:
        sys.stdout, sys.stderr = saved


def _main(argv: list[str] | None) -> int:
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    # MLflow draws a progress bar for every artifact it downloads (a model, a loss curve): in a
    # command's own output, a line of noise each
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help (0) or a usage error (2): a status, not an exception
        return int(exc.code or 0)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    if not args.command:
        parser.print_help()
        return EXIT_USAGE
    if not args.verbose:  # botocore's "Found credentials in environment variables" on every run
        for name in ("botocore.credentials", "aiobotocore.credentials"):
            logging.getLogger(name).setLevel(logging.WARNING)
    previous = _handle_sigterm()
    try:
        _check_storage_limits()
        return int(args.run(args) or 0)
    except (UsageError, ConfigError) as exc:
        print(f"matting {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt as exc:
        terminated = isinstance(exc, Terminated)
        print(f"matting {args.command}: {'terminated' if terminated else 'interrupted'}", file=sys.stderr)
        return EXIT_TERMINATED if terminated else EXIT_INTERRUPTED
    except Exception as exc:  # noqa: BLE001 - a storage or output fault is one line; anything else re-raised
        message = failure_message(exc)
        if message is None:
            raise
        print(f"matting {args.command}: {message}", file=sys.stderr)
        if args.verbose:
            traceback.print_exception(exc, file=sys.stderr)
        return EXIT_FAILED
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread as Ctrl-C is, so the same cleanup runs (outputs aborted, Ray shut down)."""


def _raise_terminated(signum, frame) -> None:
    raise Terminated()


def _handle_sigterm():
    """Make SIGTERM raise Terminated in the main thread; returns the handler it replaced (None: not installed)."""
    if threading.current_thread() is not threading.main_thread():
        return None  # signal handlers can only be set from the main thread
    return signal.signal(signal.SIGTERM, _raise_terminated)


def _check_storage_limits() -> None:
    from matting_core import storage

    try:
        storage.storage_limits()
    except ValueError as exc:
        raise UsageError(str(exc)) from exc


# output locations that cannot be used: what is wrong with the path, in words
_PATH_FAULTS = {PermissionError: "permission denied", NotADirectoryError: "a part of the path is a file, not a folder",
                IsADirectoryError: "is a folder, not a file"}


def failure_message(exc: BaseException) -> str | None:
    """One line (where: why) for a storage or file-location failure anywhere in `exc`'s causes, else None.

    Ray wraps a task's exception (its `cause`), so the chain is searched, not only `exc`.
    """
    from matting_core import storage
    from matting_core.redaction import redact

    chain = list(_causes(exc))
    for e in chain:
        if isinstance(e, storage.StorageError):
            return str(e)
    for e in chain:
        found = storage.as_storage_error(e)  # raw S3 errors from code that used a filesystem directly
        if found is not None:
            return str(found)
        if isinstance(e, OSError) and e.filename and not isinstance(e, FileNotFoundError):
            return f"{redact(e.filename)}: {_path_fault(e)}"
    return None


def _path_fault(exc: OSError) -> str:
    if isinstance(exc, FileExistsError):
        return "already exists" if os.path.isdir(exc.filename) else "is a file, where a folder is needed"
    for kind, words in _PATH_FAULTS.items():
        if isinstance(exc, kind):
            return words
    return (exc.strerror or str(exc)).lower()


def _causes(exc: BaseException | None):
    """`exc`, then what caused it (Ray's `cause`, `__cause__`, or the unsuppressed `__context__`)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        wrapped = getattr(exc, "cause", None)
        if isinstance(wrapped, BaseException):  # a Ray wrapper: also an instance of its cause's class, but its
            exc = wrapped                       # text is the worker's traceback; the cause is what to say
            continue
        yield exc
        exc = exc.__cause__ or (None if exc.__suppress_context__ else exc.__context__)


if __name__ == "__main__":
    sys.exit(main())
