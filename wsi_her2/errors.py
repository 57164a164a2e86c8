"""One exception hierarchy for the whole package.

Every error the user can cause inherits :class:`WsiHer2Error` *and* the matching builtin, so
callers may catch either. Messages say what happened, why, and what to do; the CLI prints them
as one line and exits non-zero (:mod:`wsi_her2.cli.exits`).
"""
from __future__ import annotations


class WsiHer2Error(Exception):
    """Base class of every error raised on purpose by wsi-her2."""


class SlideNotFoundError(WsiHer2Error, FileNotFoundError):
    """The slide path does not exist or is not a regular file."""


class SlideOpenError(WsiHer2Error, OSError):
    """No reader backend could open the slide (corrupt, truncated or unsupported format)."""


class MppMissingError(WsiHer2Error, ValueError):
    """The slide carries no pixel size and none was supplied."""


class NoTissueError(WsiHer2Error, ValueError):
    """Tissue detection found nothing to tile."""


class StoreError(WsiHer2Error, OSError):
    """A patch store is missing, incomplete, or of an unknown schema."""


class ConfigError(WsiHer2Error, ValueError):
    """A setting is out of range or inconsistent with another."""


class WeightsError(WsiHer2Error, ValueError):
    """A weights file is missing, untrusted, or does not match its architecture."""


class ModelNotFoundError(WsiHer2Error, KeyError):
    """A model name is not in the registry."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class DatasetError(WsiHer2Error, ValueError):
    """A training or evaluation dataset is empty, unreadable or mislabelled."""


class OutputError(WsiHer2Error, OSError):
    """An output path cannot be used: a file or a foreign directory is in the way, or it is not writable."""


class StainError(WsiHer2Error, ValueError):
    """The slide's colours do not fit the scorer (e.g. H&E given to the DAB IHC scorer)."""


class MissingDependencyError(WsiHer2Error, ImportError):
    """An optional package that this feature needs is not installed (the message names the extra)."""
