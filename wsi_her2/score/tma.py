"""Tissue microarrays: ``wsi-her2 score --tma`` finds the round cores and calls each one.

Cores are the connected components of the store's tissue mask (thumbnail, ~8 µm/px) large
enough to be a core. Their centres are clustered into rows and columns (a gap wider than half
a core diameter starts a new row / column), and each core is named like QuPath's TMA
dearrayer: row letter, column number (``A1`` top left, ``B3`` second row, third column; two cores
clustered into one grid position are numbered, ``A1 1`` and ``A1 2``, as repeated region names are).
A grid position with no tissue is reported as ``missing`` (core lost, or blank glass); a core with no
usable tile as ``blank``, one whose call is indeterminate (too little tumour) as ``not called``.
A tile belongs to the core whose centre is nearest its own when the two centres are at most the
core's radius plus half a tile diagonal apart (every tile that overlaps the circle, and some
beside it whose corner comes near), so a core holds the tiles it would have as a slide of its own
and gets that slide's call (one rule: :mod:`wsi_her2.score.part_call`).
"""
from __future__ import annotations

import string
from typing import Any

import cv2
import numpy as np
from numpy.typing import NDArray

from wsi_her2.errors import ConfigError
from wsi_her2.result import MISSING, Part
from wsi_her2.score.roi import unique_names
from wsi_her2.score.tile_groups import TileGroups

MIN_CORE_DIAMETER_UM = 200.0  # smaller tissue pieces are debris, not cores (cores are 0.6-2 mm)


def row_name(row: int) -> str:
    """0 -> A, 25 -> Z, 26 -> AA (as spreadsheets and QuPath label rows)."""
    letters = string.ascii_uppercase
    return letters[row] if row < 26 else row_name(row // 26 - 1) + letters[row % 26]


def _cluster_1d(values: NDArray[np.float64], gap: float) -> tuple[NDArray[np.int64], NDArray[np.float64]]:
    """Index of the cluster of each value (sorted clusters split at gaps > ``gap``) and cluster means."""
    order = np.argsort(values)
    breaks = np.diff(values[order]) > gap
    labels_sorted = np.concatenate([[0], np.cumsum(breaks)])
    labels = np.empty(len(values), np.int64)
    labels[order] = labels_sorted
    centres = np.array([values[labels == k].mean() for k in range(labels_sorted[-1] + 1)])
    return labels, centres


def find_cores(mask: NDArray[np.bool_], *, px_um: float) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """``(K, 2)`` core centres (x, y) and ``(K,)`` diameters, in mask pixels."""
    _, _, stats, centroids = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    area = stats[1:, cv2.CC_STAT_AREA].astype(np.float64)
    diameter = np.sqrt(4 * area / np.pi)
    keep = diameter * px_um >= MIN_CORE_DIAMETER_UM
    if keep.any():  # fragments far smaller than the typical core are debris
        keep &= diameter >= 0.4 * np.median(diameter[keep])
    return centroids[1:][keep], diameter[keep]


def core_groups(store: Any) -> TileGroups:
    """The cores of a TMA store, named by grid position, with missing positions reported."""
    from shapely.geometry import Point

    mask = np.asarray(store.array("tissue_mask"), dtype=bool)
    scale = float(store.attrs["thumbnail"]["px_per_level0_px"])  # mask px per level-0 px
    px_um = float(store.attrs["slide"]["mpp_um"]) / scale
    centres, diameters = find_cores(mask, px_um=px_um)
    if len(centres) < 2:
        raise ConfigError(f"--tma: found {len(centres)} core(s) of at least {MIN_CORE_DIAMETER_UM:.0f} µm in "
                          f"{store.slide_id}; this does not look like a tissue microarray (score it without --tma)")
    gap = 0.5 * float(np.median(diameters))
    rows, row_y = _cluster_1d(centres[:, 1], gap)
    cols, col_x = _cluster_1d(centres[:, 0], gap)
    order = np.lexsort((cols, rows))
    centres_l0 = centres / scale
    radius_l0 = diameters / 2 / scale
    names = unique_names([f"{row_name(int(rows[k]))}{int(cols[k]) + 1}" for k in order])
    geoms = [Point(*centres_l0[k]).buffer(float(radius_l0[k]), quad_segs=16) for k in order]
    grid = [(int(rows[k]) + 1, int(cols[k]) + 1) for k in order]
    taken = set(grid)
    unscored = [
        Part(name=f"{row_name(r)}{c + 1}", status=MISSING, columns={}, grid=(r + 1, c + 1),
             x_level0=round(float(col_x[c] / scale), 1), y_level0=round(float(row_y[r] / scale), 1),
             note="no tissue at this grid position (lost core or blank glass)")
        for r in range(len(row_y)) for c in range(len(col_x)) if (r + 1, c + 1) not in taken
    ]
    group = _tile_cores(store.coords_level0, store.tile_size_level0, centres_l0[order], radius_l0[order])
    return TileGroups(kind="core", names=names, geometries=geoms, tile_group=group, grid=grid, unscored=unscored)


def _tile_cores(coords_level0: NDArray, tile_size_level0: float, centres_l0: NDArray[np.float64],
                radius_l0: NDArray[np.float64]) -> NDArray[np.int64]:
    """Core index per tile (``-1``: in none): the core whose centre is nearest the tile's, when they are at most
    the core's radius plus half a tile diagonal apart.

    Every tile overlapping the core's circle is the core's (its tissue decides, through QC, whether it is
    scored): the core then holds the tiles it would have as a slide of its own. A k-d tree of the core
    centres finds each tile's nearest: memory per tile, not a (tiles x cores) table of distances."""
    from scipy.spatial import cKDTree

    half = float(tile_size_level0) / 2
    tile_centres = np.asarray(coords_level0, dtype=np.float64).reshape(-1, 2) + half
    if not len(tile_centres):
        return np.zeros(0, np.int64)
    distance, nearest = cKDTree(centres_l0).query(tile_centres, k=1)
    inside = distance <= radius_l0[nearest] + half * np.sqrt(2.0)
    return np.where(inside, nearest, -1).astype(np.int64)
