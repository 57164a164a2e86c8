"""CSV injection: text cells a spreadsheet would run as a formula are neutralised in every CSV the
project writes (OWASP: a leading single quote); numbers stay numbers."""
from __future__ import annotations

import ast
import csv
from pathlib import Path

import pytest

from wsi_her2.csv_cells import safe_cell

PACKAGE = Path(__file__).resolve().parents[1] / "wsi_her2"
EVIL = '=HYPERLINK("http:,x")'


@pytest.mark.parametrize("text", [EVIL, "+cmd", "-2+3", "@SUM(A1)", "\t=1", "\r=1", "-slide"])
def test_text_cells_starting_like_a_formula_get_a_quote(text):
    assert safe_cell(text) == "'" + text
    assert safe_cell(safe_cell(text)) == "'" + text  # once only: rewriting a table adds nothing


@pytest.mark.parametrize("value", [-0.5, -3, 0.25, "-0.5", "+1", "-1e-3", "1+", "2+", "slide", "", None, "'=quoted"])
def test_numbers_and_plain_text_are_left_alone(value):
    assert safe_cell(value) == value


def _rows(path: Path) -> list[dict]:
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


def test_slides_csv_neutralises_the_slide_name_once(tmp_path):
    from wsi_her2.outputs.tables import ensure_slides_csv_row, upsert_slides_csv

    path = tmp_path / "slides.csv"
    row = {"slide": EVIL, "her2_score": "2+", "confidence": 0.9, "frac_0": -0.5, "model": "@evil"}
    upsert_slides_csv(path, [row])
    text = path.read_text()
    row["her2_score"] = "3+"
    upsert_slides_csv(path, [row])  # the same slide again: replaced, not added
    ensure_slides_csv_row(path, row)  # its row is there as written: nothing to put back
    assert path.read_text() == text.replace(",2+,", ",3+,")
    rows = _rows(path)
    assert len(rows) == 1 and rows[0]["slide"] == "'" + EVIL and rows[0]["her2_score"] == "3+"
    assert rows[0]["frac_0"] == "-0.5" and rows[0]["model"] == "'@evil"


def test_region_table_neutralises_names(tmp_path):
    from wsi_her2.outputs.tables import upsert_rows
    from wsi_her2.result import PART_CSV_COLUMNS

    path = tmp_path / "regions.csv"
    for _ in range(2):
        upsert_rows(path, PART_CSV_COLUMNS, ["-s"], [{"slide": "-s", "name": "=1+1", "status": "scored", "x_level0": -12.5}])
    rows = _rows(path)
    assert [(r["slide"], r["name"], r["x_level0"]) for r in rows] == [("'-s", "'=1+1", "-12.5")]


def test_cohort_table_neutralises_text_and_keeps_numbers():
    from wsi_her2.batch.report import slides_csv_text

    text = slides_csv_text([{"slide": "@x", "status": "failed", "reason": "=cmd|' /C calc'!A0", "confidence": -0.5}])
    row = next(csv.DictReader(text.splitlines()))
    assert row["slide"] == "'@x" and row["reason"].startswith("'=cmd") and row["confidence"] == "-0.5"


def test_every_csv_writer_of_the_package_uses_the_one_rule():
    """Each module that makes a csv writer passes its cells through wsi_her2.csv_cells."""
    writers = []
    for path in sorted(PACKAGE.rglob("*.py")):
        source = path.read_text(encoding="utf-8")
        calls = {n.func.attr for n in ast.walk(ast.parse(source))
                 if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute) and n.func.attr in ("writer", "DictWriter")}
        if calls:
            writers.append(path.relative_to(PACKAGE.parent))
            assert "from wsi_her2.csv_cells import safe_" in source, f"{path} writes CSV without wsi_her2.csv_cells"
    assert len(writers) >= 5  # slides.csv and regions/cores.csv (one upsert), cohort slides.csv, split/labels, metrics, predictions


def test_a_slide_named_like_a_formula_is_text_in_slides_csv(tmp_path):
    from wsi_her2.score.pipeline import ScoreConfig, score_store
    from wsi_her2.synthetic.slides import graded_ihc_spec, write_synthetic_slide
    from wsi_her2.tile.pipeline import TileConfig, tile_slide

    slide = write_synthetic_slide(tmp_path / f"{EVIL}.svs", graded_ihc_spec(block_px=448, grades=(2,), dust=False))
    store = tile_slide(slide, tmp_path / "out", config=TileConfig(workers=1)).store
    score_store(store, config=ScoreConfig(min_tiles=1))
    text = (tmp_path / "out" / "slides.csv").read_text()
    assert text.splitlines()[1].startswith('"\'=HYPERLINK(""http:,x"")",')
