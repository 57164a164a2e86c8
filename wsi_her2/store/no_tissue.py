"""The record ``wsi-her2 tile`` leaves where a slide had no tissue, in place of a patch store.

An empty tissue-microarray core, a lost core, or a section that took up no stain (visible only
by its cut edge) has nothing to tile. ``tile`` stops with a one-line error and a non-zero exit,
and writes ``<id>.no_tissue.json`` beside where ``<id>.zarr`` would be, so that ``score``
(given the store path or the output folder) reports the slide as **indeterminate, no tissue
found**, never as HER2 0 and never as a missing file. Tiling the slide again successfully (for
example with a lower ``--min-od``) removes the record.
"""
from __future__ import annotations

import json
from pathlib import Path

from wsi_her2.errors import StoreError
from wsi_her2.files import atomic_write_text

SUFFIX = ".no_tissue.json"
SCHEMA = "wsi-her2/no-tissue/1"


def record_path(store_path: str | Path) -> Path:
    """Where the no-tissue record of the store ``<dir>/<id>.zarr`` lives: ``<dir>/<id>.no_tissue.json``."""
    store_path = Path(store_path)
    return store_path.with_name(store_path.name.removesuffix(".zarr") + SUFFIX)


def store_path_of(record: str | Path) -> Path:
    """The store path a record stands for (inverse of :func:`record_path`)."""
    record = Path(record)
    return record.with_name(record.name.removesuffix(SUFFIX) + ".zarr")


def write_record(store_path: str | Path, *, slide: Path, reason: str, tissue_area_mm2: float) -> Path:
    """Write the record for ``store_path`` (atomically)."""
    body = {"schema": SCHEMA, "slide": str(Path(slide).resolve()), "reason": reason,
            "tissue_area_mm2": round(float(tissue_area_mm2), 4)}
    return atomic_write_text(record_path(store_path), json.dumps(body, indent=2))


def read_record(store_path: str | Path) -> dict | None:
    """The record standing for ``store_path``, or None when there is none."""
    path = record_path(store_path)
    if not path.is_file():
        return None
    try:
        body = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise StoreError(f"{path}: unreadable no-tissue record ({exc}); delete it and run `wsi-her2 tile` again") from None
    if not isinstance(body, dict) or body.get("schema") != SCHEMA:
        raise StoreError(f"{path}: not a wsi-her2 no-tissue record; delete it and run `wsi-her2 tile` again")
    return body


def clear_record(store_path: str | Path) -> None:
    """Remove the record (the slide has been tiled after all)."""
    record_path(store_path).unlink(missing_ok=True)
