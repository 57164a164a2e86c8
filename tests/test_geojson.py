"""QuPath GeoJSON writer: every rule of shared/design/QUPATH_GEOJSON.md, checked on written files."""
from __future__ import annotations

import gzip
import json
import math
import uuid
from pathlib import Path

import numpy as np
import pytest
import shapely
from shapely.geometry import shape

from wsi_her2.score.aggregate import HER2_CLASSES, aggregate_asco
from wsi_her2.errors import ConfigError
from wsi_her2.outputs.geojson import (
    CLASS_COLORS,
    QC_REJECTED,
    _tile_ids,
    build_feature_collection,
    feature_id,
    qupath_class_name,
    slide_feature,
    tile_features,
    write_geojson,
)

OFFSET = (1000.0, 2000.0)  # openslide.bounds-x / bounds-y of a pretend MRXS
TILE = 512.0
CLASSES = list(HER2_CLASSES)


def _strict_load(data: bytes) -> dict:
    """json.loads that refuses NaN / Infinity, which are not JSON."""

    def refuse(token):
        raise ValueError(f"non-JSON constant {token}")

    return json.loads(data, parse_constant=refuse)


def make_inputs(n_cols=4, n_rows=3, *, tile=TILE):
    """A 4 x 3 grid of tiles: tile 5 rejected for blur, tile 7 rejected with no reason, tile 2 NaN."""
    gx, gy = np.meshgrid(np.arange(n_cols), np.arange(n_rows))
    coords = np.stack([gx.ravel(), gy.ravel()], axis=1) * int(tile) + np.array([1000 + 4096, 2000 + 8192])
    n = len(coords)
    calls = np.arange(n) % 4
    calls[[5, 7]] = -1
    probs = np.full((n, 4), 0.1)
    probs[np.arange(n), np.clip(calls, 0, None)] = 0.7
    probs[[5, 7]] = np.nan
    meas = {f"p_{c}": probs[:, k] for k, c in enumerate(CLASSES)}
    meas["tissue_fraction"] = np.linspace(0.5, 1.0, n)
    meas["laplacian_var"] = np.linspace(100, 900, n)
    meas["laplacian_var"][2] = np.nan
    reasons = [None] * n
    reasons[5] = "blur"
    return dict(coords=coords, calls=calls, meas=meas, reasons=reasons, probs=probs)


def build(tmp_path: Path, *, name="overlay.geojson", gz=False, namespace="slide-1", tile=TILE):
    inp = make_inputs(tile=tile)
    tiles = tile_features(
        coords_level0=inp["coords"],
        tile_size_level0=tile,
        class_names=CLASSES,
        calls=inp["calls"],
        measurements=inp["meas"],
        reject_reasons=inp["reasons"],
        bounds_offset_px=OFFSET,
        id_namespace=namespace,
    )
    usable = inp["calls"] >= 0
    call = aggregate_asco(inp["probs"][usable], min_tiles=5).to_dict()
    x0, y0 = inp["coords"].min(axis=0)
    x1, y1 = inp["coords"].max(axis=0) + tile
    slide = slide_feature(
        slide_call=call, bbox=(x0, y0, x1, y1), bounds_offset_px=OFFSET, id_namespace=namespace
    )
    path = write_geojson(build_feature_collection(tiles, slide), tmp_path / name, gzip=gz)
    return path, inp, call


@pytest.fixture
def written(tmp_path):
    path, inp, call = build(tmp_path)
    fc = _strict_load(path.read_bytes())
    return path, fc, inp, call


def tiles_of(fc):
    return [f for f in fc["features"] if f["properties"]["objectType"] == "tile"]


# ---------------------------------------------------------------- rule 1: container


def test_rule1_feature_collection(written):
    path, fc, inp, _ = written
    assert path.suffix == ".geojson"
    assert fc["type"] == "FeatureCollection"
    assert len(fc["features"]) == len(inp["coords"]) + 1
    assert all(f["type"] == "Feature" for f in fc["features"])


def test_rule1_gzip_is_readable(tmp_path):
    path, inp, _ = build(tmp_path, gz=True)
    assert path.name == "overlay.geojson.gz"
    with gzip.open(path, "rb") as fh:
        fc = _strict_load(fh.read())
    assert len(fc["features"]) == len(inp["coords"]) + 1
    import geopandas as gpd

    df = gpd.read_file(f"/vsigzip/{path}")
    assert len(df) == len(inp["coords"]) + 1


def test_rule1_suffix_must_be_one_qupath_imports(tmp_path):
    fc = build_feature_collection([], None)
    with pytest.raises(ConfigError, match="geojson"):
        write_geojson(fc, tmp_path / "overlay.txt")
    assert write_geojson(fc, tmp_path / "o.json").exists()
    assert write_geojson(fc, tmp_path / "o.json.gz").read_bytes()[:2] == b"\x1f\x8b"


# ---------------------------------------------------------------- rule 2: coordinates


def test_rule2_bounds_offset_is_subtracted(written):
    _, fc, inp, _ = written
    for i, f in enumerate(tiles_of(fc)):
        ring = f["geometry"]["coordinates"][0]
        x, y = inp["coords"][i]
        assert ring[0] == [x - OFFSET[0], y - OFFSET[1]]
        xs = [p[0] for p in ring]
        ys = [p[1] for p in ring]
        assert (min(xs), min(ys), max(xs), max(ys)) == (
            x - OFFSET[0], y - OFFSET[1], x - OFFSET[0] + TILE, y - OFFSET[1] + TILE
        )


def test_rule2_geopandas_round_trip(written):
    import geopandas as gpd

    path, _, inp, _ = written
    df = gpd.read_file(path)
    assert len(df) == len(inp["coords"]) + 1
    x0, y0 = inp["coords"].min(axis=0) - np.array(OFFSET)
    x1, y1 = inp["coords"].max(axis=0) - np.array(OFFSET) + TILE
    assert df.total_bounds.tolist() == [x0, y0, x1, y1]
    assert df["objectType"].tolist() == ["annotation"] + ["tile"] * len(inp["coords"])
    assert df["id"].tolist()[1] == feature_id("slide-1", "tile/0")


# ---------------------------------------------------------------- rule 3: geometry


def test_rule3_polygons_valid_closed_ccw_and_on_grid(tmp_path):
    # a fractional tile size (0.25 um tiles from a 0.2209 um/px scan) must still snap to 0.01 px
    path, _, _ = build(tmp_path, tile=905.0966)
    fc = _strict_load(path.read_bytes())
    for f in fc["features"]:
        geom = shape(f["geometry"])
        assert geom.is_valid, shapely.is_valid_reason(geom)
        assert geom.area > 0
        polys = [geom] if geom.geom_type == "Polygon" else list(geom.geoms)
        for p in polys:
            assert p.exterior.is_ccw
        for ring in (f["geometry"]["coordinates"] if f["geometry"]["type"] == "Polygon" else []):
            assert ring[0] == ring[-1]
            for x, y in ring:
                assert math.isclose(x * 100, round(x * 100), abs_tol=1e-6)
                assert math.isclose(y * 100, round(y * 100), abs_tol=1e-6)
    side = tiles_of(fc)[0]["geometry"]["coordinates"][0]
    assert side[1][0] - side[0][0] == pytest.approx(905.1, abs=0.011)


def test_rule3_bow_tie_slide_outline_is_repaired(tmp_path):
    call = {"her2_score": "1+", "confidence": 0.8, "method": "vote", "n_tiles_used": 50}
    bow_tie = [[0, 0], [100, 100], [100, 0], [0, 100]]
    f = slide_feature(slide_call=call, polygon_coords=bow_tie)
    fc = _strict_load(write_geojson(build_feature_collection([], f), tmp_path / "s.geojson").read_bytes())
    geom = shape(fc["features"][0]["geometry"])
    assert geom.is_valid
    assert geom.area == pytest.approx(5000.0)


def test_rule3_slide_outline_offset_and_orientation():
    call = {"her2_score": "0", "confidence": 0.9, "method": "mean", "n_tiles_used": 50}
    clockwise = [[1000, 2000], [1000, 2100], [1200, 2100], [1200, 2000]]
    f = slide_feature(slide_call=call, polygon_coords=clockwise, bounds_offset_px=OFFSET)
    geom = shape(f["geometry"])
    assert geom.exterior.is_ccw
    assert geom.bounds == (0.0, 0.0, 200.0, 100.0)
    ring = f["geometry"]["coordinates"][0]
    assert ring[0] == ring[-1]


# ---------------------------------------------------------------- rule 4: objectType


def test_rule4_object_type_inside_properties(written):
    _, fc, inp, _ = written
    types = [f["properties"]["objectType"] for f in fc["features"]]
    assert types == ["annotation"] + ["tile"] * len(inp["coords"])
    assert all("objectType" not in f for f in fc["features"])


# ---------------------------------------------------------------- rule 5: classification


def test_rule5_classification_object_always_has_colour(written):
    _, fc, inp, call = written
    for f in fc["features"]:
        c = f["properties"]["classification"]
        assert isinstance(c, dict) and set(c) == {"name", "color"}
        assert ":" not in c["name"]
        assert len(c["color"]) == 3 and all(isinstance(v, int) and 0 <= v <= 255 for v in c["color"])
        assert tuple(c["color"]) == CLASS_COLORS[c["name"]]
    names = [f["properties"]["classification"]["name"] for f in tiles_of(fc)]
    for i, k in enumerate(inp["calls"]):
        assert names[i] == (QC_REJECTED if k < 0 else f"HER2 {CLASSES[k]}")
    assert fc["features"][0]["properties"]["classification"]["name"] == f"HER2 {call['her2_score']}"


def test_rule5_colon_in_class_name_is_refused():
    inp = make_inputs()
    with pytest.raises(ConfigError, match=":"):
        tile_features(
            coords_level0=inp["coords"], tile_size_level0=TILE,
            class_names=["0", "1+", "2+", "tumour: 3+"], calls=inp["calls"], measurements={},
        )
    with pytest.raises(ConfigError):
        qupath_class_name("HER2: 2+")


def test_rule5_other_class_names_get_a_stable_colour():
    coords = np.array([[0, 0], [512, 0]])
    a = tile_features(coords_level0=coords, tile_size_level0=TILE, class_names=["stroma", "tumour"],
                      calls=np.array([0, 1]), measurements={})
    b = tile_features(coords_level0=coords, tile_size_level0=TILE, class_names=["stroma", "tumour"],
                      calls=np.array([0, 1]), measurements={})
    assert a[0]["properties"]["classification"]["name"] == "stroma"
    assert len(a[0]["properties"]["classification"]["color"]) == 3
    assert a == b


# ---------------------------------------------------------------- rule 6: measurements


def test_rule6_measurements_are_finite_numbers(written):
    _, fc, inp, _ = written
    for f in fc["features"]:
        m = f["properties"]["measurements"]
        assert isinstance(m, dict)
        for k, v in m.items():
            assert isinstance(k, str)
            assert isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    tiles = tiles_of(fc)
    assert tiles[0]["properties"]["measurements"]["p_0"] == pytest.approx(0.7)
    assert tiles[0]["properties"]["measurements"]["tissue_fraction"] == pytest.approx(0.5)
    # NaN blur score of tile 2 and NaN probabilities of rejected tile 5 are left out
    assert "laplacian_var" not in tiles[2]["properties"]["measurements"]
    assert "p_2+" in tiles[2]["properties"]["measurements"]
    assert not any(k.startswith("p_") for k in tiles[5]["properties"]["measurements"])
    assert "tissue_fraction" in tiles[5]["properties"]["measurements"]


def test_rule6_nan_in_collection_is_refused_not_written(tmp_path):
    fc = build_feature_collection([], None)
    fc["features"].append({"type": "Feature", "geometry": None, "properties": {"measurements": {"x": float("nan")}}})
    with pytest.raises(ConfigError, match="NaN"):
        write_geojson(fc, tmp_path / "bad.geojson")
    assert not (tmp_path / "bad.geojson").exists()


# ---------------------------------------------------------------- rule 7: ids


def test_rule7_ids_are_dashed_uuids_and_unique(written):
    _, fc, _, _ = written
    ids = [f["id"] for f in fc["features"]]
    for i in ids:
        assert isinstance(i, str) and str(uuid.UUID(i)) == i and i.count("-") == 4
    assert len(set(ids)) == len(ids)


def test_rule7_reruns_write_identical_bytes(tmp_path):
    for gz in (False, True):
        a, _, _ = build(tmp_path / "a", gz=gz)
        b, _, _ = build(tmp_path / "b", gz=gz)
        assert a.read_bytes() == b.read_bytes()
    c, _, _ = build(tmp_path / "c", namespace="slide-2")
    ids_a = [f["id"] for f in _strict_load((tmp_path / "a" / "overlay.geojson").read_bytes())["features"]]
    ids_c = [f["id"] for f in _strict_load(c.read_bytes())["features"]]
    assert not set(ids_a) & set(ids_c)


def test_rule7_fast_ids_equal_uuid5():
    fast = _tile_ids("ns", 50)
    assert fast == [feature_id("ns", f"tile/{i}") for i in range(50)]
    assert all(uuid.UUID(x).version == 5 for x in fast)


# ---------------------------------------------------------------- rule 8: other properties


def test_rule8_locked_tiles_and_rejection_reasons(written):
    _, fc, inp, _ = written
    tiles = tiles_of(fc)
    assert all(t["properties"]["isLocked"] is True for t in tiles)
    blur = tiles[5]["properties"]
    assert blur["metadata"] == {"qc_reason": "blur"}
    assert "blur" in blur["name"]
    unscored = tiles[7]["properties"]
    assert unscored["metadata"] == {"qc_reason": "not scored"}
    scored = tiles[0]["properties"]
    assert "metadata" not in scored
    for f in fc["features"]:
        meta = f["properties"].get("metadata", {})
        assert all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items())


def test_rule8_slide_annotation_carries_the_call(written):
    _, fc, _, call = written
    props = fc["features"][0]["properties"]
    assert props["objectType"] == "annotation"
    assert props["measurements"]["confidence"] == pytest.approx(call["confidence"])
    assert props["measurements"]["n_tiles_used"] == call["n_tiles_used"]
    assert props["measurements"]["fraction HER2 0"] == pytest.approx(call["class_fractions"]["0"])
    assert props["metadata"]["her2_score"] == call["her2_score"]
    assert json.loads(props["metadata"]["slide_call"]) == json.loads(json.dumps(call))
    assert call["her2_score"] in props["name"] and call["method"] in props["name"]


# ---------------------------------------------------------------- input checks


def test_tile_with_call_and_reason_is_refused():
    inp = make_inputs()
    reasons = list(inp["reasons"])
    reasons[0] = "pen mark"
    with pytest.raises(ConfigError, match="both"):
        tile_features(coords_level0=inp["coords"], tile_size_level0=TILE, class_names=CLASSES,
                      calls=inp["calls"], measurements={}, reject_reasons=reasons)


@pytest.mark.parametrize(
    "change",
    [
        {"calls": np.array([0, 4])},
        {"calls": np.array([0])},
        {"calls": np.array([0.0, 1.0])},
        {"tile_size_level0": 0},
        {"measurements": {"x": np.zeros(3)}},
        {"class_names": ["0", "0", "2+", "3+"]},
        {"bounds_offset_px": (np.nan, 0)},
    ],
)
def test_inconsistent_inputs_are_refused(change):
    kw = dict(coords_level0=np.array([[0, 0], [512, 0]]), tile_size_level0=TILE, class_names=CLASSES,
              calls=np.array([0, 1]), measurements={})
    kw.update(change)
    with pytest.raises(ConfigError):
        tile_features(**kw)


def test_slide_feature_input_checks():
    call = {"her2_score": "2+", "confidence": 0.9, "method": "asco", "n_tiles_used": 50}
    with pytest.raises(ConfigError):
        slide_feature(slide_call=call)  # neither polygon nor bbox
    with pytest.raises(ConfigError):
        slide_feature(slide_call={**call, "her2_score": "4+"}, bbox=(0, 0, 10, 10))
    with pytest.raises(ConfigError):
        slide_feature(slide_call={"her2_score": "2+"}, bbox=(0, 0, 10, 10))
    f = slide_feature(slide_call={**call, "her2_score": "indeterminate"}, bbox=(0, 0, 10, 10))
    assert f["properties"]["classification"]["name"] == "HER2 indeterminate"


def test_empty_tile_list_writes_a_valid_file(tmp_path):
    tiles = tile_features(coords_level0=np.zeros((0, 2)), tile_size_level0=TILE, class_names=CLASSES,
                          calls=np.zeros(0, dtype=int), measurements={"p_0": np.zeros(0)})
    assert tiles == []
    fc = _strict_load(write_geojson(build_feature_collection(tiles, None), tmp_path / "e.geojson").read_bytes())
    assert fc == {"type": "FeatureCollection", "features": []}


# ---------------------------------------------------------------- speed


@pytest.mark.slow
def test_100k_tiles_are_all_written(tmp_path):
    n = 100_000
    rng = np.random.default_rng(0)
    side = int(np.ceil(np.sqrt(n)))
    gx, gy = np.meshgrid(np.arange(side), np.arange(side))
    coords = (np.stack([gx.ravel(), gy.ravel()], axis=1)[:n] * 512).astype(np.int64)
    probs = rng.dirichlet(np.ones(4), size=n)
    calls = probs.argmax(axis=1)
    calls[::10] = -1
    reasons = ["blur" if c < 0 else None for c in calls]
    meas = {f"p_{c}": probs[:, k] for k, c in enumerate(CLASSES)}
    meas["tissue_fraction"] = rng.random(n)
    # Speed at this size is benchmarks/bench_outputs.py's business; here: every tile is written.
    tiles = tile_features(coords_level0=coords, tile_size_level0=512, class_names=CLASSES, calls=calls,
                          measurements=meas, reject_reasons=reasons, bounds_offset_px=(10, 20), id_namespace="s")
    path = write_geojson(build_feature_collection(tiles, None), tmp_path / "big.geojson")
    assert len(tiles) == n
    assert len(json.loads(path.read_text())["features"]) == n
