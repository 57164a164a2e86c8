"""Lab calibration: fit the DAB gain / percentage cut to labelled stores, use it when scoring."""
from __future__ import annotations

import json

import pytest

from wsi_her2.score.calibrate import DAB_GAINS, calibrate
from wsi_her2.score.calibration import load_calibration
from wsi_her2.cli import main
from wsi_her2.errors import ConfigError
from wsi_her2.synthetic.slides import Region, SyntheticSlideSpec, write_synthetic_slide
from wsi_her2.tile.pipeline import TileConfig, tile_slide


@pytest.fixture(scope="module")
def graded_stores(tmp_path_factory):
    root = tmp_path_factory.mktemp("cal")
    stores = []
    for grade in range(4):
        spec = SyntheticSlideSpec(672, 672, regions=(Region("ihc", 0, 0, 672, 672, grade=grade),), dust=False, seed=grade)
        slide = write_synthetic_slide(root / f"g{grade}.svs", spec)
        stores.append(tile_slide(slide, root, config=TileConfig(workers=1)).store)
    labels = root / "labels.csv"
    labels.write_text("slide,her2_score\n" + "".join(f"g{g}.svs,{'0' if g == 0 else f'{g}+'}\n" for g in range(4)))
    return root, stores, labels


def test_calibrate_reports_before_and_leave_one_out_and_keeps_defaults_when_they_fit(graded_stores, capsys):
    root, stores, labels = graded_stores
    out = root / "cal.json"
    args = ["calibrate", *map(str, stores), "--labels", str(labels), "-o", str(out), "--gains", "0.5,1,2"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "leave-one-out" in printed and "quadratic-weighted kappa" in printed
    rep = json.loads(out.read_text())
    assert rep["before"]["exact"] == 4  # the planted grades are called right with the defaults
    assert rep["dab_gain"] == 1.0 and rep["cell_fraction_cut"] == 0.10  # so nothing moves
    assert rep["n_slides"] == 4 and rep["grid"]["dab_gain"] == [0.5, 1.0, 2.0]
    assert 1.0 in DAB_GAINS


def test_score_with_calibration_is_used_and_recorded(graded_stores, tmp_path):
    root, stores, _ = graded_stores
    weak = tmp_path / "weak.json"
    weak.write_text(json.dumps({"dab_gain": 0.5, "cell_fraction_cut": 0.10}))
    out = tmp_path / "scored"
    assert main(["score", str(stores[2]), "-o", str(out), "-q", "--calibration", str(weak)]) == 0
    result = json.loads((out / "g2.json").read_text())
    assert result["calibration"]["dab_gain"] == 0.5
    assert result["call"]["her2_score"] in ("0", "1+")  # half the DAB: the planted 2+ reads lower


def test_bad_calibration_file_is_one_line_error(tmp_path, graded_stores, capsys):
    _, stores, _ = graded_stores
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="not a wsi-her2 calibration file"):
        load_calibration(bad)
    assert main(["score", str(stores[0]), "-o", str(tmp_path / "o"), "-q", "--calibration", str(bad)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "calibration" in err[0]


def test_too_few_labelled_stores_are_refused(graded_stores, tmp_path):
    _, stores, labels = graded_stores
    with pytest.raises(ConfigError, match="at least 4"):
        calibrate(stores[:2], labels, tmp_path / "c.json", gains=(1.0,))


def test_a_fit_on_the_edge_of_the_gain_grid_is_reported(graded_stores, capsys):
    """The default grid spans 0.25-4; a best gain on the grid's edge may lie beyond it, and says so."""
    root, stores, labels = graded_stores
    assert min(DAB_GAINS) == 0.25 and max(DAB_GAINS) == 4.0 and 1.0 in DAB_GAINS
    out = root / "edge.json"
    assert main(["calibrate", *map(str, stores), "--labels", str(labels), "-o", str(out), "--gains", "1,2"]) == 0
    assert "lies on the edge of the grid" in capsys.readouterr().out
    assert json.loads(out.read_text())["gain_at_grid_edge"] is True
    inside = json.loads((root / "cal.json").read_text()) if (root / "cal.json").exists() else None
    if inside is not None:  # the first test's fit, gain 1 inside 0.5-2
        assert inside["gain_at_grid_edge"] is False
