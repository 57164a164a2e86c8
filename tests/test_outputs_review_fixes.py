"""The review page from hand-made output folders: links come from what each ``<id>.json`` names, and
damaged JSON (a list where an object belongs, a call that is not one) is left out with a warning.

No slide is scored here: the records are written by hand, with only the keys the page reads.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest


def _record(folder: Path, sid: str, *, outputs: dict, score: str = "2+", **extra) -> Path:
    """A minimal ``<id>.json``: what the review page reads; ``outputs`` as the score stage records them
    (absolute paths, here under a folder that no longer exists: the page goes by the files' names)."""
    record = {"slide": sid, "call": {"her2_score": score, "confidence": 0.9, "her2_category": "equivocal"},
              "row": {"tiles_used": 10, "tiles_rejected": 2},
              "outputs": {k: f"/moved/away/{name}" for k, name in outputs.items()}, **extra}
    path = folder / f"{sid}.json"
    path.write_text(json.dumps(record))
    return path


def _png(path: Path) -> Path:
    from PIL import Image

    Image.new("RGB", (64, 48), (200, 30, 30)).save(path)
    return path


def test_links_and_pictures_are_the_ones_the_record_names(tmp_path):
    from wsi_her2.outputs.review import collect_rows

    # "a": scored with a report; "b": re-scored with --no-report (its earlier report and heatmap are still there)
    _record(tmp_path, "a", outputs={"report_html": "a.report.html", "report_pdf": "a.report.pdf", "heatmap_png": "a.heatmap.png"})
    _record(tmp_path, "b", outputs={"geojson": "b.geojson"})
    for sid in ("a", "b"):
        (tmp_path / f"{sid}.report.html").write_text("<html></html>")
        (tmp_path / f"{sid}.report.pdf").write_bytes(b"%PDF-1.4\n")
        _png(tmp_path / f"{sid}.heatmap.png")
    rows = {r["slide"]: r for r in collect_rows(tmp_path)}
    assert rows["a"]["report_html"] == "a.report.html" and rows["a"]["report_pdf"] == "a.report.pdf"
    assert rows["a"]["thumbnail"].startswith("data:image/jpeg;base64,")
    assert rows["b"]["report_html"] is None and rows["b"]["report_pdf"] is None and rows["b"]["thumbnail"] is None
    assert "files" not in rows["a"]
    # a named report that is gone is not linked either; without a heatmap the QC picture is the thumbnail
    (tmp_path / "a.report.pdf").unlink()
    (tmp_path / "a.heatmap.png").unlink()
    _png(tmp_path / "a.qc.png")
    row = {r["slide"]: r for r in collect_rows(tmp_path)}["a"]
    assert row["report_html"] == "a.report.html" and row["report_pdf"] is None and row["thumbnail"]


def test_json_that_is_not_an_object_is_left_out_with_a_warning(tmp_path, caplog):
    from wsi_her2.outputs.review import PER_SLIDE_DIRNAME, STATE_DIRNAME, write_review

    (tmp_path / "cohort.json").write_text("[]")  # a list where the cohort record belongs
    (tmp_path / STATE_DIRNAME).mkdir()
    (tmp_path / STATE_DIRNAME / "s1.json").write_text('["failed"]')
    (tmp_path / STATE_DIRNAME / "s2.json").write_text(json.dumps({"slide_id": "s2", "status": "pending"}))
    per_slide = tmp_path / PER_SLIDE_DIRNAME
    per_slide.mkdir()
    _record(per_slide, "good", outputs={"report_html": "good.report.html"})
    (per_slide / "good.report.html").write_text("<html></html>")
    (per_slide / "oops.json").write_text(json.dumps({"slide": "oops", "call": "oops"}))
    (per_slide / "list.json").write_text("[1, 2]")
    (per_slide / "bytes.json").write_bytes(b"\xff\xfe{")
    _record(per_slide, "odd", outputs={}, tumour=[], qc_summary="none", row=None)  # damaged sections: listed all the same
    with caplog.at_level(logging.WARNING, logger="wsi_her2.outputs.review"):
        page = write_review(tmp_path).read_text()
    for name in ("cohort.json", "s1.json", "oops.json", "list.json", "bytes.json"):
        assert name in caplog.text, name
    assert 'data-slide="good"' in page and 'data-slide="s2"' in page and 'data-slide="odd"' in page
    assert 'data-slide="oops"' not in page and 'data-slide="s1"' not in page
    assert f'href="{PER_SLIDE_DIRNAME}/good.report.html"' in page


def test_cohort_folder_names_are_the_runners():
    from wsi_her2.batch.runner import PER_SLIDE_DIRNAME
    from wsi_her2.batch.state import STATE_DIRNAME
    from wsi_her2.outputs import review

    assert (review.PER_SLIDE_DIRNAME, review.STATE_DIRNAME) == (PER_SLIDE_DIRNAME, STATE_DIRNAME)


def test_page_says_the_reports_intended_use_and_the_refusal_names_the_folder(tmp_path):
    from wsi_her2.errors import StoreError
    from wsi_her2.outputs.report import INTENDED_USE
    from wsi_her2.outputs.review import write_review

    _record(tmp_path, "a", outputs={})
    assert INTENDED_USE in write_review(tmp_path).read_text()
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(StoreError) as err:
        write_review(empty)
    assert f"-o {empty}`" in str(err.value) and "{out}" not in str(err.value)
