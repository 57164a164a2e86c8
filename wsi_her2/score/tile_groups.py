"""Named parts of a slide scored separately: regions drawn in QuPath, or the cores of a TMA.

A :class:`TileGroups` assigns each tile to at most one part (``-1``: in none). The score stage
scores only tiles in some part, calls each part with the slide's aggregation rule, and writes
one row per part (``regions.csv`` / ``cores.csv``, upserted by slide like ``slides.csv``) and one
QuPath annotation per part carrying its call and measurements.
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
from wsi_her2.vocab import HER2_CLASSES

GROUP_COLUMNS = [
    "slide", "name", "status", "her2_score", "confidence", "frac_0", "frac_1+", "frac_2+", "frac_3+",
    "tiles_used", "tiles_rejected", "area_mm2", "row", "col", "x_level0", "y_level0", "note",
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

    def call_each(
        self, probs: NDArray, scored: NDArray[np.bool_], *, aggregate: Callable[..., Any], min_tiles: int,
        qc_pass: NDArray[np.bool_], mpp_um: float,
    ) -> list[dict]:
        """One row per part (in name order for regions, grid order for cores), unscored parts included."""
        rows = []
        for g, name in enumerate(self.names):
            members = self.tile_group == g
            use = members & scored
            call = aggregate(probs[use], min_tiles=min_tiles).to_dict()
            fr = call.get("class_fractions", {}) or {}
            cx, cy = self.geometries[g].centroid.coords[0]
            row = {
                "name": name, "status": "scored", "her2_score": call["her2_score"],
                "confidence": round(float(call["confidence"]), 4),
                **{f"frac_{c}": round(float(fr.get(c, 0.0)), 4) for c in HER2_CLASSES},
                "tiles_used": int(use.sum()), "tiles_rejected": int((members & ~qc_pass).sum()),
                "area_mm2": round(float(self.geometries[g].area) * (mpp_um / 1000.0) ** 2, 4),
                "x_level0": round(cx, 1), "y_level0": round(cy, 1), "note": "", "call": call,
            }
            if self.grid is not None:
                row["row"], row["col"] = self.grid[g]
            rows.append(row)
        for u in self.unscored:
            rows.append({"her2_score": "", "confidence": "", "tiles_used": 0, **u})
        return rows


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
                **{f"fraction {qupath_class_name(c)}": r[f"frac_{c}"] for c in HER2_CLASSES}}
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
                "metadata": {"her2_score": str(r["her2_score"]), groups.kind: name},
            },
        })
    return features


def score_groups(out: Path, store: Any, groups: TileGroups, *, pred: Any, calls: NDArray, classes: list[str],
                 config: Any, slide_call: dict) -> dict:
    """Call each part, write ``regions.csv`` / ``cores.csv`` (and the TMA picture); return rows, features, outputs."""
    from wsi_her2.score.aggregate import AGGREGATORS

    rows = groups.call_each(pred.probs, pred.scored, aggregate=AGGREGATORS[config.agg], min_tiles=config.min_tiles,
                            qc_pass=store.qc_pass, mpp_um=float(store.attrs["slide"]["mpp_um"]))
    for r in rows:  # too little usable tissue: reported, never called
        if r["status"] == "scored" and r["tiles_used"] < config.min_tiles:
            r.update(status="blank" if groups.kind == "core" else "too few tiles", her2_score="",
                     note=f"{r['tiles_used']} usable tiles, fewer than --min-tiles {config.min_tiles}")
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
