"""Region geometry at scale, for ``--roi``: polygons built in bulk, cut into small pieces, and the
area each tile shares with them, all vectorised (numpy and shapely 2), never a Python loop over
tiles x polygons.

- :func:`polygons_from_geojson`: the (multi)polygons of many GeoJSON geometries at once (one
  array of coordinates, shapely's ring and polygon constructors), ~10x faster than one
  ``shapely.geometry.shape`` call per feature.
- :func:`region_pieces`: each region cut into pieces of at most ``max_vertices`` vertices by
  halving its bounding box (``clip_by_rect``), so a tile meets only the few pieces near it.
- :func:`box_overlap_areas`: the area an axis-aligned tile box shares with a piece, by Green's
  theorem on the piece's edges clipped to the box: along each vertical line through the box the
  boundary's crossings, clamped to the box's height, measure exactly the inside part; summed over
  the edges this is the area of piece ∩ box (a shell's rings counted positive, holes negative).
"""
from __future__ import annotations

from itertools import chain
from typing import Any

import numpy as np
from numpy.typing import NDArray

PIECE_MAX_VERTICES = 256
_EDGES_PER_BATCH = 1 << 19  # edge x tile evaluations held at once (~20 arrays of this many floats: ~80 MB)


def polygons_from_geojson(geometries: list[dict]) -> NDArray:
    """Shapely (multi)polygons of GeoJSON ``Polygon`` / ``MultiPolygon`` geometries, built in bulk.

    Raises ``ValueError`` or ``TypeError`` when a coordinate is not a pair of numbers or a ring has
    fewer than 4 points (the caller then finds the feature at fault one by one)."""
    import shapely

    rings, ring_poly, poly_geom, multi = [], [], [], []
    for k, g in enumerate(geometries):
        polys = [g["coordinates"]] if g["type"] == "Polygon" else g["coordinates"]
        multi.append(g["type"] == "MultiPolygon")
        for poly in polys:
            for ring in poly:
                rings.append(ring)
                ring_poly.append(len(poly_geom))
            poly_geom.append(k)
    lengths = np.fromiter(map(len, rings), np.int64, len(rings))
    flat = np.fromiter(chain.from_iterable(chain.from_iterable(rings)), np.float64)
    if flat.size != 2 * lengths.sum():
        raise ValueError("a coordinate is not an x, y pair")
    lr = shapely.linearrings(flat.reshape(-1, 2), indices=np.repeat(np.arange(len(rings)), lengths))
    polys = shapely.polygons(lr, indices=np.asarray(ring_poly, dtype=np.int64))
    if len(polys) != len(poly_geom):
        raise ValueError("a polygon has no rings")
    out = np.empty(len(geometries), dtype=object)
    poly_geom = np.asarray(poly_geom, dtype=np.int64)
    is_multi = np.asarray(multi, dtype=bool)
    single = ~is_multi[poly_geom]
    out[poly_geom[single]] = polys[single]
    if is_multi.any():
        out[is_multi] = shapely.multipolygons(polys[~single], indices=poly_geom[~single])
    if any(g is None for g in out):  # a MultiPolygon without polygons
        raise ValueError("a MultiPolygon has no polygons")
    return out


def region_pieces(geoms: Any, *, max_vertices: int = PIECE_MAX_VERTICES,
                  min_side_px: float = 1.0) -> tuple[NDArray, NDArray[np.int64]]:
    """Each region cut into pieces of at most ``max_vertices`` vertices (its bounding box halved
    along the longer side until so, no piece narrower than ``min_side_px``); ``(pieces, region of
    each)``. The pieces of a region tile it without overlap, so areas inside it add up."""
    import shapely

    geoms = np.asarray(geoms, dtype=object)
    small = shapely.get_num_coordinates(geoms) <= max_vertices
    pieces, owner = list(geoms[small]), list(np.nonzero(small)[0])
    stack = [(g, int(i)) for g, i in zip(geoms[~small], np.nonzero(~small)[0])]
    while stack:
        g, i = stack.pop()
        x0, y0, x1, y1 = g.bounds
        if shapely.get_num_coordinates(g) <= max_vertices or max(x1 - x0, y1 - y0) < 2 * min_side_px:
            pieces.append(g)
            owner.append(i)
            continue
        if x1 - x0 >= y1 - y0:
            xm = (x0 + x1) / 2
            halves = (shapely.clip_by_rect(g, x0, y0, xm, y1), shapely.clip_by_rect(g, xm, y0, x1, y1))
        else:
            ym = (y0 + y1) / 2
            halves = (shapely.clip_by_rect(g, x0, y0, x1, ym), shapely.clip_by_rect(g, x0, ym, x1, y1))
        stack.extend((h, i) for h in halves if not h.is_empty and h.area > 0)
    return np.asarray(pieces, dtype=object), np.asarray(owner, dtype=np.int64)


class PieceEdges:
    """The edges of polygon pieces, grouped by piece, each weighted so that its clipped integral
    adds to the area inside the piece (see the module docstring)."""

    def __init__(self, pieces: NDArray) -> None:
        import shapely

        parts, part_piece = shapely.get_parts(pieces, return_index=True)
        polygonal = shapely.get_type_id(parts) == 3  # clipping may leave lines or points: no area
        parts, part_piece = parts[polygonal], part_piece[polygonal]
        rings, ring_part = shapely.get_rings(parts, return_index=True)
        exterior = np.r_[True, ring_part[1:] != ring_part[:-1]] if len(rings) else np.zeros(0, bool)
        coords, coord_ring = shapely.get_coordinates(rings, return_index=True)
        same = coord_ring[1:] == coord_ring[:-1] if len(coords) else np.zeros(0, bool)
        self.a, self.b = coords[:-1][same], coords[1:][same]
        ring = coord_ring[:-1][same]
        # ∮ (y - y0) dx over a ring is minus its signed area: weigh each ring so that shells add, holes subtract
        twice_area = np.bincount(ring, self.a[:, 0] * self.b[:, 1] - self.b[:, 0] * self.a[:, 1], minlength=len(rings))
        self.weight = (-np.sign(twice_area) * np.where(exterior, 1.0, -1.0))[ring]
        piece = part_piece[ring_part[ring]]
        self.start = np.searchsorted(piece, np.arange(len(pieces)))
        self.count = np.bincount(piece, minlength=len(pieces))


def box_overlap_areas(pieces: NDArray, piece_idx: NDArray[np.int64], box_xy: NDArray, size: float) -> NDArray[np.float64]:
    """Area shared by ``pieces[piece_idx[k]]`` and the square box of side ``size`` at ``box_xy[k]``
    (its minimum corner), for every pair ``k``; in batches of bounded memory."""
    edges = PieceEdges(pieces)
    counts = edges.count[piece_idx]
    out = np.zeros(len(piece_idx))
    ends = np.cumsum(counts)
    k0 = 0
    while k0 < len(piece_idx):
        k1 = max(k0 + 1, int(np.searchsorted(ends, (ends[k0 - 1] if k0 else 0) + _EDGES_PER_BATCH, side="right")))
        out[k0:k1] = _areas(edges, piece_idx[k0:k1], np.asarray(box_xy[k0:k1], np.float64), size)
        k0 = k1
    return np.clip(out, 0.0, size * size)


def _areas(edges: PieceEdges, piece_idx: NDArray[np.int64], box_xy: NDArray, size: float) -> NDArray[np.float64]:
    counts = edges.count[piece_idx]
    pair = np.repeat(np.arange(len(piece_idx)), counts)
    first = np.repeat(edges.start[piece_idx] - np.r_[0, np.cumsum(counts)[:-1]], counts)
    e = first + np.arange(len(pair))
    (xa, ya), (xb, yb) = edges.a[e].T, edges.b[e].T
    bx0, by0 = box_xy[pair, 0], box_xy[pair, 1]
    bx1, by1 = bx0 + size, by0 + size
    u, v = np.clip(xa, bx0, bx1), np.clip(xb, bx0, bx1)
    dx, dy = xb - xa, yb - ya
    slope = np.divide(dy, dx, out=np.zeros_like(dx), where=dx != 0)
    lo, hi = np.minimum(u, v), np.maximum(u, v)
    inv = np.divide(dx, dy, out=np.zeros_like(dy), where=dy != 0)
    # where the edge crosses the box's bottom and top: there its clamped height changes slope
    t0 = np.where(dy != 0, np.clip(xa + (by0 - ya) * inv, lo, hi), lo)
    t1 = np.where(dy != 0, np.clip(xa + (by1 - ya) * inv, lo, hi), lo)
    p = np.sort(np.stack([lo, hi, t0, t1], axis=1), axis=1)
    h = np.clip(ya[:, None] + (p - xa[:, None]) * slope[:, None], by0[:, None], by1[:, None]) - by0[:, None]
    integral = ((p[:, 1:] - p[:, :-1]) * (h[:, 1:] + h[:, :-1]) / 2).sum(axis=1) * np.sign(v - u)
    return np.bincount(pair, weights=integral * edges.weight[e], minlength=len(piece_idx))
