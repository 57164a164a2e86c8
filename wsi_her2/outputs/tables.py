"""Tables of a scored slide: ``<id>.tiles.parquet`` (one row per tile), ``slides.csv`` (one row per
slide) and ``cores.csv`` / ``regions.csv`` (one row per part). The shared tables are upserted by one
function (:func:`upsert_rows`): the slide's rows replaced, under ``<table>.lock``, written atomically,
so cohort workers sharing a folder never lose each other's rows."""
from __future__ import annotations

import csv
import io
import logging
from pathlib import Path
from typing import Any

import numpy as np

from wsi_her2.csv_cells import safe_cell, safe_dict_row, written_row
from wsi_her2.files import atomic_target, atomic_write_text
from wsi_her2.result import PART_CSV_COLUMNS, SLIDES_CSV_COLUMNS, Groups, TileResults
from wsi_her2.store.patch_store import PatchStore

log = logging.getLogger(__name__)

def tile_columns(store: PatchStore, tiles: TileResults) -> dict[str, Any]:
    """The columns of the tile table: position, QC outcome, call and every measurement of each tile."""
    coords = store.coords_level0
    grid = store.grid_rc
    cols: dict[str, Any] = {
        "tile": np.arange(store.n_tiles, dtype=np.int64),
        "x_level0": coords[:, 0],
        "y_level0": coords[:, 1],
        "row": grid[:, 0],
        "col": grid[:, 1],
        "qc_pass": store.qc_pass,
        "qc_reason": list(tiles.reasons),
        "call": [tiles.classes[c] if c >= 0 else None for c in tiles.calls.tolist()],
    }
    for name, values in tiles.measurements.items():
        cols[name] = np.asarray(values, dtype=np.float32)
    return cols


def write_tiles_parquet(path: Path, store: PatchStore, tiles: TileResults) -> Path:
    """``<id>.tiles.parquet``: :func:`tile_columns`, one row per tile."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    cols = tile_columns(store, tiles)
    table = pa.Table.from_arrays([_arrow_array(v) for v in cols.values()], names=list(cols))
    table = table.replace_schema_metadata({"tile_size_level0": str(store.tile_size_level0), "slide": store.slide_id})
    with atomic_target(path) as tmp:
        pq.write_table(table, tmp)
    return path


def _arrow_array(values: Any):
    """A pyarrow array of a numpy array (numbers, bools) or of a list of str/None, built from its
    buffers: ``pa.array`` imports pandas on first use (~0.3-0.4 s of every ``wsi-her2 score``)."""
    import pyarrow as pa

    if isinstance(values, np.ndarray):
        values = np.ascontiguousarray(values)
        if values.dtype == np.bool_:
            bits = np.packbits(values, bitorder="little")
            return pa.Array.from_buffers(pa.bool_(), values.size, [None, pa.py_buffer(bits)])
        return pa.Array.from_buffers(pa.from_numpy_dtype(values.dtype), values.size, [None, pa.py_buffer(values)])
    valid = np.array([v is not None for v in values], dtype=bool)
    encoded = [v.encode() if v is not None else b"" for v in values]
    offsets = np.zeros(len(encoded) + 1, dtype=np.int32)
    np.cumsum([len(e) for e in encoded], out=offsets[1:])
    validity = None if valid.all() else pa.py_buffer(np.packbits(valid, bitorder="little"))
    return pa.Array.from_buffers(pa.string(), len(encoded), [validity, pa.py_buffer(offsets), pa.py_buffer(b"".join(encoded))],
                                 null_count=int((~valid).sum()))


def upsert_rows(path: Path, columns: list[str], slide_ids: list[str], rows: list[dict]) -> Path:
    """Replace the rows of ``slide_ids`` in the shared table ``path`` by ``rows`` (other slides' rows kept),
    sorted by slide and name, under ``<table>.lock``, atomically: the one upsert of every shared table."""
    from wsi_her2.locks import held

    with held(path.with_name(path.name + ".lock")):
        replaced = {safe_cell(str(s)) for s in slide_ids}
        kept: list[dict] = []
        if path.exists():
            with path.open(newline="", encoding="utf-8") as fh:
                kept = [r for r in csv.DictReader(fh) if r.get("slide") not in replaced]
        new = [{k: r.get(k, "") for k in columns} for r in rows]
        # every row made safe once (a kept row is already: unchanged), then sorted by its cells as written
        written = sorted(map(safe_dict_row, kept + new), key=lambda r: (str(r["slide"]), str(r.get("name", ""))))
        text = io.StringIO(newline="")
        writer = csv.DictWriter(text, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(written)
        return atomic_write_text(path, text.getvalue())


def upsert_slides_csv(path: Path, rows: list[dict]) -> Path:
    """Insert or replace rows (keyed by slide) in ``slides.csv``, sorted by slide id."""
    return upsert_rows(path, SLIDES_CSV_COLUMNS, [r["slide"] for r in rows], rows)


def upsert_part_rows(path: Path, slide_id: str, groups: Groups) -> Path:
    """Replace this slide's rows in its parts' table (``cores.csv`` / ``regions.csv``)."""
    return upsert_rows(path, PART_CSV_COLUMNS, [slide_id], [{**part.row(), "slide": slide_id} for part in groups.parts])


def ensure_slides_csv_row(path: Path, row: dict) -> None:
    """Put ``row`` back into ``slides.csv`` if it is missing (a run killed after ``<id>.json``) or
    differs from it (an edited or damaged table)."""
    found = []
    if path.exists():
        with path.open(newline="", encoding="utf-8") as fh:
            found = [r for r in csv.DictReader(fh) if r.get("slide") == safe_cell(str(row["slide"]))]
        if [written_row(r, SLIDES_CSV_COLUMNS) for r in found] == [written_row(row, SLIDES_CSV_COLUMNS)]:
            return
    log.info("%s: row of %s %s; restored from its result JSON", path, row["slide"], "differs" if found else "missing")
    upsert_slides_csv(path, [row])
