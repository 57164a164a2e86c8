"""TMA (--tma): round cores found and named by grid, each called with its planted grade, missing ones reported."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from wsi_her2.cli import main
from wsi_her2.score.tma import _cluster_1d, row_name

GRADES = ((0, 1, 2), (3, None, 2))  # B2 is missing
PLANTED = {"A1": "0", "A2": "1+", "A3": "2+", "B1": "3+", "B3": "2+"}


@pytest.fixture(scope="module")
def tma_scored(tmp_path_factory):
    from wsi_her2.synthetic.slides import write_synthetic_slide
    from wsi_her2.synthetic.tma import tma_spec
    from wsi_her2.tile.pipeline import TileConfig, tile_slide

    d = tmp_path_factory.mktemp("tma")
    slide = write_synthetic_slide(d / "tma.svs", tma_spec(GRADES))
    store = tile_slide(slide, d, config=TileConfig(workers=1)).store
    code = main(["score", str(store), "--tma", "--min-tiles", "3"])
    return d, code


def test_each_core_gets_its_planted_grade_and_the_missing_one_is_reported(tma_scored):
    d, code = tma_scored
    assert code == 0
    cores = pd.read_csv(d / "cores.csv", dtype=str).set_index("name")
    called = cores[cores.status == "scored"]
    assert dict(called.her2_score) == PLANTED
    assert cores.loc["B2", "status"] == "missing" and pd.isna(cores.loc["B2", "her2_score"])
    assert (cores.loc["B3", ["row", "col"]] == ["2", "3"]).all()
    assert (called.tiles_used.astype(int) >= 3).all()


def test_qupath_annotation_per_core_and_a_labelled_tma_picture(tma_scored):
    d, _ = tma_scored
    fc = json.loads((d / "tma.geojson").read_text())
    cores = [f for f in fc["features"] if f["properties"].get("name", "").startswith("Core ")]
    assert len(cores) == 5
    b1 = next(f for f in cores if f["properties"]["name"].startswith("Core B1"))
    assert b1["properties"]["classification"]["name"] == "HER2 3+"
    assert b1["properties"]["objectType"] == "annotation" and b1["geometry"]["type"] == "Polygon"
    assert {"confidence", "n_tiles_used", "fraction HER2 3+"} <= set(b1["properties"]["measurements"])
    with Image.open(d / "tma.tma.png") as im:
        assert max(im.size) >= 1000
    meta = json.loads((d / "tma.json").read_text())
    assert {c["name"] for c in meta["cores"]} == set(PLANTED) | {"B2"}


def test_grid_naming_helpers():
    assert [row_name(i) for i in (0, 1, 25, 26, 27)] == ["A", "B", "Z", "AA", "AB"]
    labels, centres = _cluster_1d(np.array([10.0, 205.0, 12.0, 198.0, 400.0]), gap=50)
    assert labels.tolist() == [0, 1, 0, 1, 2] and np.allclose(centres, [11, 201.5, 400])


def test_a_slide_that_is_not_a_tma_is_one_line(tmp_path, capsys):
    from wsi_her2.synthetic.slides import graded_ihc_spec, write_synthetic_slide
    from wsi_her2.tile.pipeline import TileConfig, tile_slide

    slide = write_synthetic_slide(tmp_path / "one.svs", graded_ihc_spec(block_px=448, grades=(2,), dust=False))
    store = tile_slide(slide, tmp_path, config=TileConfig(workers=1)).store
    assert main(["score", str(store), "--tma"]) == 1
    err = capsys.readouterr().err
    assert "does not look like a tissue microarray" in err and "Traceback" not in err


def test_the_cores_read_back_from_the_result_json_give_the_same_rows(tma_scored):
    from wsi_her2.result import MISSING, SlideResult

    d, _ = tma_scored
    meta = json.loads((d / "tma.json").read_text())
    result = SlideResult.from_record(meta)
    assert result.groups.kind == "core" and [p.row() for p in result.groups.parts] == meta["cores"]
    assert {p.name for p in result.groups.parts if p.status == MISSING} == {"B2"}
    assert result.to_record()["cores"] == meta["cores"]
