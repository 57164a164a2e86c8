"""Tables of a scored slide: ``<id>.tiles.parquet`` (one row per tile) and ``slides.csv`` (one
row per slide, upserted by slide id under a lock, written atomically: cohort workers share it)."""
from __future__ import annotations

import csv
import io
import logging
from pathlib import Path
from typing import Any

import numpy as np

from wsi_her2.csv_cells import safe_cell, safe_dict_row, written_row
from wsi_her2.files import atomic_target, atomic_write_text
from wsi_her2.store.patch_store import PatchStore

log = logging.getLogger(__name__)

SLIDES_CSV_COLUMNS = [
    "slide", "her2_score", "confidence", "frac_0", "frac_1+", "frac_2+", "frac_3+",
    "tiles_used", "tiles_rejected", "model", "aggregation", "her2_category", "tumour_cells", "tumour_area_mm2",
    "criteria", "specimen",
]


def write_tiles_parquet(path: Path, store: PatchStore, calls, classes, reasons, measurements) -> Path:
    """``<id>.tiles.parquet``: position, QC outcome, call and every measurement of each tile."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    coords = store.coords_level0
    grid = store.grid_rc
    cols: dict[str, Any] = {
        "tile": np.arange(store.n_tiles, dtype=np.int64),
        "x_level0": coords[:, 0],
        "y_level0": coords[:, 1],
        "row": grid[:, 0],
        "col": grid[:, 1],
        "qc_pass": store.qc_pass,
        "qc_reason": list(reasons),
        "call": [classes[c] if c >= 0 else None for c in calls],
    }
    for name, values in measurements.items():
        cols[name] = np.asarray(values, dtype=np.float32)
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


def upsert_slides_csv(path: Path, rows: list[dict]) -> Path:
    """Insert or replace rows (keyed by slide) in ``slides.csv``, sorted by slide id, atomically,
    under ``slides.csv.lock``: concurrent writers (cohort workers) never lose each other's rows."""
    from wsi_her2.locks import held

    with held(path.with_name(path.name + ".lock")):
        return _upsert_slides_csv_unlocked(path, rows)


def _upsert_slides_csv_unlocked(path: Path, rows: list[dict]) -> Path:
    existing: dict[str, dict] = {}  # keyed by the slide id as written (safe_cell)
    if path.exists():
        with path.open(newline="") as fh:
            for r in csv.DictReader(fh):
                existing[r["slide"]] = r
    for r in rows:
        existing[safe_cell(str(r["slide"]))] = {k: r.get(k, "") for k in SLIDES_CSV_COLUMNS}
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=SLIDES_CSV_COLUMNS, extrasaction="ignore")
    writer.writeheader()
    for key in sorted(existing):
        writer.writerow(safe_dict_row(existing[key]))
    atomic_write_text(path, text.getvalue())
    return path


def ensure_slides_csv_row(path: Path, row: dict) -> None:
    """Put ``row`` back into ``slides.csv`` if it is missing (a run killed after ``<id>.json``) or
    differs from it (an edited or damaged table)."""
    found = []
    if path.exists():
        with path.open(newline="") as fh:
            found = [r for r in csv.DictReader(fh) if r.get("slide") == safe_cell(str(row["slide"]))]
        if [written_row(r, SLIDES_CSV_COLUMNS) for r in found] == [written_row(row, SLIDES_CSV_COLUMNS)]:
            return
    log.info("%s: row of %s %s; restored from its result JSON", path, row["slide"], "differs" if found else "missing")
    upsert_slides_csv(path, [row])
