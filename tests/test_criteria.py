"""The tumour's own guideline: breast (ASCO/CAP) and gastric (CAP/ASCP/ASCO 2016), resection and biopsy,
either side of each boundary; and one rule for a slide, a TMA core and a region."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from wsi_her2.cli import main
from wsi_her2.criteria import CRITERIA, SPECIMENS, get_criteria, scoring_rule
from wsi_her2.errors import ConfigError
from wsi_her2.models.ihc_score import IhcDabScorer
from wsi_her2.score.aggregate import SlideCall, aggregate_asco_cells, cluster_call, her2_category
from wsi_her2.score.cells import CellTable, largest_clusters
from wsi_her2.synthetic.image_slide import write_image_slide
from wsi_her2.synthetic.membranes import render_membrane_field
from wsi_her2.synthetic.textures import block_mean
from wsi_her2.vocab import CELL_COLUMNS


# --- the percentage cut: breast "> 10 %", gastric resection ">= 10 %" ------------------------------
@pytest.mark.parametrize("share, breast, gastric", [(0.09, "0", "0"), (0.10, "0", "1+"), (0.11, "1+", "1+")])
def test_percentage_cut_either_side_of_ten_percent(share, breast, gastric):
    fractions, cells = np.array([[share, 0.0, 0.0]]), np.array([1000.0])
    assert aggregate_asco_cells(fractions, cells).her2_score == breast
    assert aggregate_asco_cells(fractions, cells, inclusive=True).her2_score == gastric


@pytest.mark.parametrize("grade", [1, 2, 3])
def test_each_grade_needs_its_share_of_tumour_cells(grade):
    at_least = np.zeros((1, 3))
    at_least[0, :grade] = 0.11
    assert aggregate_asco_cells(at_least, np.array([500.0])).her2_score == f"{grade}+"
    at_least[0, grade - 1] = 0.09
    assert aggregate_asco_cells(at_least, np.array([500.0])).her2_score == ("0" if grade == 1 else f"{grade - 1}+")


# --- the biopsy cluster rule: a cluster of >= 5 cohesive stained tumour cells decides ----------------
def _percentage_call(score: str = "0") -> SlideCall:
    return SlideCall(score, 1.0, {}, 10, "asco", {"fraction_at_least": {">=1+": 0.01}})


@pytest.mark.parametrize("largest, want", [
    ({">=1+": 4}, "0"), ({">=1+": 5}, "1+"), ({">=1+": 12, ">=2+": 4}, "1+"), ({">=1+": 12, ">=2+": 5}, "2+"),
    ({">=1+": 30, ">=2+": 20, ">=3+": 4}, "2+"), ({">=1+": 30, ">=2+": 20, ">=3+": 5}, "3+"),
])
def test_cluster_rule_either_side_of_five_cells(largest, want):
    call = cluster_call(_percentage_call(), largest, min_cells=5)
    assert call.her2_score == want
    assert call.details["percentage_call"] == "0" and call.details["cluster_min_cells"] == 5


def test_cells_link_into_a_cluster_only_when_they_touch():
    """Five tumour cells 15 µm apart are one cluster; with one gap of 25 µm they are two (3 + 2)."""
    def table(n):
        cols = {k: np.zeros(n) for k in CELL_COLUMNS}
        cols.update(grade=np.full(n, 3, np.uint8), tumour_weight=np.ones(n))
        return CellTable(cols)

    chain = np.stack([np.arange(5) * 15.0, np.zeros(5)], 1)
    assert largest_clusters(table(5), chain) == {">=1+": 5, ">=2+": 5, ">=3+": 5}
    gapped = chain + np.array([[0, 0], [0, 0], [0, 0], [10, 0], [10, 0]])
    assert largest_clusters(table(5), gapped)[">=3+"] == 3


def test_categories_follow_the_guideline():
    gastric = get_criteria("gastric")
    assert [her2_category(s, 0.0, gastric) for s in ("0", "1+", "2+", "3+")] == [
        "negative", "negative", "gastric_equivocal", "gastric_positive"]
    assert [her2_category(s, 0.05) for s in ("0", "1+", "2+", "3+")] == ["ultralow", "low", "equivocal", "positive"]


def test_tma_cores_are_biopsies_unless_told_otherwise():
    assert scoring_rule("gastric", tma=True).uses_clusters and not scoring_rule("gastric").uses_clusters
    assert not scoring_rule("gastric", "resection", tma=True).uses_clusters
    assert not scoring_rule("breast", "biopsy").uses_clusters  # breast has no cluster rule
    with pytest.raises(ConfigError, match="--criteria"):
        get_criteria("lung")
    with pytest.raises(ConfigError, match="--specimen"):
        scoring_rule("gastric", "cytology")


def test_cli_choices_are_the_criteria_and_specimens():
    from wsi_her2.cli.score import CRITERIA_CHOICES, SPECIMEN_CHOICES

    assert set(CRITERIA_CHOICES) == set(CRITERIA) and set(SPECIMEN_CHOICES) == set(SPECIMENS)


# --- ring patterns: U-shaped (basolateral) and lateral rings -----------------------------------------
def _tiles(field, mpp=0.5) -> torch.Tensor:
    img = block_mean(field.rgb, int(round(mpp / field.mpp_um)))
    px = 224
    tiles = [img[y: y + px, x: x + px] for y in range(0, img.shape[0] - px + 1, px) for x in range(0, img.shape[1] - px + 1, px)]
    return torch.from_numpy(np.ascontiguousarray(np.stack(tiles)))


def _tumour_grades(field, criteria: str) -> np.ndarray:
    cells = IhcDabScorer(mpp_um=0.5, criteria=criteria).measure_u8(_tiles(field))["cells"]
    return cells["grade"].numpy()[cells["tumour_weight"].numpy() > 0.5]


def test_ring_runs_read_from_the_table_equal_the_scan():
    """The longest stained (or unstained) arc of a ring, looked up per bit pattern, is the scan's
    for every pattern of 16 rays, and for rings of more rays (scanned)."""
    from wsi_her2.models.ihc_cells import _circular_runs, _longest_circular_run

    every = ((torch.arange(2**16)[:, None] >> torch.arange(16)) & 1).bool()
    runs = _longest_circular_run(every)
    assert torch.equal(runs, _circular_runs(every))
    assert runs[0] == 0 and runs[-1] == 16 and runs[0b1000_0000_0000_0001] == 2  # the arc wraps round
    wide = torch.rand(500, 24) > 0.3
    assert torch.equal(_longest_circular_run(wide), _circular_runs(wide))


@pytest.mark.parametrize("n_hit, complete, basolateral", [
    (16, True, True),
    (13, True, True),  # an unstained arc of 3 rays, under a quarter of the ring: still complete
    (12, False, True),  # a quarter of the ring unstained (the luminal side): a U, not a ring
    (8, False, True),  # at least half the ring in one arc: basolateral
    (7, False, False),
])
def test_ring_cut_points_hold_at_whole_numbers_of_rays(n_hit, complete, basolateral):
    """"At least" means at least: 8 contiguous stained rays of 16 are a U and 7 are not; a gap of 3 rays
    leaves a ring complete and one of 4 does not (the soft cut-points sit half a ray from each count)."""
    from wsi_her2.models.ihc_cells import ring_patterns
    from wsi_her2.models.ihc_thresholds import IhcThresholds

    loss = torch.zeros(1, 16)
    loss[0, :n_hit] = 1.0 - 10.0 ** -1.2  # intense (OD 1.2) on one unbroken arc
    ring = ring_patterns(loss, IhcThresholds())
    assert (float(ring.complete[0]) > 0.5) == complete, float(ring.complete[0])
    assert (float(ring.basolateral[0]) > 0.5) == basolateral, float(ring.basolateral[0])


@pytest.fixture(scope="module")
def fields():
    return {(p, od): render_membrane_field(membrane_od=od, pattern=p, field_um=(336.0, 336.0), seed=2, layout="glands")
            for p, od in (("basolateral", 1.2), ("lateral", 1.2), ("complete", 0.5), ("partial", 0.15))}


@pytest.mark.parametrize("pattern, od, breast, gastric", [
    ("basolateral", 1.2, 2, 3),  # ASCO/CAP 2018's unusual pattern (2+) / gastric: basolateral counts as complete
    ("lateral", 1.2, 2, 3),
    ("complete", 0.5, 2, 2),
    ("partial", 0.15, 1, 1),
])
def test_ring_patterns_grade_cells_by_the_guideline(fields, pattern, od, breast, gastric):
    for criteria, want in (("breast", breast), ("gastric", gastric)):
        grades = _tumour_grades(fields[(pattern, od)], criteria)
        assert grades.size > 50
        share = float(np.mean(grades == want))
        assert share > 0.75, (pattern, criteria, np.bincount(grades, minlength=4))


# --- through the command line ----------------------------------------------------------------------------
def _score(tmp_path, store, *args) -> dict:
    assert main(["score", str(store), "-o", str(tmp_path), "-q", *args]) == 0
    return json.loads((tmp_path / f"{store.name.removesuffix('.zarr')}.json").read_text())


def test_u_shaped_intense_rings_are_3plus_under_gastric_and_2plus_under_breast(tmp_path, fields):
    slide = write_image_slide(fields[("basolateral", 1.2)].rgb, tmp_path / "u.svs", mpp_um=0.25)
    assert main(["tile", str(slide), "-o", str(tmp_path), "-q"]) == 0
    breast = _score(tmp_path, tmp_path / "u.zarr")
    gastric = _score(tmp_path, tmp_path / "u.zarr", "--criteria", "gastric")  # other criteria: scored again
    assert (breast["call"]["her2_score"], gastric["call"]["her2_score"]) == ("2+", "3+")
    assert gastric["criteria"]["criteria"] == "gastric" and gastric["call"]["her2_category"] == "gastric_positive"
    row = pd.read_csv(tmp_path / "slides.csv", dtype=str).set_index("slide").loc["u"]
    assert (row.criteria, row.specimen, row.her2_score) == ("gastric", "resection", "3+")


def test_a_small_stained_cluster_decides_a_gastric_biopsy_not_a_resection(tmp_path):
    centre = np.array([224.0, 224.0])
    field = render_membrane_field(membrane_od=1.2, field_um=(448.0, 448.0), seed=3,
                                  stained=lambda c: np.linalg.norm(c - centre, axis=1) < 20.0)
    assert 5 <= field.stained.sum() <= 9  # a handful of cells in one cohesive cluster
    slide = write_image_slide(field.rgb, tmp_path / "b.svs", mpp_um=0.25)
    assert main(["tile", str(slide), "-o", str(tmp_path), "-q"]) == 0
    resection = _score(tmp_path, tmp_path / "b.zarr", "--criteria", "gastric")
    biopsy = _score(tmp_path, tmp_path / "b.zarr", "--criteria", "gastric", "--specimen", "biopsy")
    assert resection["call"]["her2_score"] == "0"  # ~1 % of tumour cells
    assert biopsy["call"]["her2_score"] == "3+"
    assert biopsy["call"]["details"]["largest_cluster"][">=3+"] >= 5 and biopsy["call"]["details"]["percentage_call"] == "0"


# --- one rule for a slide and a TMA core -------------------------------------------------------------------
@pytest.mark.parametrize("criteria", [[], ["--criteria", "gastric"]])
def test_a_core_gets_the_call_it_gets_as_its_own_slide(tmp_path, criteria):
    from wsi_her2.synthetic.slides import write_synthetic_slide
    from wsi_her2.synthetic.tma import tma_spec

    tma = write_synthetic_slide(tmp_path / "tma.svs", tma_spec(((2, 1),)))
    alone = write_synthetic_slide(tmp_path / "alone.svs", tma_spec(((2, None),)))  # A1 alone, same place
    for slide in (tma, alone):
        assert main(["tile", str(slide), "-o", str(tmp_path), "-q"]) == 0
    _score(tmp_path, tmp_path / "tma.zarr", "--tma", *criteria)
    slide_call = _score(tmp_path, tmp_path / "alone.zarr", "--specimen", "biopsy", *criteria)["call"]
    core = pd.read_csv(tmp_path / "cores.csv", dtype=str).set_index("name").loc["A1"]
    assert core.status == "scored" and core.her2_score == slide_call["her2_score"] == "2+"
    for k in ("1+", "2+", "3+"):
        assert float(core[f"at_least_{k}"]) == pytest.approx(slide_call["details"]["fraction_at_least"][f">={k}"], abs=1e-4)
    assert float(core.tumour_cells) == pytest.approx(slide_call["details"]["tumour_cells"], abs=0.1)
    assert core.criteria == slide_call["criteria"]["criteria"] and core.specimen == "biopsy"


def test_the_slide_annotation_names_the_criteria(tmp_path, fields):
    slide = write_image_slide(fields[("complete", 0.5)].rgb, tmp_path / "c.svs", mpp_um=0.25)
    assert main(["tile", str(slide), "-o", str(tmp_path), "-q"]) == 0
    _score(tmp_path, tmp_path / "c.zarr", "--criteria", "gastric", "--specimen", "biopsy")
    fc = json.loads((tmp_path / "c.geojson").read_text())
    annotation = fc["features"][0]["properties"]
    assert "gastric, biopsy (cluster of >= 5 cohesive cells)" in annotation["name"]
    assert annotation["metadata"]["criteria"] == "gastric, biopsy (cluster of >= 5 cohesive cells)"
