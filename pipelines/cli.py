"""The `matting` command line: one subcommand per job, each in its own module.

Exit status (DESIGN.md): 0 everything produced, 3 partial, 2 usage error, 1 failure.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

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
    try:
        return int(args.run(args) or 0)
    except (UsageError, ConfigError) as exc:
        print(f"matting {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"matting {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
