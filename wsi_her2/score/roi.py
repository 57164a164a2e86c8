"""Regions of interest from QuPath: ``wsi-her2 score --roi annotations.geojson [--roi-class Tumor]``.

QuPath's File > Export objects writes either a ``FeatureCollection`` or a bare JSON array of
features (optionally gzip-compressed), coordinates in level-0 pixels of the image *as QuPath
shows it* (OpenSlide's bounds offset already subtracted, see QUPATH_GEOJSON.md), polygons and
multipolygons with holes. A tile is scored when more than :data:`MIN_INSIDE_FRACTION` of its
area lies inside a region; tiles are matched to regions through a spatial index and vectorised
intersections (shapely 2 / geopandas), not a Python loop over tiles x polygons.
"""
from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from wsi_her2.errors import ConfigError
from wsi_her2.score.tile_groups import TileGroups

MIN_INSIDE_FRACTION = 0.5  # "mostly inside": more than half of the tile's area


def read_features(path: str | Path) -> list[dict]:
    """The features of a QuPath export: FeatureCollection, bare feature array, or one feature."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--roi {path}: no such file; export the annotations from QuPath (File > Export objects)")
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
        data = json.loads(raw)
    except (OSError, ValueError) as exc:
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
    import shapely
    from shapely.geometry import shape

    names, geoms = [], []
    features = read_features(path)
    for i, f in enumerate(features):
        props = f.get("properties") or {}
        gtype = (f.get("geometry") or {}).get("type")
        if gtype not in ("Polygon", "MultiPolygon"):
            continue  # points, lines: not regions
        if roi_class is not None and _class_name(props) != roi_class:
            continue
        try:
            geom = shape(f["geometry"])
        except (ValueError, TypeError, KeyError, IndexError, shapely.errors.GEOSException) as exc:
            raise ConfigError(f"--roi {Path(path).name}: feature {i + 1} has unreadable coordinates ({exc})") from exc
        label = props.get("name") or _class_name(props) or "region"
        if not geom.is_valid or geom.area <= 0:
            reason = shapely.is_valid_reason(geom) if not geom.is_valid else "no area"
            raise ConfigError(f"--roi {Path(path).name}: region {label!r} (feature {i + 1}) has invalid geometry ({reason}); "
                              "fix it in QuPath (Objects > Annotations > Simplify/Fill holes) and export again")
        names.append(str(label))
        geoms.append(geom)
    if not geoms:
        which = f" of class {roi_class!r}" if roi_class else ""
        classes = sorted({str(_class_name(f.get("properties") or {})) for f in features})
        raise ConfigError(f"--roi {Path(path).name}: no polygon annotations{which} (classes in the file: {', '.join(classes) or 'none'})")
    return _unique(names), geoms


def _unique(names: list[str]) -> list[str]:
    seen: dict[str, int] = {}
    out = []
    for n in names:
        seen[n] = seen.get(n, 0) + 1
        out.append(n if seen[n] == 1 and names.count(n) == 1 else f"{n} {seen[n]}")
    return out


def assign_tiles(geoms: list[Any], coords_level0: NDArray, tile_size_level0: float) -> NDArray[np.int64]:
    """Region index per tile (``-1``: no region holds more than half of it); largest share wins."""
    import geopandas as gpd
    import shapely

    xy = np.asarray(coords_level0, dtype=np.float64).reshape(-1, 2)
    s = float(tile_size_level0)
    boxes = shapely.box(xy[:, 0], xy[:, 1], xy[:, 0] + s, xy[:, 1] + s)
    regions = gpd.GeoSeries(geoms)
    region_idx, tile_idx = regions.sindex.query(boxes, predicate="intersects")[::-1]
    share = shapely.area(shapely.intersection(boxes[tile_idx], np.asarray(geoms, dtype=object)[region_idx])) / (s * s)
    group = np.full(len(xy), -1, dtype=np.int64)
    keep = share > MIN_INSIDE_FRACTION
    order = np.argsort(share[keep], kind="stable")  # ascending: the largest share is written last
    group[tile_idx[keep][order]] = region_idx[keep][order]
    return group


def region_groups(store: Any, path: str | Path, *, roi_class: str | None = None) -> TileGroups:
    """Regions of a QuPath export matched to the tiles of ``store`` (see module docstring)."""
    import shapely

    names, geoms = load_regions(path, roi_class=roi_class)
    slide = store.attrs["slide"]
    off = np.asarray(slide.get("bounds_offset_px", (0, 0)), dtype=np.float64)
    geoms = [shapely.transform(g, lambda c: c + off) for g in geoms]  # QuPath view -> slide file level 0
    w, h = float(slide["width_px"]), float(slide["height_px"])
    frame = shapely.box(0, 0, w, h)
    outside = [n for n, g in zip(names, geoms) if not g.intersects(frame)]
    if outside:
        x0, y0, x1, y1 = shapely.total_bounds(geoms)
        raise ConfigError(f"--roi: region {outside[0]!r} lies outside the slide ({w:.0f} x {h:.0f} px; regions span "
                          f"x {x0:.0f}-{x1:.0f}, y {y0:.0f}-{y1:.0f}); coordinates must be level-0 pixels, as QuPath exports them")
    group = assign_tiles(geoms, store.coords_level0, store.tile_size_level0)
    if not (group >= 0).any():
        raise ConfigError(f"--roi {Path(path).name}: no tile lies mostly inside the regions ({', '.join(names)}); "
                          "draw larger regions over tissue, or re-tile with smaller --tile-px")
    return TileGroups(kind="region", names=names, geometries=geoms, tile_group=group, source=str(path))
