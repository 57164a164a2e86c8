"""Every scored cell, for QuPath and for tables: ``score --cells``.

- ``<id>.cells.geojson.gz``: one QuPath **detection** per cell, a small octagon (4 µm radius, about
  a nucleus) at the nucleus's centre, classified ``HER2 0`` .. ``HER2 3+`` by the cell's grade
  under the criteria used (``Non-tumour`` when its tumour weight is one half or less), named by
  its membrane pattern, with measurements ``membrane OD``, ``completeness``, ``tumour weight``,
  ``ring in tile`` (cells cut by a tile edge, below 0.84, are not graded), ``p >=1+``, ``p >=2+``, ``p 3+``. *Measure > Show measurement maps* colours them by any of these.
  Always gzip-compressed (QuPath imports ``.geojson.gz``): a slide holds up to millions of cells.
- ``<id>.cells.parquet``: the same cells as rows (level-0 x, y; tile; the scorer's per-cell columns).

Both are written as a stream of blocks of :data:`BLOCK_CELLS` cells, so memory stays bounded by
one block of text whatever the number of cells (``benchmarks/bench_cells.py``); a temporary
name is renamed onto the file when complete.
"""
from __future__ import annotations

import gzip
import logging
import math
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

from wsi_her2.files import atomic_target
from wsi_her2.outputs.geojson import class_color, qupath_class_name
from wsi_her2.result import Cells
from wsi_her2.store.patch_store import PatchStore
from wsi_her2.vocab import CELL_COLUMNS, HER2_CLASSES, PATTERNS

log = logging.getLogger(__name__)

__all__ = ["BLOCK_CELLS", "CELL_RADIUS_UM", "NON_TUMOUR", "write_cells_geojson", "write_cells_parquet", "write_slide_cells"]

#: Cells formatted and compressed at a time.
BLOCK_CELLS = 20_000
#: Class of a cell the scorer does not count as tumour (tumour weight <= 0.5).
NON_TUMOUR = "Non-tumour"
_NON_TUMOUR_COLOUR = (150, 150, 150)
#: Radius of the octagon drawn for a cell, µm (a nucleus).
CELL_RADIUS_UM = 4.0
_ANGLES = np.linspace(0.0, 2.0 * math.pi, 9)[:-1] + math.pi / 8


def _class_json(name: str, colour: tuple[int, int, int]) -> str:
    return f'{{"name":"{name}","color":[{colour[0]},{colour[1]},{colour[2]}]}}'


_GRADE_CLASS = [_class_json(qupath_class_name(c), class_color(qupath_class_name(c))) for c in HER2_CLASSES]
_OTHER_CLASS = _class_json(NON_TUMOUR, _NON_TUMOUR_COLOUR)


def _rings(xy: NDArray[np.float64], radius_px: float) -> list[str]:
    """Closed octagon rings around each centre, as GeoJSON coordinate text (0.01 px: QuPath's grid)."""
    dx, dy = np.cos(_ANGLES) * radius_px, np.sin(_ANGLES) * radius_px
    xs = np.round(xy[:, :1] + dx[None, :], 2)
    ys = np.round(xy[:, 1:2] + dy[None, :], 2)
    out = []
    for rx, ry in zip(xs.tolist(), ys.tolist()):
        pts = ",".join(f"[{x},{y}]" for x, y in zip(rx, ry))
        out.append(f"[[{pts},[{rx[0]},{ry[0]}]]]")
    return out


def _features(cells: dict[str, NDArray], xy: NDArray[np.float64], radius_px: float) -> list[str]:
    rings = _rings(xy, radius_px)
    tumour = cells["tumour_weight"] > 0.5
    out = []
    for k in range(xy.shape[0]):
        cls = _GRADE_CLASS[int(cells["grade"][k])] if tumour[k] else _OTHER_CLASS
        m = (f'"membrane OD":{cells["membrane_od"][k]:.4f},"completeness":{cells["completeness"][k]:.3f},'
             f'"tumour weight":{cells["tumour_weight"][k]:.3f},"ring in tile":{cells["ring_in_tile"][k]:.3f},'
             f'"p >=1+":{cells["p_ge1"][k]:.3f},'
             f'"p >=2+":{cells["p_ge2"][k]:.3f},"p 3+":{cells["p_3"][k]:.3f}')
        out.append(f'{{"type":"Feature","geometry":{{"type":"Polygon","coordinates":{rings[k]}}},'
                   f'"properties":{{"objectType":"detection","name":"{PATTERNS[int(cells["pattern"][k])]}",'
                   f'"classification":{cls},"measurements":{{{m}}}}}}}')
    return out


def write_slide_cells(out: Path, store: PatchStore, cells: Cells) -> dict[str, str]:
    """``--cells``: every scored cell as a QuPath detection (``<id>.cells.geojson.gz``) and a table row
    (``<id>.cells.parquet``); their paths by output name."""
    slide = store.attrs["slide"]
    offset = np.asarray(slide.get("bounds_offset_px", (0, 0)), np.float64)  # QuPath's view of the slide
    radius_px = CELL_RADIUS_UM / float(slide["mpp_um"])
    sid = store.slide_id
    geojson = write_cells_geojson(out / f"{sid}.cells.geojson.gz", cells, cells.xy_level0 - offset, radius_px=radius_px)
    return {"cells_geojson": str(geojson), "cells_parquet": str(write_cells_parquet(out / f"{sid}.cells.parquet", cells))}


def write_cells_geojson(path: Path, cells: Cells, xy_level0: NDArray[np.float64], *, radius_px: float) -> Path:
    """``cells`` as QuPath detections at ``xy_level0`` (level-0 px, the bounds offset already taken off),
    gzip-compressed, streamed block by block."""
    path = Path(path)
    columns = {k: np.nan_to_num(np.asarray(cells[k])) for k in CELL_COLUMNS}
    # No file name in the gzip header (GzipFile would record the temporary name) and no time: a rebuilt
    # file has the bytes, and the SHA-256, recorded in <id>.json.
    with atomic_target(path) as tmp, tmp.open("wb") as raw, \
            gzip.GzipFile(filename="", fileobj=raw, mode="wb", compresslevel=1, mtime=0) as fh:
        fh.write(b'{"type":"FeatureCollection","features":[')
        for start in range(0, len(cells), BLOCK_CELLS):
            stop = min(start + BLOCK_CELLS, len(cells))
            block = {k: v[start:stop] for k, v in columns.items()}
            text = ",".join(_features(block, xy_level0[start:stop], radius_px))
            fh.write(((b"," if start else b"") + text.encode()))
        fh.write(b"]}")
    log.info("wrote %d cells to %s", len(cells), path)
    return path


def write_cells_parquet(path: Path, cells: Cells) -> Path:
    """``cells`` as a parquet table: level-0 ``x``, ``y``, then the scorer's per-cell columns, the
    pattern and grade both as codes and as names."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    names = {"pattern": PATTERNS, "grade": HER2_CLASSES}
    path = Path(path)
    with atomic_target(path) as tmp:
        schema = None
        writer = None
        try:
            for start in range(0, max(len(cells), 1), BLOCK_CELLS):
                stop = min(start + BLOCK_CELLS, len(cells))
                cols = {"x_level0": cells.xy_level0[start:stop, 0], "y_level0": cells.xy_level0[start:stop, 1]}
                cols.update({k: np.asarray(cells[k][start:stop]) for k in CELL_COLUMNS})
                cols.update({f"{k}_name": np.asarray(v, dtype=object)[np.asarray(cells[k][start:stop], int)]
                             for k, v in names.items()})
                table = pa.table(cols)
                if writer is None:
                    schema = table.schema
                    writer = pq.ParquetWriter(tmp, schema)
                writer.write_table(table.cast(schema))
        finally:
            if writer is not None:
                writer.close()
    return path
