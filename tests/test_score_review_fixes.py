"""The score stage's contracts: one tumour-cell count per call, parts' status from their call, options checked
before any file is written, reused results only when every output asked for is there, one model-vs-store
check, regions read once, TMA tiles matched to cores without a (tiles x cores) table."""
from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
from conftest import one_line_error

from wsi_her2.cli import main
from wsi_her2.errors import ConfigError
from wsi_her2.result import BLANK, NOT_CALLED, SCORED, PartCall
from wsi_her2.score.pipeline import ScoreConfig, score_store, validate_score_config

BLOCK = 672  # 3 x 3 tiles of 224 px per graded block: enough tumour cells for a region call


@pytest.fixture(scope="module")
def tiny_store(tmp_path_factory):
    from wsi_her2.synthetic.slides import graded_ihc_spec, write_synthetic_slide
    from wsi_her2.tile.pipeline import TileConfig, tile_slide

    d = tmp_path_factory.mktemp("review-fixes")
    slide = write_synthetic_slide(d / "tiny.svs", graded_ihc_spec(block_px=BLOCK, dust=False))
    return tile_slide(slide, d / "out", config=TileConfig(workers=1)).store


def _region_file(tmp_path, x: int, y: int, side: int):
    ring = [[x, y], [x + side, y], [x + side, y + side], [x, y + side], [x, y]]
    feats = [{"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [ring]},
              "properties": {"name": "only", "classification": {"name": "Tumor"}}}]
    roi = tmp_path / "regions.geojson"
    roi.write_text(json.dumps(feats))
    return roi


def test_a_slide_of_one_region_shows_one_tumour_cell_count(tiny_store, tmp_path):
    """slides.csv's tumour_cells is the count the call was judged on, as in regions.csv."""
    roi = _region_file(tmp_path, 3 * BLOCK, 3 * BLOCK, BLOCK)  # the 3+ block
    assert main(["score", str(tiny_store), "-o", str(tmp_path), "--roi", str(roi), "--min-tiles", "2", "-q"]) == 0
    slide = pd.read_csv(tmp_path / "slides.csv").iloc[0]
    region = pd.read_csv(tmp_path / "regions.csv").iloc[0]
    assert float(slide.tumour_cells) >= 200 and float(slide.tumour_cells) == pytest.approx(float(region.tumour_cells))


def _call(score: str, reason: str | None = None) -> PartCall:
    return PartCall(her2_score=score, confidence=0.0, class_fractions={}, n_tiles_used=0, method="asco",
                    details={"reason": reason} if reason else {}, her2_category="", her2_category_text="", criteria={})


def test_a_parts_status_comes_from_its_call_not_its_number_of_tiles():
    from shapely.geometry import box

    from wsi_her2.score.tile_groups import TileGroups

    groups = TileGroups(kind="core", names=["A1", "A2", "A3"], geometries=[box(0, 0, 10, 10)] * 3,
                        tile_group=np.array([0, 0, 0, 1, 1, 2, 2]))
    scored = np.array([True, True, True, True, True, False, False])
    calls = {0: _call("2+"), 1: _call("indeterminate", "too little tumour to judge: 150 tumour cells"),
             2: _call("indeterminate", "no tiles")}
    parts = groups.call_each(lambda members: calls[int(groups.tile_group[members[0]])], scored,
                             qc_pass=np.ones(7, bool), mpp_um=0.5).parts
    assert [p.status for p in parts] == [SCORED, NOT_CALLED, BLANK]
    # not called keeps its indeterminate score, as a slide's row does; a blank part has none
    assert parts[1].note == "too little tumour to judge: 150 tumour cells" and parts[1].columns["her2_score"] == "indeterminate"
    assert parts[2].note == "no usable tiles" and parts[2].columns["her2_score"] == "" and parts[0].columns["her2_score"] == "2+"


def test_an_unknown_heatmap_measure_fails_before_any_file_is_written(tiny_store, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["score", str(tiny_store), "-o", str(out), "--heatmap", "bogus", "-q"]) != 0
    message = one_line_error(capsys)  # the store's error, then the count of failed stores
    assert "--heatmap bogus: no such tile measurement" in message and "tumour_cell_count" in message
    assert not out.exists() or not any(out.iterdir())


def test_a_result_without_the_report_asked_for_now_is_scored_again(tiny_store, tmp_path):
    quiet = score_store(tiny_store, out_dir=tmp_path, config=ScoreConfig(no_report=True, min_tiles=2))
    assert "report_html" not in quiet.outputs
    again = score_store(tiny_store, out_dir=tmp_path, config=ScoreConfig(min_tiles=2))
    assert not again.skipped and (tmp_path / f"{again.slide_id}.report.html").is_file()
    assert score_store(tiny_store, out_dir=tmp_path, config=ScoreConfig(min_tiles=2)).skipped


def test_the_model_is_checked_against_the_store_once(tiny_store, tmp_path, monkeypatch):
    import wsi_her2.score.inference as inference
    import wsi_her2.score.scorer as scorer

    seen = []
    check = scorer.check_model_matches_store
    monkeypatch.setattr(inference, "check_model_matches_store", lambda *a, **k: seen.append(1) or check(*a, **k))
    monkeypatch.setattr(scorer, "check_model_matches_store", lambda *a, **k: seen.append(1) or check(*a, **k))
    score_store(tiny_store, out_dir=tmp_path, config=ScoreConfig(no_report=True, min_tiles=2))
    assert len(seen) == 1


def test_the_calibration_is_kept_with_its_record(tmp_path):
    from wsi_her2.score.calibration import Calibration

    path = tmp_path / "cal.json"
    path.write_text(json.dumps({"dab_gain": 1.5, "cell_fraction_cut": 0.2, "n_slides": 4}))
    lab, record = validate_score_config(ScoreConfig(calibration=str(path)))
    assert lab == Calibration(1.5, 0.2) and record["dab_gain"] == 1.5 and record["n_slides"] == 4


def test_a_missing_regions_file_fails_before_any_store(tmp_path):
    with pytest.raises(ConfigError, match="--roi .*no such file"):
        validate_score_config(ScoreConfig(roi=str(tmp_path / "missing.geojson")))


def test_a_regions_file_is_parsed_once_while_it_is_unchanged(tmp_path, monkeypatch):
    import wsi_her2.score.roi as roi

    path = _region_file(tmp_path, 0, 0, 100)
    parsed = []
    load = roi.load_regions
    monkeypatch.setattr(roi, "load_regions", lambda *a, **k: parsed.append(1) or load(*a, **k))
    roi._read_regions_cached.cache_clear()
    for _ in range(3):
        names, _geoms = roi.read_regions(path)
        assert names == ["only"]
    assert len(parsed) == 1
    _region_file(tmp_path, 0, 0, 1000)  # another size: read again
    assert len(roi.read_regions(path)[1]) == 1 and len(parsed) == 2


def test_tiles_go_to_the_nearest_core_within_its_radius_plus_half_a_tile_diagonal():
    """The k-d tree gives the same cores as the full (tiles x cores) distance table it replaced."""
    from wsi_her2.score.tma import _tile_cores

    rng = np.random.default_rng(0)
    coords = rng.integers(0, 20000, size=(5000, 2))
    centres = rng.uniform(0, 20000, size=(40, 2))
    radius = rng.uniform(300, 900, size=40)
    half = 112.0
    d = np.linalg.norm(coords[:, None, :] + half - centres[None, :, :], axis=2)
    nearest = np.argmin(d, axis=1)
    inside = d[np.arange(len(d)), nearest] <= radius[nearest] + half * np.sqrt(2.0)
    expected = np.where(inside, nearest, -1)
    assert np.array_equal(_tile_cores(coords, 2 * half, centres, radius), expected)
    assert (expected >= 0).any() and (expected < 0).any()


def test_two_cores_at_one_grid_position_get_unique_names():
    """Staggered cores chain into one row; two of them share a column: numbered as repeated regions are."""
    from wsi_her2.score.tma import core_groups

    mask = np.zeros((220, 420), np.uint8)
    yy, xx = np.mgrid[:220, :420]
    for x, y in ((50, 50), (200, 75), (350, 100), (50, 125)):
        mask[(xx - x) ** 2 + (yy - y) ** 2 <= 30 ** 2] = 1
    store = SimpleNamespace(
        array=lambda name: mask, attrs={"thumbnail": {"px_per_level0_px": 1 / 16}, "slide": {"mpp_um": 0.5}},
        slide_id="tma", tile_size_level0=224, coords_level0=np.array([[16 * 50 - 112, 16 * 50 - 112]]))
    groups = core_groups(store)
    assert sorted(groups.names) == ["A1 1", "A1 2", "A2", "A3"]
    assert groups.tile_group.tolist() == [groups.names.index("A1 1")]


def test_reject_reasons_are_one_per_flag_value_and_say_outside_the_parts():
    from wsi_her2.score.pipeline import _reject_reasons
    from wsi_her2.tile.qc import reject_reason

    flags = np.array([0, 1, 0, 2, 3, 0, 1], np.uint8)
    store = SimpleNamespace(qc_flags=flags)
    assert _reject_reasons(store, None) == [reject_reason(int(f)) for f in flags]
    inside = np.array([True, False, False, True, False, True, True])
    got = _reject_reasons(store, SimpleNamespace(inside=inside, kind="core"))
    assert got == [r if i or r else "outside cores" for r, i in zip((reject_reason(int(f)) for f in flags), inside)]
    assert got[2] == "outside cores" and got[1] == reject_reason(1)
