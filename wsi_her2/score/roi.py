"""Regions of interest from QuPath: ``wsi-her2 score --roi annotations.geojson [--roi-class Tumor]``.

QuPath's File > Export objects writes either a ``FeatureCollection`` or a bare JSON array of
features (optionally gzip-compressed), coordinates in level-0 pixels of the image *as QuPath
shows it* (OpenSlide's bounds offset already subtracted, see QUPATH_GEOJSON.md), polygons and
multipolygons with holes. A tile is scored when more than :data:`MIN_INSIDE_FRACTION` of its
area lies inside a region.

A regions file is input from anywhere, so its cost is bounded by design, not by its honesty:

- it is read in a streaming way up to :data:`MAX_ROI_BYTES` (512 MiB, after decompression of a
  ``.gz``): a file past that, a gzip bomb among them, is refused in one line;
- non-finite numbers (``NaN``, ``Infinity``, ``1e400``) and coordinates beyond
  :data:`MAX_COORD_PX` are refused in one line (they made ``Infinity`` areas and a silently
  wrong tile selection);
- polygons are built in bulk, and cut into pieces of at most 256 vertices (halving their bounding
  box until they are that small, :mod:`wsi_her2.score.roi_geometry`); tiles meet pieces through a
  spatial index (an STRtree) and prepared geometries, and a tile straddling a piece's edge gets its
  share by a vectorised exact area: a tile costs the few pieces it touches, not the whole polygon
  (one polygon of 10^6 vertices: 67 s before, see ``benchmarks/bench_roi.py``);
- duplicate region names are numbered in one pass (10^5 features: 366 s before);
- it is read once per command (:func:`read_regions`, cached while the file is unchanged): checked by
  :func:`wsi_her2.score.pipeline.validate_score_config` before any store is opened, then reused for each store.
"""
from __future__ import annotations

import functools
import gzip
import json
import zlib
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from wsi_her2.errors import ConfigError
from wsi_her2.score.roi_geometry import box_overlap_areas, polygons_from_geojson, region_pieces
from wsi_her2.score.tile_groups import TileGroups

MIN_INSIDE_FRACTION = 0.5  # "mostly inside": more than half of the tile's area
MAX_ROI_BYTES = 512 * 2**20  # the most a regions file may hold, decompressed
MAX_COORD_PX = 1e9  # level-0 pixels: a 10^9 px slide side is ~250 m at 0.25 µm/px
_READ_BLOCK = 1 << 20


class _NonFinite(ValueError):
    pass


def _refuse_constant(name: str) -> float:
    raise _NonFinite(name)


class _TooBig(Exception):
    pass


def _read_bounded(path: Path) -> bytearray:
    """The file's bytes (decompressed for ``.gz``), read block by block, refused past :data:`MAX_ROI_BYTES`."""
    opener = gzip.open if path.suffix == ".gz" else open
    data = bytearray()  # json reads it as it is: no copy of up to MAX_ROI_BYTES
    with opener(path, "rb") as fh:
        while block := fh.read(_READ_BLOCK):
            if len(data) + len(block) > MAX_ROI_BYTES:
                raise _TooBig()
            data += block
    return data


def read_features(path: str | Path) -> list[dict]:
    """The features of a QuPath export: FeatureCollection, bare feature array, or one feature."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--roi {path}: no such file; export the annotations from QuPath (File > Export objects)")
    try:
        data = json.loads(_read_bounded(path), parse_constant=_refuse_constant)
    except _TooBig:
        raise ConfigError(
            f"--roi {path}: holds more than {MAX_ROI_BYTES // 2**20} MiB{' once decompressed' if path.suffix == '.gz' else ''}, "
            "the most wsi-her2 reads from a regions file; export only the regions to score (QuPath: select them, "
            "File > Export objects), or simplify them") from None
    except _NonFinite as exc:
        raise ConfigError(f"--roi {path}: holds the non-finite number {exc}; coordinates must be finite level-0 "
                          "pixels, as QuPath exports them") from None
    except (OSError, EOFError, zlib.error, ValueError) as exc:
        raise ConfigError(f"--roi {path}: not GeoJSON ({exc.__class__.__name__}: {str(exc)[:80]})") from exc
    if isinstance(data, dict) and data.get("type") == "FeatureCollection":
        data = data.get("features") or []
    elif isinstance(data, dict) and data.get("type") == "Feature":
        data = [data]
    if not isinstance(data, list) or not all(isinstance(f, dict) and f.get("type") == "Feature" for f in data):
        raise ConfigError(f"--roi {path}: expected a GeoJSON FeatureCollection or an array of features")
    return data


def _class_name(props: dict) -> str | None:
    c = props.get("classification")
    if isinstance(c, dict):
        return c.get("name")
    return c if isinstance(c, str) else None


def load_regions(path: str | Path, *, roi_class: str | None = None) -> tuple[list[str], list[Any]]:
    """Names and shapely (multi)polygons of the regions in ``path``, optionally of one QuPath class."""
    names, chosen, where = [], [], []
    features = read_features(path)
    for i, f in enumerate(features):
        props = f.get("properties") or {}
        geometry = f.get("geometry") or {}
        if not isinstance(geometry, dict) or geometry.get("type") not in ("Polygon", "MultiPolygon"):
            continue  # points, lines: not regions
        if roi_class is not None and _class_name(props) != roi_class:
            continue
        names.append(str(props.get("name") or _class_name(props) or "region"))
        chosen.append(geometry)
        where.append(i)
    if not chosen:
        which = f" of class {roi_class!r}" if roi_class else ""
        classes = sorted({str(_class_name(f.get("properties") or {})) for f in features})
        raise ConfigError(f"--roi {Path(path).name}: no polygon annotations{which} (classes in the file: {', '.join(classes) or 'none'})")
    geoms = _polygons(Path(path), chosen, where)
    _check_geometries(Path(path), names, geoms, where)
    return unique_names(names), list(geoms)


def read_regions(path: str | Path, *, roi_class: str | None = None) -> tuple[list[str], list[Any]]:
    """:func:`load_regions`, parsed once while the file stays the same (its size and modification time):
    every store of a command is matched to one regions file, of up to :data:`MAX_ROI_BYTES`."""
    path = Path(path)
    try:
        stat = path.stat()
    except OSError:
        return load_regions(path, roi_class=roi_class)  # its one-line error
    names, geoms = _read_regions_cached(str(path.absolute()), roi_class, stat.st_mtime_ns, stat.st_size)
    return list(names), list(geoms)


@functools.lru_cache(maxsize=1)  # one file's polygons kept, not every file a long-lived process has read
def _read_regions_cached(path: str, roi_class: str | None, _mtime_ns: int, _size: int) -> tuple[tuple[str, ...], tuple]:
    names, geoms = load_regions(path, roi_class=roi_class)
    return tuple(names), tuple(geoms)


def _polygons(path: Path, geometries: list[dict], where: list[int]) -> NDArray:
    """The shapely polygons of ``geometries``, built in bulk; a malformed one is named in one line."""
    import shapely
    from shapely.geometry import shape

    try:
        return polygons_from_geojson(geometries)
    except (ValueError, TypeError, KeyError, IndexError, AttributeError, shapely.errors.GEOSException):
        pass  # find the feature at fault, one by one
    for geometry, i in zip(geometries, where):
        try:
            shape(geometry)
        except (ValueError, TypeError, KeyError, IndexError, AttributeError, shapely.errors.GEOSException) as exc:
            raise ConfigError(f"--roi {path.name}: feature {i + 1} has unreadable coordinates ({exc})") from exc
    raise ConfigError(f"--roi {path.name}: unreadable polygon coordinates (each must be a list of rings of x, y pairs)")


def _check_geometries(path: Path, names: list[str], geoms: NDArray, where: list[int]) -> None:
    """Finite, sane coordinates and valid polygons with an area, all checked at once (vectorised)."""
    import shapely

    coords, owner = shapely.get_coordinates(geoms, return_index=True)
    bad = ~np.isfinite(coords).all(axis=1) | (np.abs(coords) > MAX_COORD_PX).any(axis=1)
    if bad.any():
        g = int(owner[np.argmax(bad)])
        x, y = coords[np.argmax(bad)]
        raise ConfigError(f"--roi {path.name}: region {names[g]!r} (feature {where[g] + 1}) has the coordinate ({x:g}, {y:g}), "
                          f"not finite or beyond ±{MAX_COORD_PX:g} px; coordinates must be level-0 pixels, as QuPath exports them")
    invalid = ~shapely.is_valid(geoms) | (shapely.area(geoms) <= 0)
    if invalid.any():
        g = int(np.argmax(invalid))
        reason = shapely.is_valid_reason(geoms[g]) if not geoms[g].is_valid else "no area"
        raise ConfigError(f"--roi {path.name}: region {names[g]!r} (feature {where[g] + 1}) has invalid geometry ({reason}); "
                          "fix it in QuPath (Objects > Annotations > Simplify/Fill holes) and export again")


def unique_names(names: list[str]) -> list[str]:
    """Names made unique in one pass: every holder of a repeated name is numbered (``Tumor 1``,
    ``Tumor 2``), skipping numbers another region already uses as its name."""
    counts = Counter(names)
    taken = set(names)
    next_number: dict[str, int] = {}
    out = []
    for n in names:
        if counts[n] == 1:
            out.append(n)
            continue
        k = next_number.get(n, 1)
        while f"{n} {k}" in taken:
            k += 1
        next_number[n] = k + 1
        taken.add(f"{n} {k}")
        out.append(f"{n} {k}")
    return out


def assign_tiles(geoms: list[Any], coords_level0: NDArray, tile_size_level0: float) -> NDArray[np.int64]:
    """Region index per tile (``-1``: no region holds more than half of it); largest share wins.

    Tiles x region pieces (:func:`region_pieces`) through an STRtree; a tile lying wholly inside a
    piece (a prepared-geometry test) counts whole, the others by the area of their intersection."""
    import shapely

    xy = np.asarray(coords_level0, dtype=np.float64).reshape(-1, 2)
    s = float(tile_size_level0)
    group = np.full(len(xy), -1, dtype=np.int64)
    if not len(xy) or not len(geoms):
        return group
    boxes = shapely.box(xy[:, 0], xy[:, 1], xy[:, 0] + s, xy[:, 1] + s)
    pieces, owner = region_pieces(geoms, min_side_px=s / 8)
    tile_idx, piece_idx = shapely.STRtree(pieces).query(boxes, predicate="intersects")
    shapely.prepare(pieces)
    area = np.full(len(tile_idx), s * s)
    partial = ~shapely.contains_properly(pieces[piece_idx], boxes[tile_idx])
    area[partial] = box_overlap_areas(pieces, piece_idx[partial], xy[tile_idx[partial]], s)
    # a tile's share of each region: its pieces' areas added up
    pair, inverse = np.unique(tile_idx * len(geoms) + owner[piece_idx], return_inverse=True)
    share = np.bincount(inverse, weights=area, minlength=len(pair)) / (s * s)
    tiles, regions = pair // len(geoms), pair % len(geoms)
    keep = share > MIN_INSIDE_FRACTION
    order = np.argsort(share[keep], kind="stable")  # ascending: the largest share is written last
    group[tiles[keep][order]] = regions[keep][order]
    return group


def region_groups(store: Any, path: str | Path, *, roi_class: str | None = None) -> TileGroups:
    """Regions of a QuPath export matched to the tiles of ``store`` (see module docstring)."""
    import shapely

    names, geoms = read_regions(path, roi_class=roi_class)
    slide = store.attrs["slide"]
    off = np.asarray(slide.get("bounds_offset_px", (0, 0)), dtype=np.float64)
    geoms = list(shapely.transform(np.asarray(geoms, dtype=object), lambda c: c + off))  # QuPath view -> slide level 0
    w, h = float(slide["width_px"]), float(slide["height_px"])
    outside = ~shapely.intersects(np.asarray(geoms, dtype=object), shapely.box(0, 0, w, h))
    if outside.any():
        x0, y0, x1, y1 = shapely.total_bounds(geoms)
        raise ConfigError(f"--roi: region {names[int(np.argmax(outside))]!r} lies outside the slide ({w:.0f} x {h:.0f} px; "
                          f"regions span x {x0:.0f}-{x1:.0f}, y {y0:.0f}-{y1:.0f}); coordinates must be level-0 pixels, "
                          "as QuPath exports them")
    group = assign_tiles(geoms, store.coords_level0, store.tile_size_level0)
    if not (group >= 0).any():
        shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
        raise ConfigError(f"--roi {Path(path).name}: no tile lies mostly inside the regions ({shown}); "
                          "draw larger regions over tissue, or re-tile with smaller --tile-px")
    return TileGroups(kind="region", names=names, geometries=geoms, tile_group=group)
