"""QuPath-importable GeoJSON: one ``tile`` object per tile, one ``annotation`` for the slide call.

Every rule of ``QUPATH_GEOJSON.md`` (what QuPath's own GeoJSON reader accepts) holds by
construction here:

- ``objectType`` sits inside ``properties`` (``"tile"`` for tiles so *Measure > Show
  measurement maps* can colour them, ``"annotation"`` for the slide call);
- ``classification`` is always the object form ``{"name", "color": [r, g, b]}`` *with*
  ``color`` (the object form without it aborts the whole import), and class names never
  contain ``:`` (reserved by QuPath for derived classes);
- ``measurements`` is an object of name -> finite number; NaN and infinities are dropped
  rather than written (a bare ``NaN`` is not JSON, and a dropped value reads as missing in
  QuPath, which is what it is);
- feature ids are dashed UUID strings, derived with :func:`uuid.uuid5` from
  ``id_namespace`` and the tile index, so a rerun writes byte-identical files;
- coordinates are level-0 pixels with the OpenSlide bounds offset (``openslide.bounds-x/y``)
  subtracted, rounded to QuPath's 0.01 px grid, in closed counter-clockwise rings (the
  RFC 7946 winding, read in the numeric x/y plane);
- QC-rejected tiles are written too, classified ``"QC rejected"``, with the reason in
  ``name`` and ``metadata`` (a string -> string map).
"""
from __future__ import annotations

import gzip as _gzip
import hashlib
import json
import logging
import os
import uuid
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
from numpy.typing import ArrayLike, NDArray

from wsi_her2.jsonable import to_jsonable
from wsi_her2.result import Groups
from wsi_her2.vocab import CLASS_COLORS, HER2_CLASSES, INDETERMINATE, QC_REJECTED
from wsi_her2.errors import ConfigError

log = logging.getLogger(__name__)

# Colours for class names outside CLASS_COLORS (models with other class sets), picked by a
# stable hash of the name so a class keeps its colour from run to run.
_FALLBACK_PALETTE: tuple[tuple[int, int, int], ...] = (
    (86, 180, 233), (240, 228, 66), (0, 0, 0), (153, 153, 153), (117, 112, 179),
    (27, 158, 119), (217, 95, 2), (231, 41, 138),
)
# Fixed root of every id this module writes; with id_namespace it makes ids reproducible.
_ID_ROOT = uuid.uuid5(uuid.NAMESPACE_URL, "https://wsi-her2/qupath-geojson")
_COORD_DECIMALS = 2  # QuPath >= 0.6 snaps to a 0.01 px grid


# --------------------------------------------------------------------------- names, colours


def qupath_class_name(name: str) -> str:
    """QuPath class name for a model class: ``"2+"`` -> ``"HER2 2+"``; other names unchanged.

    Raises
    ------
    ConfigError
        If the name is empty or contains ``:`` (QuPath reads ``a: b`` as a derived class).
    """
    name = str(name)
    out = f"HER2 {name}" if name in HER2_CLASSES or name == INDETERMINATE else name
    if not out.strip():
        raise ConfigError("a class name is empty; give every model class a non-empty name")
    if ":" in out:
        raise ConfigError(
            f"class name {out!r} contains ':', which QuPath reserves for derived classes "
            "(it would import as a different class); rename the class without ':'"
        )
    return out


def class_color(qupath_name: str) -> tuple[int, int, int]:
    """RGB colour of a QuPath class name: :data:`CLASS_COLORS`, else a stable fallback."""
    if qupath_name in CLASS_COLORS:
        return CLASS_COLORS[qupath_name]
    key = int.from_bytes(uuid.uuid5(_ID_ROOT, qupath_name).bytes[:4], "big")
    return _FALLBACK_PALETTE[key % len(_FALLBACK_PALETTE)]


def _classification(qupath_name: str, colors: Mapping[str, Sequence[int]] | None) -> dict:
    rgb = (colors or {}).get(qupath_name) or class_color(qupath_name)
    rgb = [int(c) for c in rgb]
    if len(rgb) != 3 or not all(0 <= c <= 255 for c in rgb):
        raise ConfigError(f"colour of class {qupath_name!r} must be 3 integers in 0..255, got {rgb}")
    return {"name": qupath_name, "color": rgb}


def feature_id(id_namespace: str, key: str) -> str:
    """Deterministic dashed UUID string for one feature (QuPath keeps only that form).

    Equal to ``str(uuid.uuid5(_ID_ROOT, f"{id_namespace}/{key}"))``.
    """
    return str(uuid.uuid5(_ID_ROOT, f"{id_namespace}/{key}"))


def _tile_ids(id_namespace: str, n: int) -> list[str]:
    """``feature_id(id_namespace, f"tile/{i}")`` for ``i < n``, about twice as fast.

    Hashes the shared prefix once and builds the RFC 4122 version-5 UUID by hand; for
    100k tiles :func:`uuid.uuid5` alone costs over a second.
    """
    prefix = hashlib.sha1(_ID_ROOT.bytes + f"{id_namespace}/tile/".encode("utf-8"))
    out: list[str] = []
    for i in range(n):
        h = prefix.copy()
        h.update(str(i).encode("ascii"))
        b = bytearray(h.digest()[:16])
        b[6] = (b[6] & 0x0F) | 0x50  # version 5
        b[8] = (b[8] & 0x3F) | 0x80  # RFC 4122 variant
        x = b.hex()
        out.append(f"{x[:8]}-{x[8:12]}-{x[12:16]}-{x[16:20]}-{x[20:]}")
    return out


# --------------------------------------------------------------------------- tiles


def _square_rings(
    x0: NDArray[np.float64], y0: NDArray[np.float64], size: float
) -> list:
    """Closed counter-clockwise rings ``(N, 5, 2)`` as nested lists, built without a Python loop."""
    x1 = x0 + size
    y1 = y0 + size
    # (x0,y0) -> (x1,y0) -> (x1,y1) -> (x0,y1) -> (x0,y0): positive signed area in the
    # numeric x/y plane, i.e. counter-clockwise as RFC 7946 asks (and as shapely reports).
    xs = np.stack([x0, x1, x1, x0, x0], axis=1)
    ys = np.stack([y0, y0, y1, y1, y0], axis=1)
    rings = np.round(np.stack([xs, ys], axis=2), _COORD_DECIMALS)
    return rings.tolist()


def _finite_measurements(
    measurements: Mapping[str, ArrayLike], n: int
) -> tuple[list[str], list[list[float]], NDArray[np.bool_]]:
    names: list[str] = []
    cols: list[list[float]] = []
    finite_cols: list[NDArray[np.bool_]] = []
    for name, values in measurements.items():
        arr = np.asarray(values, dtype=np.float64).reshape(-1)
        if arr.shape[0] != n:
            raise ConfigError(
                f"measurement {name!r} has {arr.shape[0]} values for {n} tiles; pass one value per tile"
            )
        names.append(str(name))
        cols.append(arr.tolist())
        finite_cols.append(np.isfinite(arr))
    finite = np.stack(finite_cols, axis=1) if finite_cols else np.ones((n, 0), dtype=bool)
    return names, cols, finite


def _checked_tile_inputs(coords_level0, tile_size_level0, class_names, calls, reject_reasons, bounds_offset_px):
    """:func:`tile_features`' inputs as arrays, each checked (one :class:`ConfigError` naming the problem)."""
    xy = np.asarray(coords_level0, dtype=np.float64)
    if xy.ndim != 2 or xy.shape[1] != 2:
        raise ConfigError(f"coords_level0 must have shape (n_tiles, 2), got {xy.shape}")
    n = xy.shape[0]
    calls_arr = np.asarray(calls).reshape(-1)
    if calls_arr.shape[0] != n:
        raise ConfigError(f"calls has {calls_arr.shape[0]} entries for {n} tiles")
    if n and not np.issubdtype(calls_arr.dtype, np.integer):
        raise ConfigError(f"calls must be integer class indices (-1 = rejected), got {calls_arr.dtype}")
    calls_arr = calls_arr.astype(np.int64)
    size = float(tile_size_level0)
    if not np.isfinite(size) or size < 10 ** (-_COORD_DECIMALS):
        raise ConfigError(f"tile_size_level0 must be a positive number of pixels, got {tile_size_level0}")
    if not np.all(np.isfinite(xy)):
        raise ConfigError("coords_level0 contains NaN or infinity")
    off = np.asarray(bounds_offset_px, dtype=np.float64).reshape(-1)
    if off.shape != (2,) or not np.all(np.isfinite(off)):
        raise ConfigError(f"bounds_offset_px must be two finite numbers (x, y), got {bounds_offset_px}")
    qnames = [qupath_class_name(c) for c in class_names]
    if len(set(qnames)) != len(qnames):
        raise ConfigError(f"class names must be distinct, got {list(class_names)}")
    if n and (calls_arr.min() < -1 or calls_arr.max() >= len(qnames)):
        raise ConfigError(
            f"calls must lie in -1..{len(qnames) - 1} for {len(qnames)} classes, got "
            f"{calls_arr.min()}..{calls_arr.max()}"
        )
    if reject_reasons is None:
        reasons: list[str | None] = [None] * n
    else:
        reasons = [r if r else None for r in reject_reasons]
        if len(reasons) != n:
            raise ConfigError(f"reject_reasons has {len(reasons)} entries for {n} tiles")
        clash = [i for i, (r, c) in enumerate(zip(reasons, calls_arr.tolist())) if r and c >= 0]
        if clash:
            raise ConfigError(
                f"{len(clash)} tile(s) (first index {clash[0]}) have both a class call and a QC "
                "reason; set the call to -1 for rejected tiles or clear the reason"
            )
    return xy, calls_arr, size, off, qnames, reasons


def tile_features(
    *,
    coords_level0: ArrayLike,
    tile_size_level0: float,
    class_names: Sequence[str],
    calls: ArrayLike,
    measurements: Mapping[str, ArrayLike],
    reject_reasons: Sequence[str | None] | None = None,
    bounds_offset_px: tuple[float, float] = (0, 0),
    id_namespace: str = "",
    class_colors: Mapping[str, Sequence[int]] | None = None,
) -> list[dict]:
    """One QuPath ``tile`` feature per tile, scored or QC-rejected.

    Parameters
    ----------
    coords_level0
        ``(N, 2)`` top-left ``[x, y]`` of each tile in level-0 pixels of the slide file.
    tile_size_level0
        Tile side in level-0 pixels (may be fractional when the tile MPP differs from level 0).
    class_names
        Model class names by class index (``"0"``, ``"1+"``, ...); HER2 scores become
        ``"HER2 0"``, ... in QuPath (see :func:`qupath_class_name`).
    calls
        ``(N,)`` class index per tile; ``-1`` marks a tile that was rejected or not scored.
    measurements
        Name -> ``(N,)`` numbers (probabilities, tissue fraction, blur score ...). Non-finite
        values are left out of that tile's measurements.
    reject_reasons
        Optional ``(N,)`` QC reason per tile (``None`` or ``""`` for tiles that passed).
        A rejected tile without a reason is labelled ``"not scored"``.
    bounds_offset_px
        ``(openslide.bounds-x, openslide.bounds-y)``; subtracted so the overlay lines up with
        the cropped image QuPath shows for such slides.
    id_namespace
        Salt of the deterministic ids, e.g. the slide's SHA-256 or file name.
    class_colors
        Optional QuPath class name -> RGB overrides of :data:`CLASS_COLORS`.

    Returns
    -------
    list of dict
        GeoJSON features in input order.

    Raises
    ------
    ConfigError
        On mismatched lengths, out-of-range calls, a class name with ``:``, a non-positive
        tile size, or a tile that has both a class call and a QC reason.
    """
    xy, calls_arr, size, off, qnames, reasons = _checked_tile_inputs(
        coords_level0, tile_size_level0, class_names, calls, reject_reasons, bounds_offset_px)
    n = xy.shape[0]

    # Shared objects: json serialises them by value, so one dict per class is enough and
    # saves building 100k identical dicts.
    classif = [_classification(q, class_colors) for q in qnames]
    rejected_classif = _classification(QC_REJECTED, class_colors)
    rings = _square_rings(xy[:, 0] - off[0], xy[:, 1] - off[1], size)
    features: list[dict] = []
    for fid, ring, call, reason, meas in zip(
        _tile_ids(id_namespace, n), rings, calls_arr.tolist(), reasons, _tile_measurement_dicts(measurements, n)
    ):
        props: dict[str, Any] = {"objectType": "tile", "isLocked": True}
        if call >= 0:
            props["classification"] = classif[call]
        else:
            why = reason or "not scored"
            props["name"] = f"{QC_REJECTED} ({why})"
            props["classification"] = rejected_classif
            props["metadata"] = {"qc_reason": str(why)}
        props["measurements"] = meas
        features.append({"type": "Feature", "id": fid, "geometry": {"type": "Polygon", "coordinates": [ring]},
                         "properties": props})
    return features


def _tile_measurement_dicts(measurements: Mapping[str, ArrayLike], n: int) -> list[dict[str, float]]:
    """One ``name -> value`` dict per tile, leaving out that tile's non-finite values."""
    m_names, m_cols, m_finite = _finite_measurements(measurements, n)
    all_finite = m_finite.all(axis=1).tolist()
    m_rows = list(zip(*m_cols)) if m_cols else [()] * n
    return [
        dict(zip(m_names, row)) if ok else {k: v for k, v, f in zip(m_names, row, m_finite[i]) if f}
        for i, (row, ok) in enumerate(zip(m_rows, all_finite))
    ]


# --------------------------------------------------------------------------- slide


def _slide_ring(
    polygon_coords: ArrayLike | None,
    bbox: Sequence[float] | None,
    off: NDArray[np.float64],
) -> dict:
    import shapely
    from shapely.geometry import Polygon, mapping
    from shapely.geometry.polygon import orient

    if (polygon_coords is None) == (bbox is None):
        raise ConfigError("give exactly one of polygon_coords or bbox for the slide annotation")
    if bbox is not None:
        x0, y0, x1, y1 = (float(v) for v in bbox)
        if not (x1 > x0 and y1 > y0):
            raise ConfigError(f"bbox must be (x0, y0, x1, y1) with x1 > x0 and y1 > y0, got {bbox}")
        pts = np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]], dtype=np.float64)
    else:
        pts = np.asarray(polygon_coords, dtype=np.float64)
        if pts.ndim != 2 or pts.shape[1] != 2 or pts.shape[0] < 3:
            raise ConfigError(f"polygon_coords must be (n >= 3, 2) level-0 points, got {pts.shape}")
    pts = np.round(pts - off, _COORD_DECIMALS)
    geom = Polygon(pts)
    if not geom.is_valid:
        # Tissue contours can self-touch or cross; QuPath may refuse such a polygon.
        geom = shapely.make_valid(geom)
    # Snap to QuPath's 0.01 px grid here, so its own snapping cannot create an invalid ring;
    # set_precision keeps the output valid, and the final round only removes float noise.
    geom = shapely.set_precision(geom, 10 ** (-_COORD_DECIMALS))
    geom = shapely.transform(geom, lambda c: np.round(c, _COORD_DECIMALS))
    if geom.geom_type == "Polygon":
        geom = orient(geom, sign=1.0)
    elif geom.geom_type == "MultiPolygon":
        geom = shapely.MultiPolygon([orient(g, sign=1.0) for g in geom.geoms])
    else:
        polys = [g for g in getattr(geom, "geoms", []) if g.geom_type == "Polygon"]
        if not polys:
            raise ConfigError("slide polygon has no area after repair; pass a bbox instead")
        geom = shapely.MultiPolygon([orient(g, sign=1.0) for g in polys])
    if geom.is_empty or geom.area <= 0:
        raise ConfigError("slide polygon has no area; pass a bbox instead")
    out = mapping(geom)
    # mapping() returns tuples; lists keep the JSON identical to what json.load gives back.
    return json.loads(json.dumps(out))


def slide_feature(
    *,
    slide_call: Mapping[str, Any],
    polygon_coords: ArrayLike | None = None,
    bbox: Sequence[float] | None = None,
    bounds_offset_px: tuple[float, float] = (0, 0),
    id_namespace: str = "",
    class_colors: Mapping[str, Sequence[int]] | None = None,
) -> dict:
    """The slide-level annotation carrying the HER2 call.

    Parameters
    ----------
    slide_call
        :meth:`wsi_her2.score.aggregate.SlideCall.to_dict` output (needs ``her2_score``,
        ``confidence``, ``method``, ``n_tiles_used``; uses ``class_fractions`` and
        ``details`` when present).
    polygon_coords, bbox
        Exactly one: an outline ``(M, 2)`` (e.g. the tissue contour) or ``(x0, y0, x1, y1)``,
        in level-0 pixels of the slide file. Invalid outlines are repaired with shapely.
    bounds_offset_px, id_namespace, class_colors
        As :func:`tile_features`.

    Returns
    -------
    dict
        A GeoJSON feature with ``objectType`` ``"annotation"``, classified ``"HER2 <score>"``,
        measurements ``confidence``, ``n_tiles_used`` and ``fraction <class>``, and the full
        call (JSON) under ``metadata["slide_call"]``.
    """
    missing = [k for k in ("her2_score", "confidence", "method", "n_tiles_used") if k not in slide_call]
    if missing:
        raise ConfigError(f"slide_call lacks {missing}; pass SlideCall.to_dict()")
    score = str(slide_call["her2_score"])
    if score not in HER2_CLASSES and score != INDETERMINATE:
        raise ConfigError(f"her2_score must be one of {HER2_CLASSES + (INDETERMINATE,)}, got {score!r}")
    off = np.asarray(bounds_offset_px, dtype=np.float64).reshape(-1)
    if off.shape != (2,) or not np.all(np.isfinite(off)):
        raise ConfigError(f"bounds_offset_px must be two finite numbers (x, y), got {bounds_offset_px}")
    qname = qupath_class_name(score)
    confidence = float(slide_call["confidence"])
    method = str(slide_call["method"])
    meas: dict[str, float] = {
        "confidence": confidence,
        "n_tiles_used": float(slide_call["n_tiles_used"]),
    }
    for cls, frac in (slide_call.get("class_fractions") or {}).items():
        meas[f"fraction {qupath_class_name(cls)}"] = float(frac)
    details = slide_call.get("details") or {}
    if details.get("unit") == "tumour cells":  # cell-level call: the percentages that decided it
        meas["tumour cells"] = float(details.get("tumour_cells", np.nan))
        for k, v in (details.get("fraction_at_least") or {}).items():
            meas[f"tumour cells {k} %"] = 100.0 * float(v)
    meas = {k: v for k, v in meas.items() if np.isfinite(v)}
    props = {
        "objectType": "annotation",
        "isLocked": True,
        "name": f"Slide call: {qname} ({method}{_criteria_note(slide_call)}, confidence {confidence:.2f})",
        "classification": _classification(qname, class_colors),
        "measurements": meas,
        "metadata": {
            "her2_score": score,
            "her2_category": str(slide_call.get("her2_category_text", slide_call.get("her2_category", ""))),
            "method": method,
            "criteria": str((slide_call.get("criteria") or {}).get("rule", "")),
            "slide_call": json.dumps(to_jsonable(dict(slide_call)), sort_keys=True),
        },
    }
    return {
        "type": "Feature",
        "id": feature_id(id_namespace, "slide"),
        "geometry": _slide_ring(polygon_coords, bbox, off),
        "properties": props,
    }


def _criteria_note(slide_call: Mapping) -> str:
    """``", gastric, biopsy (...)"`` for the annotation's name: the guideline the call was made under."""
    rule = (slide_call.get("criteria") or {}).get("rule")
    return f", {rule}" if rule else ""


# --------------------------------------------------------------------------- TMA cores, regions


def part_features(groups: Groups, *, bounds_offset_px: Sequence[float], id_namespace: str) -> list[dict]:
    """One QuPath annotation per called part (TMA core, region): its outline, classified by its call, with
    its measurements; parts not called (blank, missing) are in their table only."""
    import shapely
    from shapely.geometry import mapping

    off = np.asarray(bounds_offset_px, dtype=np.float64)
    label = "Core" if groups.kind == "core" else "Region"
    features = []
    for part in groups.parts:
        if not part.called:
            continue
        r = part.columns
        qname = qupath_class_name(str(r["her2_score"]))
        geom = shapely.transform(part.geometry, lambda c: np.round(c - off, 2))
        meas = {"confidence": r["confidence"], "n_tiles_used": part.tiles_used, "area_mm2": part.area_mm2,
                **{f"fraction {qupath_class_name(c)}": r[f"frac_{c}"] for c in HER2_CLASSES},
                **{f"tumour cells >={k} %": 100.0 * r[f"at_least_{k}"] for k in ("1+", "2+", "3+") if r[f"at_least_{k}"] != ""}}
        if r["tumour_cells"] != "":
            meas["tumour cells"] = r["tumour_cells"]
        features.append({
            "type": "Feature",
            "id": feature_id(id_namespace, f"{groups.kind}:{part.name}"),
            "geometry": json.loads(json.dumps(mapping(geom))),
            "properties": {
                "objectType": "annotation",
                "name": f"{label} {part.name}: {qname} (confidence {float(r['confidence']):.2f})",
                "classification": _classification(qname, None),
                "measurements": {k: float(v) for k, v in meas.items() if np.isfinite(float(v))},
                "metadata": {"her2_score": str(r["her2_score"]), groups.kind: part.name, "her2_category": str(r["her2_category"]),
                             "criteria": part.call.criteria["rule"]},
            },
        })
    return features


# --------------------------------------------------------------------------- collection, file


def build_feature_collection(tiles: list[dict], slide: dict | None) -> dict:
    """A ``FeatureCollection`` with the slide annotation (if any) first, then the tiles.

    Tiles are kept flat rather than nested as ``childObjects`` of the slide annotation so
    that GIS readers (geopandas, GDAL) see them too; QuPath resolves the hierarchy itself.
    """
    features = ([slide] if slide is not None else []) + list(tiles)
    return {"type": "FeatureCollection", "features": features}


def write_geojson(fc: dict, path: str | os.PathLike, *, gzip: bool = False) -> Path:
    """Write ``fc`` as ``.geojson`` (or ``.json``), gzip-compressed as ``.geojson.gz``.

    The file is written to a temporary name and renamed, so a crash never leaves a
    half-written overlay; gzip output carries no timestamp or file name, so reruns produce
    identical bytes. ``gzip=True`` appends ``.gz`` if the path lacks it; a path ending in
    ``.gz`` is always compressed.

    Returns
    -------
    Path
        The path written.

    Raises
    ------
    ConfigError
        If the suffix is not one QuPath imports, or the collection holds a non-finite number.
    """
    path = Path(path)
    if gzip and path.suffix != ".gz":
        path = path.with_name(path.name + ".gz")
    compress = path.suffix == ".gz"
    inner = Path(path.stem) if compress else path
    if inner.suffix not in (".geojson", ".json"):
        raise ConfigError(
            f"{path} must end in .geojson, .json, .geojson.gz or .json.gz for QuPath to import it"
        )
    try:
        text = json.dumps(fc, separators=(",", ":"), allow_nan=False)
    except ValueError as err:
        raise ConfigError(f"GeoJSON for {path} holds a NaN or infinite number ({err}); drop it") from err
    data = text.encode("utf-8")
    if compress:
        # mtime=0 and no file name in the header: identical inputs give identical bytes.
        data = _gzip.compress(data, compresslevel=6, mtime=0)
    path.parent.mkdir(parents=True, exist_ok=True)
    from wsi_her2.files import atomic_write_bytes

    atomic_write_bytes(path, data)  # temporary name + rename; the mode follows the umask like every output
    log.info("wrote %d features to %s (%.1f MB)", len(fc.get("features", [])), path, len(data) / 1e6)
    return path
