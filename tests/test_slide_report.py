"""The one-page slide report: ``<id>.report.html`` (opened in headless Chromium) and ``<id>.report.pdf`` (text read back).

The demo slide (planted HER2 2+) is tiled and scored once; its report must carry the call, the
category, the criteria and the tumour-cell percentages that decided it, fit one A4 page (the PDF,
and the HTML when Chromium prints it), and a damaged or missing picture must give a clear line in
the report, not a broken one.
"""
from __future__ import annotations

import base64
import html
import io
import json
import shutil
from pathlib import Path

import pytest

from _browser import browser, save_page_screenshot, screenshot_path  # noqa: F401 (browser: a fixture)


@pytest.fixture(scope="module")
def scored(demo_slide, tmp_path_factory) -> Path:
    from wsi_her2.cli import main

    out = tmp_path_factory.mktemp("report")
    assert main(["tile", str(demo_slide), "-o", str(out), "-q", "--workers", "1"]) == 0
    assert main(["score", str(out), "-q", "--workers", "1"]) == 0
    return out


def _pdf_text(path_or_bytes) -> tuple[str, list]:
    pypdf = pytest.importorskip("pypdf", reason="pypdf is missing: pip install 'wsi-her2[test]'")
    data = path_or_bytes.read_bytes() if isinstance(path_or_bytes, Path) else path_or_bytes
    reader = pypdf.PdfReader(io.BytesIO(data))
    return "\n".join(page.extract_text() for page in reader.pages), list(reader.pages)


def _percent(value: float) -> str:
    return f"{100 * value:.1f} %"


def test_pdf_carries_call_category_criteria_and_percentages(scored):
    result = json.loads((scored / "demo.json").read_text())
    assert Path(result["outputs"]["report_pdf"]).name == "demo.report.pdf"
    text, pages = _pdf_text(scored / "demo.report.pdf")
    assert len(pages) == 1
    width_pt, height_pt = float(pages[0].mediabox.width), float(pages[0].mediabox.height)
    assert (round(width_pt), round(height_pt)) == (595, 842)  # A4
    flat = " ".join(text.split())
    call = result["call"]
    assert f"HER2 {call['her2_score']}" in flat and call["her2_score"] == "2+"
    assert call["her2_category_text"] in flat  # "HER2 2+ equivocal: reflex ISH advised ..."
    assert result["criteria"]["title"] in flat and "breast, resection" in flat and "strictly above its threshold" in flat
    assert "none: the guideline's cut-points" in flat  # calibration
    for key in (">=1+", ">=2+", ">=3+"):
        assert _percent(call["details"]["fraction_at_least"][key]) in flat, key
    assert "> 10 %" in flat
    assert f"{result['tumour']['cells']:,}" in flat and f"{result['tumour']['area_mm2']:.2f} mm" in flat
    assert f"{result['row']['tiles_used']:,} kept and scored" in flat and "too little tissue" in flat
    assert f"wsi-her2 {result['package_version']}" in flat
    assert "Research use only; the call must be confirmed by a pathologist." in flat


def test_html_in_chromium_one_a4_page(scored, browser, tmp_path):  # noqa: F811 (browser: the fixture)
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.print_page_options import PrintOptions

    browser.get((scored / "demo.report.html").as_uri())
    assert "HER2 2+" in browser.find_element(By.ID, "call").text
    assert "equivocal" in browser.find_element(By.ID, "call").text
    assert "pathologist" in browser.find_element(By.ID, "intended-use").text
    deciding = browser.find_element(By.ID, "deciding").text
    assert "3+: complete, intense membrane staining" in deciding and "> 10 %" in deciding
    sizes = browser.execute_script("return [...document.images].map(i => [i.complete, i.naturalWidth])")
    assert len(sizes) == 2 and all(done and w > 100 for done, w in sizes), sizes  # heatmap and QC picture decoded
    shot = screenshot_path("report.png", tmp_path)
    browser.set_window_size(900, 1000)
    save_page_screenshot(browser, shot, width=900, colors=128)
    assert shot.stat().st_size > 20_000
    options = PrintOptions()  # as a user prints it: A4, the page's own margins
    options.page_width, options.page_height = 21.0, 29.7
    _, pages = _pdf_text(base64.b64decode(browser.print_page(options)))
    assert len(pages) == 1


def test_damaged_and_missing_pictures_give_a_clear_line(scored, tmp_path):
    from wsi_her2.outputs.report import write_slide_report
    from wsi_her2.result import SlideResult

    out = tmp_path / "out"
    out.mkdir()
    result = SlideResult.from_record(json.loads((scored / "demo.json").read_text()))
    heatmap = out / "demo.heatmap.png"
    heatmap.write_bytes((scored / "demo.heatmap.png").read_bytes()[:3000])  # truncated PNG
    result = result.with_outputs({**result.outputs, "heatmap_png": str(heatmap)})
    written = write_slide_report(out, result, qc_png=out / "demo.qc.png")  # no QC picture there
    page = Path(written["report_html"]).read_text()
    assert "Picture not shown." in page and "demo.heatmap.png cannot be read" in page
    assert "demo.qc.png is missing" in page and "HER2 2+" in page and "<img" not in page
    text, pages = _pdf_text(Path(written["report_pdf"]))
    flat = " ".join(text.split())
    assert len(pages) == 1 and "demo.heatmap.png cannot be read" in flat and "demo.qc.png is missing" in flat
    assert "HER2 2+" in flat


def test_no_report_option_writes_none(scored, tmp_path):
    from wsi_her2.cli import main

    store = tmp_path / "demo.zarr"
    shutil.copytree(scored / "demo.zarr", store)
    assert main(["score", str(store), "-q", "--workers", "1", "--no-report"]) == 0
    assert (tmp_path / "demo.json").is_file() and not list(tmp_path.glob("*.report.*"))
    assert "report_pdf" not in json.loads((tmp_path / "demo.json").read_text())["outputs"]


@pytest.fixture(scope="module")
def gastric_biopsy(scored, tmp_path_factory) -> Path:
    """The demo slide scored again under the gastric guideline, as a biopsy: the cluster rule decides."""
    from wsi_her2.cli import main

    out = tmp_path_factory.mktemp("gastric")
    assert main(["score", str(scored / "demo.zarr"), "-o", str(out), "-q", "--workers", "1", "--criteria", "gastric",
                 "--specimen", "biopsy"]) == 0
    return out


def _report_texts(folder: Path) -> tuple[str, str]:
    """The HTML report's text (markup unescaped) and the PDF's, whitespace folded."""
    text, pages = _pdf_text(folder / "demo.report.pdf")
    assert len(pages) == 1
    return html.unescape((folder / "demo.report.html").read_text()), " ".join(text.split())


def test_gastric_biopsy_report_shows_the_inclusive_cut_and_the_cluster_rule(gastric_biopsy):
    details = json.loads((gastric_biopsy / "demo.json").read_text())["call"]["details"]
    clusters, min_cells = details["largest_cluster"], details["cluster_min_cells"]  # the cluster rule decided
    for text in _report_texts(gastric_biopsy):
        assert ">= 10 %" in text and "> 10 %" not in text  # the gastric cut counts a share equal to it
        assert "complete, basolateral or lateral" in text  # the gastric guideline's rings
        assert "largest cohesive cluster" in text and f">= {min_cells} cells" in text
        assert all(f"{n:,} cell" in text for n in clusters.values())
        assert "Cluster rule" in text and f"would give {details['percentage_call']}" in text
        assert details["confidence_method"] in text and "bootstrap" not in text


def test_breast_report_shows_the_strict_cut_and_the_bootstrap(scored):
    details = json.loads((scored / "demo.json").read_text())["call"]["details"]
    for text in _report_texts(scored):
        assert "> 10 %" in text and ">= 10 %" not in text and "above its cut-point" in text
        assert "largest cohesive cluster" not in text and "basolateral" not in text
        assert details["confidence_method"] in text and "bootstrap" in text


def test_gastric_resection_compares_at_or_above_the_cut():
    from wsi_her2.criteria import scoring_rule
    from wsi_her2.outputs.report import build_report
    from wsi_her2.result import PartCall, Provenance, SlideResult

    at_least = {">=1+": 0.3, ">=2+": 0.1, ">=3+": 0.02}  # 2+ exactly at the cut: 2+ under the gastric rule
    call = PartCall(her2_score="2+", confidence=0.8, class_fractions={}, n_tiles_used=9, method="asco",
                    details={"fraction_at_least": at_least, "thresholds": dict.fromkeys(("1+", "2+", "3+"), 0.1),
                             "passed": {"1+": True, "2+": True, "3+": False}},
                    her2_category="gastric_equivocal", her2_category_text="HER2 2+ equivocal",
                    criteria=scoring_rule("gastric", "resection").to_dict())
    report = build_report(SlideResult("g", call, Provenance(model="m", aggregation="asco", package_version="0")))
    assert [cut for _, _, cut, _ in report.deciding] == [">= 10 %"] * 3
    assert [passed for *_, passed in report.deciding] == ["no", "yes", "yes"]
    assert "at or above its cut-point" in report.deciding_note and report.confidence_method == ""
