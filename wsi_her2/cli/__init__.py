"""Command-line entry point: ``wsi-her2 <command> ...``.

The CLI only parses, validates and delegates. Each command lives in its own module under
``wsi_her2.cli`` exposing ``register(subparsers)``; heavy imports (torch, dask, zarr) happen
inside the command's ``run`` so that ``wsi-her2 --help`` stays instant.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import sys
from typing import Sequence

from wsi_her2 import __version__
from wsi_her2.cli.exits import REPORTED_ERRORS, ExitCode, report_error

# Order here is the order shown in --help.
COMMAND_MODULES = (
    "demo",
    "info",
    "tile",
    "score",
    "verify",
    "calibrate",
    "models",
    "run",
    "status",
    "review",
    "train",
    "evaluate",
    "explain",
    "app",
)

log = logging.getLogger("wsi_her2")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="wsi-her2",
        description="Whole-slide HER2 scoring: tile slides, score tiles, write QuPath overlays.",
    )
    parser.add_argument("--version", action="version", version=f"wsi-her2 {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv: debug)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(f"wsi_her2.cli.{name}")
        except ModuleNotFoundError as exc:  # a command whose module is not part of this build
            if exc.name == f"wsi_her2.cli.{name}":
                continue
            raise
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; its exit code (:class:`~wsi_her2.cli.exits.ExitCode`). Every error the command raises
    on purpose, and every ``OSError``, is one line on stderr (:func:`~wsi_her2.cli.exits.report_error`)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    level = (logging.WARNING, logging.INFO, logging.DEBUG)[min(args.verbose, 2)]
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    if not getattr(args, "func", None):
        parser.print_help()
        return ExitCode.ERROR
    try:
        return int(args.func(args) or ExitCode.OK)
    except REPORTED_ERRORS as exc:
        report_error(args.command, exc)
        return ExitCode.ERROR
    except KeyboardInterrupt:
        print(f"wsi-her2 {args.command}: interrupted; re-run the same command to resume", file=sys.stderr)
        return ExitCode.INTERRUPTED


def entry() -> int:
    """The ``wsi-her2`` console script: :func:`main`, then ready the process to exit quickly.

    ``gc.freeze()`` moves every object left to the permanent generation, so the collections of
    interpreter shutdown do not walk them all: after a ``score`` run (torch imported) exit took
    0.56 s, with the freeze 0.18 s. Only here, where the process ends next; never in
    :func:`main`, which tests and other programs call in a process that goes on.
    """
    import gc

    code = main()
    gc.freeze()
    return code


if __name__ == "__main__":  # pragma: no cover
    sys.exit(entry())
