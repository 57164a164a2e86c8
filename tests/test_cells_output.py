"""``score --cells``: every scored cell as a QuPath detection and a parquet row, where the cell is."""
from __future__ import annotations

import gzip
import json

import numpy as np
import pandas as pd
import pytest

from wsi_her2.cli import main
from wsi_her2.outputs.cells import NON_TUMOUR
from wsi_her2.vocab import CELL_COLUMNS

BLOCK = 672  # 3 x 3 tiles of 224 px per graded block


@pytest.fixture(scope="module")
def scored(tmp_path_factory):
    from wsi_her2.synthetic.slides import graded_ihc_spec, write_synthetic_slide

    d = tmp_path_factory.mktemp("cells")
    spec = graded_ihc_spec(block_px=BLOCK, dust=False)  # grades 0 1 / 2 3 at blocks (1,1) (3,1) / (1,3) (3,3)
    slide = write_synthetic_slide(d / "graded.svs", spec)
    assert main(["tile", str(slide), "-o", str(d), "-q"]) == 0
    assert main(["score", str(d / "graded.zarr"), "--cells", "-q"]) == 0
    return d, spec


def test_cells_are_qupath_detections_and_parquet_rows(scored):
    d, _ = scored
    fc = json.loads(gzip.decompress((d / "graded.cells.geojson.gz").read_bytes()))
    table = pd.read_parquet(d / "graded.cells.parquet")
    assert fc["type"] == "FeatureCollection" and len(fc["features"]) == len(table) > 500
    assert {"x_level0", "y_level0", *CELL_COLUMNS, "pattern_name", "grade_name"} <= set(table.columns)
    classes = {"HER2 0", "HER2 1+", "HER2 2+", "HER2 3+", NON_TUMOUR}
    for f in fc["features"][:: max(1, len(fc["features"]) // 200)]:
        props, ring = f["properties"], f["geometry"]["coordinates"][0]
        assert f["geometry"]["type"] == "Polygon" and ring[0] == ring[-1] and len(ring) == 9
        assert props["objectType"] == "detection"  # inside properties, as QuPath reads it
        assert props["classification"]["name"] in classes and len(props["classification"]["color"]) == 3
        assert all(np.isfinite(v) for v in props["measurements"].values())
        assert {"membrane OD", "completeness", "tumour weight", "ring in tile"} <= set(props["measurements"])
    result = json.loads((d / "graded.json").read_text())
    assert result["outputs"]["cells_geojson"].endswith("graded.cells.geojson.gz")


def test_each_block_s_cells_carry_its_planted_grade(scored):
    d, spec = scored
    table = pd.read_parquet(d / "graded.cells.parquet")
    graded = table[(table.tumour_weight > 0.5) & (table.ring_in_tile > 0.9)]
    for region in spec.regions:
        inside = graded[(graded.x_level0 >= region.x_px) & (graded.x_level0 < region.x_px + region.w_px)
                        & (graded.y_level0 >= region.y_px) & (graded.y_level0 < region.y_px + region.h_px)]
        assert len(inside) > 100, region
        share = float((inside.grade == region.grade).mean())
        # 1+ rings are partial and faint: a share of the cells shows no membrane at all
        assert share > (0.5 if region.grade == 1 else 0.7), (region.grade, inside.grade.value_counts().to_dict())


def test_the_cells_geojson_has_the_same_bytes_whatever_its_name_and_time(tmp_path):
    """Regression: the gzip header named the temporary file, so a rebuilt file never matched its SHA-256."""
    from wsi_her2.outputs.cells import write_cells_geojson
    from wsi_her2.result import Cells

    n = 5
    xy = np.arange(2 * n, dtype=np.float64).reshape(n, 2)
    cells = Cells({k: np.zeros(n, np.float32) for k in CELL_COLUMNS}, xy)
    a = write_cells_geojson(tmp_path / "a.cells.geojson.gz", cells, xy, radius_px=4.0)
    b = write_cells_geojson(tmp_path / "b.cells.geojson.gz", cells, xy, radius_px=4.0)
    assert a.read_bytes() == b.read_bytes()
    assert len(json.loads(gzip.decompress(a.read_bytes()))["features"]) == n
