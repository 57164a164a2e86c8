"""Numpy values and paths as plain JSON values: the one conversion every record and file uses
(``<id>.json``, the GeoJSON's call metadata, record digests)."""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import PurePath
from typing import Any

import numpy as np

__all__ = ["plain_value", "to_jsonable"]


def plain_value(obj: Any) -> Any:
    """A numpy scalar or array, or a path, as its plain Python value (``json.dumps``'s ``default``).

    Raises
    ------
    TypeError
        For anything else, as ``json.dumps`` does.
    """
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, PurePath):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def to_jsonable(obj: Any) -> Any:
    """A copy of ``obj`` that ``json.dumps`` takes: mappings as dicts with string keys, tuples and lists
    as lists, numpy values and paths as :func:`plain_value`; anything else as it is."""
    if isinstance(obj, Mapping):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, (np.generic, np.ndarray, PurePath)):
        return to_jsonable(plain_value(obj))
    return obj
