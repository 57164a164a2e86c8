"""Regions from QuPath (--roi): only tiles mostly inside are scored, one call per region plus the slide call."""
from __future__ import annotations

import gzip
import json

import numpy as np
import pandas as pd
import pytest

from wsi_her2.cli import main
from wsi_her2.errors import ConfigError
from wsi_her2.score.roi import assign_tiles, load_regions

BLOCK = 448  # 2 x 2 tiles of 224 px per graded block: a tiny slide, fast to score


def square(x, y, side, hole=None):
    ring = [[x, y], [x + side, y], [x + side, y + side], [x, y + side], [x, y]]
    rings = [ring]
    if hole:
        hx, hy, hs = hole
        rings.append([[hx, hy], [hx, hy + hs], [hx + hs, hy + hs], [hx + hs, hy], [hx, hy]])
    return {"type": "Polygon", "coordinates": rings}


def feature(geometry, cls=None, name=None):
    props = {"objectType": "annotation"}
    if cls:
        props["classification"] = {"name": cls, "color": [200, 0, 0]}
    if name:
        props["name"] = name
    return {"type": "Feature", "geometry": geometry, "properties": props}


@pytest.fixture(scope="module")
def tiny_graded_store(tmp_path_factory):
    from wsi_her2.synthetic.slides import graded_ihc_spec, write_synthetic_slide
    from wsi_her2.tile.pipeline import TileConfig, tile_slide

    d = tmp_path_factory.mktemp("roi")
    spec = graded_ihc_spec(block_px=BLOCK, dust=False)  # grades 0 1 / 2 3 at blocks (1,1) (3,1) / (1,3) (3,3)
    slide = write_synthetic_slide(d / "tiny.svs", spec)
    return tile_slide(slide, d / "out", config=TileConfig(workers=1)).store


def test_tiles_mostly_inside_are_assigned_with_holes_and_multipolygons():
    from shapely.geometry import shape

    coords = np.array([[0, 0], [100, 0], [200, 0], [0, 100]])
    poly = shape(square(0, 0, 150, hole=(0, 0, 1)))  # covers tile 0 fully, tile 1 half (not mostly)
    ring = shape(square(150, -50, 300, hole=(190, -10, 120)))  # tile 2 lies in the hole
    multi = shape({"type": "MultiPolygon", "coordinates": [square(-10, 90, 120)["coordinates"]]})
    assert assign_tiles([poly, ring, multi], coords, 100).tolist() == [0, -1, -1, 2]


def test_qupath_array_and_collection_forms_and_class_filter(tmp_path):
    feats = [feature(square(0, 0, 10), "Tumor", "invasive"), feature(square(20, 0, 10), "Stroma"),
             {"type": "Feature", "geometry": {"type": "Point", "coordinates": [1, 1]}, "properties": {}}]
    (tmp_path / "a.geojson").write_text(json.dumps(feats))
    (tmp_path / "c.geojson.gz").write_bytes(gzip.compress(json.dumps({"type": "FeatureCollection", "features": feats}).encode()))
    for name in ("a.geojson", "c.geojson.gz"):
        names, geoms = load_regions(tmp_path / name)
        assert names == ["invasive", "Stroma"] and len(geoms) == 2
    names, _ = load_regions(tmp_path / "a.geojson", roi_class="Tumor")
    assert names == ["invasive"]
    with pytest.raises(ConfigError, match="no polygon annotations of class 'Lymph'.*Stroma"):
        load_regions(tmp_path / "a.geojson", roi_class="Lymph")


def test_bow_tie_polygon_is_refused(tmp_path):
    bow = {"type": "Polygon", "coordinates": [[[0, 0], [10, 10], [10, 0], [0, 10], [0, 0]]]}
    (tmp_path / "bad.geojson").write_text(json.dumps([feature(bow, name="bow")]))
    with pytest.raises(ConfigError, match="invalid geometry.*Self-intersection"):
        load_regions(tmp_path / "bad.geojson")


def run_score(store, roi, tmp_path, *extra):
    return main(["score", str(store), "-o", str(tmp_path), "--roi", str(roi), "--min-tiles", "2", "--overwrite", *extra])


def test_score_with_regions_calls_each_region(tiny_graded_store, tmp_path, capsys):
    b = BLOCK
    feats = [feature(square(3 * b, b, b), "Tumor", "top right"),  # grade 1 block
             feature(square(3 * b, 3 * b, b), "Tumor", "bottom right"),  # grade 3 block
             feature(square(b, b, b), "Stroma", "ignored")]
    roi = tmp_path / "regions.geojson"
    roi.write_text(json.dumps({"type": "FeatureCollection", "features": feats}))
    assert run_score(tiny_graded_store, roi, tmp_path, "--roi-class", "Tumor") == 0
    sid = tiny_graded_store.name.removesuffix(".zarr")
    regions = pd.read_csv(tmp_path / "regions.csv", dtype=str).set_index("name")
    assert regions.loc["top right", "her2_score"] == "1+" and regions.loc["bottom right", "her2_score"] == "3+"
    assert set(regions.index) == {"top right", "bottom right"}
    table = pd.read_parquet(tmp_path / f"{sid}.tiles.parquet")
    assert table.call.notna().sum() == 8  # only the 2 x 4 tiles inside the Tumor regions
    fc = json.loads((tmp_path / f"{sid}.geojson").read_text())
    slide_name = fc["features"][0]["properties"]["name"]
    assert "top right" in slide_name and "bottom right" in slide_name and "HER2 3+" in slide_name
    region_feats = [f for f in fc["features"] if f["properties"].get("name", "").startswith("Region ")]
    assert {f["properties"]["classification"]["name"] for f in region_feats} == {"HER2 1+", "HER2 3+"}
    meta = json.loads((tmp_path / f"{sid}.json").read_text())
    assert [r["name"] for r in meta["regions"]] == ["top right", "bottom right"]


@pytest.mark.parametrize("feats, message", [
    ([feature(square(10**6, 10**6, 500))], "lies outside the slide"),
    ([feature(square(BLOCK + 5, BLOCK + 5, 100))], "no tile lies mostly inside"),
])
def test_bad_regions_are_one_line_errors(tiny_graded_store, tmp_path, capsys, feats, message):
    roi = tmp_path / "r.geojson"
    roi.write_text(json.dumps(feats))
    assert run_score(tiny_graded_store, roi, tmp_path) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert any(message in line for line in err) and all("Traceback" not in line for line in err)
