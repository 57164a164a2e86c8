"""The cohort review page in headless Chromium, on a cohort made of the real BCI dev patches.

Three real HER2 IHC patches (``../shared/fixtures/ihc_dev``, never copied into the repository)
become slides at 1.0 µm/px (``wsi_her2.synthetic.image_slide``), with a broken file beside them;
``wsi-her2 run`` tiles and scores them (threads, CPU) and writes ``review.html``. In the browser,
from the file itself (no server): the failed and indeterminate slides are on top, a header click
sorts, the filter narrows to the indeterminate slides, and a row's link opens that slide's report.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from _browser import browser, save_page_screenshot, screenshot_path  # noqa: F401 (browser: a fixture)
from conftest import FIXTURES

DEV = FIXTURES / "ihc_dev"
PATCHES = {"00004_test_0": "0", "00003_test_3+": "3+", "00001_test_2+": "2+"}


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    if not all((DEV / f"{name}.jpg").is_file() for name in PATCHES):
        pytest.skip(f"real dev patches not available in {DEV}")
    pytest.importorskip("distributed", reason="dask distributed is missing: pip install 'wsi-her2[cohort]'")
    from PIL import Image

    from wsi_her2.cli import main
    from wsi_her2.synthetic.image_slide import write_image_slide

    root = tmp_path_factory.mktemp("cohort")
    slides = root / "slides"
    slides.mkdir()
    lines = ["slide,label"]
    for name, label in PATCHES.items():
        rgb = np.asarray(Image.open(DEV / f"{name}.jpg").convert("RGB"))
        path = write_image_slide(rgb, slides / f"{name.replace('+', 'p')}.svs", mpp_um=1.0)
        lines.append(f"slides/{path.name},{label}")
    (slides / "broken.svs").write_text("not a slide\n")
    lines.append("slides/broken.svs,1+")
    (root / "manifest.csv").write_text("\n".join(lines) + "\n")
    out = root / "out"
    rc = main(["run", str(root / "manifest.csv"), "-o", str(out), "--threads", "--workers", "2", "--gpus", "none", "-q",
               "--mpp", "1.0", "--device", "cpu"])
    assert rc == 1  # the broken file
    return out


def _visible_ids(driver) -> list[str]:
    return driver.execute_script(
        "return [...document.querySelectorAll('#slides tbody tr')].filter(r => r.style.display !== 'none')"
        ".map(r => r.dataset.slide)")


def _statuses(driver) -> dict[str, str]:
    return driver.execute_script(
        "return Object.fromEntries([...document.querySelectorAll('#slides tbody tr')].map(r => [r.dataset.slide, r.dataset.status]))")


def test_run_writes_a_review_page_that_works_offline(cohort, browser, tmp_path):  # noqa: F811 (browser: the fixture)
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    page = cohort / "review.html"
    source = page.read_text()
    assert "http://" not in source and "https://" not in source  # nothing fetched: no server, no network
    browser.get(page.as_uri())
    statuses = _statuses(browser)
    assert set(statuses) == {"broken", "00004_test_0", "00003_test_3p", "00001_test_2p"}
    assert statuses["broken"] == "failed"
    order = _visible_ids(browser)
    ranks = [{"failed": 0, "indeterminate": 1}.get(statuses[s], 2) for s in order]
    assert order[0] == "broken" and ranks == sorted(ranks)  # failed, then indeterminate, then called slides
    assert "4 of 4 slides shown" in browser.find_element(By.ID, "count").text
    thumbs = browser.execute_script("return [...document.images].map(i => i.naturalWidth)")
    assert len(thumbs) == 3 and min(thumbs) > 50  # the scored slides' heatmaps, embedded
    assert "Agreement with labels" in browser.page_source and "label" in browser.find_element(By.ID, "slides").text
    shot = screenshot_path("review.png", tmp_path)  # as it opens: failed and indeterminate slides on top
    save_page_screenshot(browser, shot, width=1280, colors=128)
    assert shot.stat().st_size > 20_000
    assert browser.execute_script("return document.documentElement.scrollWidth") <= 1280  # no sideways scrolling

    # a header click sorts by that column (again: reversed)
    header = browser.find_element(By.CSS_SELECTOR, '#slides th[data-key="slide"]')
    header.click()
    assert _visible_ids(browser) == sorted(statuses)
    header.click()
    assert _visible_ids(browser) == sorted(statuses, reverse=True)

    # the filter: only the indeterminate slides, then all again
    Select(browser.find_element(By.ID, "filter")).select_by_value("status:indeterminate")
    shown = _visible_ids(browser)
    assert sorted(shown) == sorted(s for s, st in statuses.items() if st == "indeterminate")  # in the sorted order of the last click
    Select(browser.find_element(By.ID, "filter")).select_by_value("review")
    assert set(_visible_ids(browser)) == {s for s, st in statuses.items() if st in ("failed", "indeterminate")}
    Select(browser.find_element(By.ID, "filter")).select_by_value("all")
    assert len(_visible_ids(browser)) == 4

    # a row's link opens the slide's report
    called = next(s for s, st in statuses.items() if st == "done")
    browser.find_element(By.CSS_SELECTOR, f'#slides tr[data-slide="{called}"] a.report_html').click()
    WebDriverWait(browser, 10).until(lambda d: d.current_url.endswith(f"{called}.report.html"))
    assert f"HER2 IHC slide report: {called}" in browser.find_element(By.TAG_NAME, "h1").text


def test_review_command_with_labels_and_refusals(cohort, tmp_path, capsys):
    from wsi_her2.cli import main

    folder = tmp_path / "copy"
    shutil.copytree(cohort, folder)
    (folder / "review.html").unlink()
    labels = tmp_path / "labels.csv"
    labels.write_text("slide,her2_score\n00004_test_0,0\n00003_test_3p,3+\n00001_test_2p,2+\n")
    assert main(["review", str(folder), "--labels", str(labels)]) == 0
    page = (folder / "review.html").read_text()
    assert 'id="agreement"' in page and "quadratic-weighted kappa" in page and 'href="per-slide/' in page
    assert main(["review", str(folder)]) == 0 and 'id="agreement"' not in (folder / "review.html").read_text()
    capsys.readouterr()
    empty = tmp_path / "empty"
    empty.mkdir()
    for argv in (["review", str(empty)], ["review", str(tmp_path / "missing")],
                 ["review", str(folder), "--labels", str(tmp_path / "nope.csv")]):
        assert main(argv) != 0
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("wsi-her2 review: error: "), err
