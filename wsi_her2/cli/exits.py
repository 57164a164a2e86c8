"""How every command ends: one table of exit codes and one way to report an error.

An error is one line on stderr, ``wsi-her2 COMMAND: error: WHAT`` (what happened, why, what to do:
the messages of :mod:`wsi_her2.errors` say all three and name the file). A command that stops on an
error exits :attr:`ExitCode.ERROR`; a command over several items (``tile``, ``score``, ``verify``)
reports each failed item the same way, goes on with the others and exits :attr:`ExitCode.PROBLEMS`, as
a command that checks something and finds a problem does (``verify``, ``info``, ``status``, ``models --inspect``).
The README's exit-code table is this enum.
"""
from __future__ import annotations

import sys
from enum import IntEnum
from typing import Any, Callable, Iterable, Iterator

from wsi_her2.errors import WsiHer2Error

__all__ = ["REPORTED_ERRORS", "EachItem", "ExitCode", "error_line", "report_error"]

#: What a command reports as one line (anything else is a bug: a traceback).
REPORTED_ERRORS = (WsiHer2Error, OSError)


class ExitCode(IntEnum):
    OK = 0  # done
    PROBLEMS = 1  # some items failed (each reported, the others done), or what was checked has a problem
    ERROR = 2  # the command could not run: a bad option or input, damaged data, a failed write
    UNFINISHED = 3  # status, run: slides still pending or running (another runner, or stopped)
    INTERRUPTED = 130  # Ctrl+C: re-run the same command to resume


def error_line(command: str, error: BaseException | str, *, item: Any = None) -> str:
    """The one line an error is reported as. A wsi-her2 error names its file itself; another one (an
    ``OSError``: a full disk, no permission) is prefixed with the item it happened to."""
    what = str(error) if isinstance(error, (str, WsiHer2Error)) or item is None else f"{item}: {error}"
    return f"wsi-her2 {command}: error: {what}"


def report_error(command: str, error: BaseException | str, *, item: Any = None) -> None:
    print(error_line(command, error, item=item), file=sys.stderr)


class EachItem:
    """Run ``work`` on each of ``items`` (slides, stores), yielding ``(item, result)``.

    An error of one item (:data:`REPORTED_ERRORS`) is reported (:func:`report_error`) and counted in
    :attr:`failed`; the other items go on. :meth:`exit_code` prints the summary line and returns
    :attr:`ExitCode.OK` when all are done, :attr:`ExitCode.PROBLEMS` otherwise.
    """

    def __init__(self, command: str, items: Iterable[Any], work: Callable[[Any], Any], *, noun: str) -> None:
        self.command, self.items, self.work, self.noun = command, list(items), work, noun
        self.failed = 0

    def __iter__(self) -> Iterator[tuple[Any, Any]]:
        for item in self.items:
            try:
                result = self.work(item)
            except REPORTED_ERRORS as exc:
                self.failed += 1
                report_error(self.command, exc, item=item)
                continue
            yield item, result

    def exit_code(self) -> ExitCode:
        if not self.failed:
            return ExitCode.OK
        print(f"wsi-her2 {self.command}: {self.failed} of {len(self.items)} {self.noun} failed", file=sys.stderr)
        return ExitCode.PROBLEMS
