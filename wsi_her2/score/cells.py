"""A slide's scored cells: the cell-level scorer's per-cell table, gathered over the store's tiles.

Each row is one nucleus the scorer graded (:data:`wsi_her2.vocab.CELL_COLUMNS`; ``tile`` is the
store's tile index). The table is what the gastric biopsy rule clusters (:func:`largest_clusters`),
what ``--cells`` writes (``<id>.cells.parquet`` and QuPath detections), and how a pathologist
checks a call cell by cell. Numpy only (imported by the chunk workers' module).

Memory: ~40 bytes a cell (a 40,000 x 30,000 px slide at 0.5 µm/px holds a few hundred thousand
to ~1.5 million nuclei: tens of MB).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from wsi_her2.vocab import CELL_COLUMNS

__all__ = ["CellTable", "cells_to_host", "concat_cells", "largest_clusters"]

#: Cells linked into one cluster lie at most this far apart, centre to centre (µm): neighbouring
#: carcinoma cells are 10-20 µm across, so touching cells' nuclei are ~10-20 µm apart; 20 µm links
#: touching cells and not cells separated by a cell's width of stroma.
CLUSTER_LINK_UM = 20.0
#: A cell counts in a cluster of its grade when its tumour weight exceeds one half.
_TUMOUR_WEIGHT_MIN = 0.5


def cells_to_host(cells: dict[str, Any] | None, tile_indices: NDArray[np.int64]) -> dict[str, NDArray] | None:
    """A batch's per-cell tensors (``tile``: index in the batch) as numpy, ``tile`` mapped to store indices."""
    if cells is None:
        return None
    out = {k: np.asarray(v.detach().cpu().numpy() if hasattr(v, "detach") else v) for k, v in cells.items()}
    out["tile"] = np.asarray(tile_indices, np.int64)[out["tile"].astype(np.int64)]
    return out


@dataclass(frozen=True)
class CellTable:
    """Columns :data:`~wsi_her2.vocab.CELL_COLUMNS`, one row per cell, in store tile order."""

    columns: dict[str, NDArray]

    def __len__(self) -> int:
        return int(self.columns["tile"].shape[0])

    def __getitem__(self, name: str) -> NDArray:
        return self.columns[name]

    def rows_of_tiles(self, tiles: NDArray[np.int64]) -> NDArray[np.int64]:
        """Row indices of the cells of store tiles ``tiles`` (rows are in tile order: one search per tile)."""
        col = self.columns["tile"]
        tiles = np.asarray(tiles, np.int64)
        lo, hi = np.searchsorted(col, tiles, "left"), np.searchsorted(col, tiles, "right")
        counts = hi - lo
        if counts.sum() == 0:
            return np.zeros(0, np.int64)
        starts = np.repeat(lo - np.concatenate([[0], np.cumsum(counts)[:-1]]), counts)
        return starts + np.arange(counts.sum())

    def take(self, rows: NDArray[np.int64]) -> "CellTable":
        """The cells at ``rows``."""
        return CellTable({k: v[rows] for k, v in self.columns.items()})

    def level0_xy(self, coords_level0: NDArray, level0_per_tile_px: float) -> NDArray[np.float64]:
        """``(N, 2)`` x, y of each cell in level-0 pixels of the slide."""
        origin = np.asarray(coords_level0, np.float64)[self.columns["tile"]]
        local = np.stack([self.columns["x_px"], self.columns["y_px"]], axis=1).astype(np.float64) + 0.5
        return origin + local * float(level0_per_tile_px)


def concat_cells(parts: list[dict[str, NDArray] | None]) -> CellTable | None:
    """One table from the batches' parts (None when the model reports no cells)."""
    parts = [p for p in parts if p is not None]
    if not parts:
        return None
    return CellTable({k: np.concatenate([p[k] for p in parts]) for k in CELL_COLUMNS})


def largest_clusters(cells: CellTable, xy_um: NDArray[np.float64], *, link_um: float = CLUSTER_LINK_UM) -> dict[str, int]:
    """Largest cluster of cohesive tumour cells at each grade: ``{">=1+": n, ">=2+": n, ">=3+": n}``.

    Tumour cells (weight > 0.5) of at least the grade, linked when their centres (``xy_um``) lie
    within ``link_um``; the size of the largest connected group. The gastric biopsy rule: a
    cluster of >= 5 decides its grade, whatever the percentage.
    """
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components
    from scipy.spatial import cKDTree

    grade = cells["grade"]
    tumour = cells["tumour_weight"] > _TUMOUR_WEIGHT_MIN
    out = {}
    for k, key in ((1, ">=1+"), (2, ">=2+"), (3, ">=3+")):
        sel = np.flatnonzero(tumour & (grade >= k))
        if sel.size == 0:
            out[key] = 0
            continue
        pairs = cKDTree(xy_um[sel]).query_pairs(link_um, output_type="ndarray")
        graph = coo_matrix((np.ones(len(pairs)), (pairs[:, 0], pairs[:, 1])), shape=(sel.size, sel.size))
        _, labels = connected_components(graph, directed=False)
        out[key] = int(np.bincount(labels).max())
    return out
