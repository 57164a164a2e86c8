"""Regions from QuPath (--roi): only tiles mostly inside are scored, one call per region plus the slide call."""
from __future__ import annotations

import gzip
import json

import numpy as np
import pandas as pd
import pytest
from conftest import one_line_error

from wsi_her2.cli import main
from wsi_her2.errors import ConfigError
from wsi_her2.score.roi import assign_tiles, load_regions

BLOCK = 672  # 3 x 3 tiles of 224 px per graded block: enough tumour cells (>= 200 graded) for a region call


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
    assert table.call.notna().sum() == 18  # only the 2 x 9 tiles inside the Tumor regions
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


# --- hostile regions files: bounded, refused in one line ------------------------------------------------
def test_gzip_bomb_is_refused_past_the_cap_while_reading(tmp_path, monkeypatch):
    from wsi_her2.score import roi

    monkeypatch.setattr(roi, "MAX_ROI_BYTES", 1 << 20)
    bomb = tmp_path / "bomb.geojson.gz"
    with gzip.open(bomb, "wb") as fh:  # 8 MiB of JSON whitespace in a few kB
        fh.write(b"[" + b" " * (8 << 20) + b"]")
    assert bomb.stat().st_size < 64 << 10
    read = []
    real_open = gzip.open

    def counting_open(*args, **kwargs):
        fh = real_open(*args, **kwargs)
        real_read = fh.read
        fh.read = lambda n=-1: read.append(n) or real_read(n)
        return fh

    monkeypatch.setattr(roi.gzip, "open", counting_open)
    with pytest.raises(ConfigError, match=r"more than 1 MiB once decompressed.*export only the regions"):
        load_regions(bomb)
    assert read and all(0 < n <= 1 << 20 for n in read) and len(read) <= 2  # read in blocks, stopped at the cap
    plain = tmp_path / "big.geojson"
    plain.write_bytes(b"[" + b" " * (2 << 20) + b"]")
    with pytest.raises(ConfigError, match=r"more than 1 MiB, the most"):
        load_regions(plain)


@pytest.mark.parametrize("coordinate, message", [
    ("Infinity", "non-finite number Infinity"), ("NaN", "non-finite number NaN"), ("-Infinity", "non-finite number -Infinity"),
    ("1e400", "not finite or beyond"), ("1e300", "not finite or beyond"), ("-2e9", "not finite or beyond"),
])
def test_non_finite_or_absurd_coordinates_are_one_line_errors(tiny_graded_store, tmp_path, capsys, coordinate, message):
    text = json.dumps([feature(square(BLOCK, BLOCK, BLOCK), name="r")]).replace(f"[{2 * BLOCK}, {2 * BLOCK}]",
                                                                               f"[{coordinate}, {2 * BLOCK}]", 1)
    assert coordinate in text
    roi = tmp_path / "r.geojson"
    roi.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_regions(roi)
    assert run_score(tiny_graded_store, roi, tmp_path) == 2  # refused with the options, before any store is opened
    assert message in one_line_error(capsys)
    assert not (tmp_path / "tiny.json").exists()


def test_repeated_names_are_numbered_uniquely():
    from wsi_her2.score.roi import unique_names

    assert unique_names(["a", "b", "a"]) == ["a 1", "b", "a 2"]
    assert unique_names(["a", "a", "a 1"]) == ["a 2", "a 3", "a 1"]  # "a 1" is taken by a region of that name
    names = ["Tumor"] * 50_000 + [f"Tumor {k}" for k in range(1, 50_001, 2)]
    out = unique_names(names)
    assert len(set(out)) == len(out) and out[50_000:] == names[50_000:]


def test_pieces_cover_each_region_once_and_stay_small():
    import shapely

    from wsi_her2.score.roi_geometry import region_pieces

    t = np.linspace(0, 2 * np.pi, 20_000, endpoint=False)
    r = 5000 * (1 + 0.05 * np.sin(40 * t))
    wavy = shapely.Polygon(np.c_[6000 + r * np.cos(t), 6000 + r * np.sin(t)]).difference(shapely.Point(6000, 6000).buffer(900))
    regions = [wavy, shapely.box(0, 0, 100, 100)]
    pieces, owner = region_pieces(regions, max_vertices=64)
    assert shapely.get_num_coordinates(pieces).max() <= 64 and len(pieces) > 300
    assert np.allclose(np.bincount(owner, shapely.area(pieces)), shapely.area(np.asarray(regions, dtype=object)))


def test_box_overlap_areas_equal_shapely_intersections():
    """Green's theorem on clipped edges against GEOS overlay: polygons with holes, multipolygons, any box."""
    import shapely

    from wsi_her2.score.roi_geometry import box_overlap_areas, region_pieces

    rng = np.random.default_rng(0)
    regions = []
    for k in range(20):
        n = int(rng.integers(5, 300))
        t = np.sort(rng.uniform(0, 2 * np.pi, n))
        r = rng.uniform(200, 1500) * (1 + 0.3 * rng.uniform(-1, 1, n))
        c = rng.uniform(0, 3000, 2)
        g = shapely.make_valid(shapely.Polygon(np.c_[c[0] + r * np.cos(t), c[1] + r * np.sin(t)]))
        if k % 3 == 0:
            g = shapely.make_valid(g.difference(shapely.Point(c).buffer(100)))
        regions.append(shapely.union(g, shapely.box(c[0] + 2000, c[1], c[0] + 2300, c[1] + 300)) if k % 5 == 0 else g)
    pieces, _ = region_pieces(regions, max_vertices=16, min_side_px=10)
    size = 224.0
    xy = rng.uniform(-500, 4500, (3000, 2))
    boxes = shapely.box(xy[:, 0], xy[:, 1], xy[:, 0] + size, xy[:, 1] + size)
    tile_idx, piece_idx = shapely.STRtree(pieces).query(boxes, predicate="intersects")
    ours = box_overlap_areas(pieces, piece_idx, xy[tile_idx], size)
    geos = shapely.area(shapely.intersection(boxes[tile_idx], pieces[piece_idx]))
    assert len(tile_idx) > 10_000 and np.allclose(ours, geos, atol=1e-6 * size * size)


def test_assignment_of_a_polygon_of_many_vertices_matches_whole_polygon_intersections(monkeypatch):
    """Tiles meet pieces of the polygon, never the whole of it (67 s for 10^6 vertices), with the same result."""
    import shapely

    from wsi_her2.score.roi_geometry import PIECE_MAX_VERTICES

    t = np.linspace(0, 2 * np.pi, 10_000, endpoint=False)
    r = 5_000 * (1 + 0.05 * np.sin(60 * t))
    poly = shapely.Polygon(np.c_[6_000 + r * np.cos(t), 6_000 + r * np.sin(t)])
    size = 224.0
    grid = np.arange(0, 12_000, size)
    coords = np.stack(np.meshgrid(grid, grid), axis=-1).reshape(-1, 2)
    real_intersection = shapely.intersection

    def small_only(a, b, *args, **kwargs):
        assert shapely.get_num_coordinates(np.asarray(b, dtype=object)).max(initial=0) <= PIECE_MAX_VERTICES
        return real_intersection(a, b, *args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(shapely, "intersection", small_only)
        group = assign_tiles([poly], coords, size)
    boxes = shapely.box(coords[:, 0], coords[:, 1], coords[:, 0] + size, coords[:, 1] + size)
    share = shapely.area(shapely.intersection(boxes, poly)) / size**2  # the whole polygon, tile by tile
    assert np.array_equal(group == 0, share > 0.5) and (group == 0).sum() > 1000
