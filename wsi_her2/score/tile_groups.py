"""Named parts of a slide scored separately: regions drawn in QuPath, or the cores of a TMA.

A :class:`TileGroups` assigns each tile to at most one part (``-1``: in none). The score stage
scores only tiles in some part, calls each part with exactly the slide's rule (the same
function on the part's tiles: :func:`wsi_her2.score.part_call.call_tiles`), and writes one row
per part (``regions.csv`` / ``cores.csv``, upserted by slide like ``slides.csv``) and one QuPath
annotation per part carrying its call, the criteria and the tumour-cell percentages.
"""
from __future__ import annotations

import csv
import io
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from wsi_her2.csv_cells import safe_cell, safe_dict_row
from wsi_her2.files import atomic_write_text
from wsi_her2.vocab import HER2_CLASSES, INDETERMINATE

GROUP_COLUMNS = [
    "slide", "name", "status", "her2_score", "confidence", "frac_0", "frac_1+", "frac_2+", "frac_3+",
    "tiles_used", "tiles_rejected", "area_mm2", "row", "col", "x_level0", "y_level0", "note",
    "her2_category", "tumour_cells", "at_least_1+", "at_least_2+", "at_least_3+", "largest_cluster",
    "criteria", "specimen",
]


@dataclass
class TileGroups:
    """Parts of one slide: ``kind`` is ``"region"`` or ``"core"``.

    ``geometries`` are shapely polygons in level-0 pixels of the slide file. ``grid`` holds
    ``(row, col)`` per part (TMA), ``unscored`` the parts reported but never scored (missing
    or blank cores) as dicts with ``name``, ``status``, ``note`` and optional ``x_level0``, ``y_level0``.
    """

    kind: str
    names: list[str]
    geometries: list[Any]
    tile_group: NDArray[np.int64]
    grid: list[tuple[int, int]] | None = None
    unscored: list[dict] = field(default_factory=list)
    source: str = ""

    @property
    def inside(self) -> NDArray[np.bool_]:
        return self.tile_group >= 0

    def members(self) -> list[NDArray[np.int64]]:
        """Each part's tile indices (one sort of the tiles, not one pass over them per part)."""
        order = np.argsort(self.tile_group, kind="stable")
        bounds = np.searchsorted(self.tile_group[order], np.arange(len(self.names) + 1))
        return [order[bounds[g]: bounds[g + 1]] for g in range(len(self.names))]

    def call_each(self, call_part: Callable[[NDArray[np.int64]], dict], scored: NDArray[np.bool_], *,
                  qc_pass: NDArray[np.bool_], mpp_um: float) -> list[dict]:
        """One row per part (in name order for regions, grid order for cores), unscored parts included;
        ``call_part``: the slide's rule applied to some tiles (``call_tiles`` with the slide's settings)."""
        rows = []
        for g, (name, members) in enumerate(zip(self.names, self.members())):
            call = call_part(members)
            cx, cy = self.geometries[g].centroid.coords[0]
            row = {"name": name, "status": "scored", "tiles_used": int(scored[members].sum()),
                   "tiles_rejected": int((~qc_pass[members]).sum()),
                   "area_mm2": round(float(self.geometries[g].area) * (mpp_um / 1000.0) ** 2, 4),
                   "x_level0": round(cx, 1), "y_level0": round(cy, 1), "note": "", **call_columns(call), "call": call}
            if self.grid is not None:
                row["row"], row["col"] = self.grid[g]
            rows.append(row)
        for u in self.unscored:
            rows.append({"her2_score": "", "confidence": "", "tiles_used": 0, **u})
        return rows


def call_columns(call: dict) -> dict:
    """The columns of a part's row that come from its call: score, confidence, fractions, the
    tumour-cell percentages and clusters behind it, the criteria."""
    fr = call.get("class_fractions", {}) or {}
    details = call.get("details", {}) or {}
    at_least = details.get("fraction_at_least", {})
    clusters = details.get("largest_cluster")
    crit = call.get("criteria", {}) or {}
    return {
        "her2_score": call["her2_score"], "confidence": round(float(call["confidence"]), 4),
        **{f"frac_{c}": round(float(fr.get(c, 0.0)), 4) for c in HER2_CLASSES},
        "her2_category": call.get("her2_category", ""), "tumour_cells": details.get("tumour_cells", ""),
        **{f"at_least_{k}": round(float(at_least[f">={k}"]), 4) if f">={k}" in at_least else "" for k in ("1+", "2+", "3+")},
        "largest_cluster": " ".join(f"{k.removeprefix('>=')}:{v}" for k, v in clusters.items()) if clusters else "",
        "criteria": crit.get("criteria", ""), "specimen": crit.get("specimen", ""),
    }


def upsert_rows_csv(path: Path, slide_id: str, rows: list[dict]) -> Path:
    """Replace this slide's rows in a per-part CSV (other slides' rows kept), atomically."""
    kept: list[dict] = []
    if path.exists():
        with path.open(newline="") as fh:
            kept = [r for r in csv.DictReader(fh) if r.get("slide") != safe_cell(slide_id)]
    new = [safe_dict_row({k: r.get(k, "") for k in GROUP_COLUMNS} | {"slide": slide_id}) for r in rows]
    buf = io.StringIO(newline="")
    writer = csv.DictWriter(buf, fieldnames=GROUP_COLUMNS, extrasaction="ignore")
    writer.writeheader()
    for r in sorted(kept + new, key=lambda r: (r["slide"], str(r.get("name", "")))):
        writer.writerow(safe_dict_row(r))
    atomic_write_text(path, buf.getvalue())
    return path


def group_features(groups: TileGroups, rows: list[dict], *, bounds_offset_px, id_namespace: str) -> list[dict]:
    """One QuPath annotation per scored part: its outline, classified by its call, with measurements."""
    import json

    import shapely
    from shapely.geometry import mapping

    from wsi_her2.outputs.geojson import _classification, feature_id, qupath_class_name

    off = np.asarray(bounds_offset_px, dtype=np.float64)
    by_name = {r["name"]: r for r in rows if r["status"] == "scored"}
    features = []
    for name, geom in zip(groups.names, groups.geometries):
        r = by_name.get(name)
        if r is None:  # blank core, region without usable tiles: reported in the CSV, not drawn as a call
            continue
        qname = qupath_class_name(str(r["her2_score"]))
        geom = shapely.transform(geom, lambda c: np.round(c - off, 2))
        meas = {"confidence": r["confidence"], "n_tiles_used": r["tiles_used"], "area_mm2": r["area_mm2"],
                **{f"fraction {qupath_class_name(c)}": r[f"frac_{c}"] for c in HER2_CLASSES},
                **{f"tumour cells >={k} %": 100.0 * r[f"at_least_{k}"] for k in ("1+", "2+", "3+") if r[f"at_least_{k}"] != ""}}
        if r["tumour_cells"] != "":
            meas["tumour cells"] = r["tumour_cells"]
        label = "Core" if groups.kind == "core" else "Region"
        features.append({
            "type": "Feature",
            "id": feature_id(id_namespace, f"{groups.kind}:{name}"),
            "geometry": json.loads(json.dumps(mapping(geom))),
            "properties": {
                "objectType": "annotation",
                "name": f"{label} {name}: {qname} (confidence {float(r['confidence']):.2f})",
                "classification": _classification(qname, None),
                "measurements": {k: float(v) for k, v in meas.items() if np.isfinite(float(v))},
                "metadata": {"her2_score": str(r["her2_score"]), groups.kind: name, "her2_category": str(r["her2_category"]),
                             "criteria": r["call"]["criteria"]["rule"]},
            },
        })
    return features


def score_groups(out: Path, store: Any, groups: TileGroups, *, pred: Any, calls: NDArray, classes: list[str],
                 call_part: Callable[[NDArray[np.int64]], dict], min_tiles: int) -> dict:
    """Call each part with ``call_part`` (the slide's rule), write ``regions.csv`` / ``cores.csv`` (and the
    TMA picture); return rows, features, outputs."""
    rows = groups.call_each(call_part, pred.scored, qc_pass=store.qc_pass, mpp_um=float(store.attrs["slide"]["mpp_um"]))
    for r in rows:  # too little usable tissue: reported, never called
        if r["status"] == "scored" and r["tiles_used"] < min_tiles and r["her2_score"] == INDETERMINATE:
            r.update(status="blank" if groups.kind == "core" else "too few tiles", her2_score="",
                     note=f"{r['tiles_used']} usable tiles, fewer than --min-tiles {min_tiles}")
    slide = store.attrs["slide"]
    features = group_features(groups, rows, bounds_offset_px=tuple(slide.get("bounds_offset_px", (0, 0))),
                              id_namespace=slide["sha256"])
    csv_path = upsert_rows_csv(out / f"{groups.kind}s.csv", store.slide_id, rows)
    outputs = {f"{groups.kind}s_csv": str(csv_path)}
    if groups.kind == "core":
        from wsi_her2.score.tma import write_tma_picture

        outputs["tma_png"] = str(write_tma_picture(out / f"{store.slide_id}.tma.png", store, groups, rows, calls=calls,
                                                   classes=classes))
        scored = sum(r["status"] == "scored" for r in rows)
        name = f"; TMA: {scored} cores called, {len(rows) - scored} not (cores.csv)"
    else:
        name = f" over {len(groups.names)} region(s): {', '.join(groups.names)}"
    return {"rows": [{k: v for k, v in r.items() if k != "call"} for r in rows], "features": features,
            "outputs": outputs, "slide_name": name}
