"""The web app in a real browser: Debian's headless Chromium, driven by Selenium, runs the demo slide.

Starts ``wsi-her2 app`` on a free localhost port (in this process, in Gradio's server thread),
clicks "Run the demo slide", waits for the call and reads the planted "HER2 2+" off the page,
saves a screenshot of the page to ``docs/app.png`` (shown in the README), then uploads a file
that is not a slide and reads the one-line error off the page.
Skips when Chromium, chromedriver, selenium or gradio is missing (``.ci/run`` installs them).
"""
from __future__ import annotations

import socket
import time

import pytest

from _browser import browser, need_browser, save_page_screenshot, screenshot_path  # noqa: F401 (browser: a fixture)

RUN_TIMEOUT_S = 150  # the demo takes ~35 s on a busy 2-core machine


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _need_browser() -> None:
    need_browser()
    pytest.importorskip("gradio", reason="gradio is missing: pip install 'wsi-her2[app]'")


@pytest.fixture
def app_url(tmp_path):
    _need_browser()
    from wsi_her2.app import AppSettings, serve

    port = _free_port()
    page = serve(AppSettings(work_dir=tmp_path / "work"), port=port, open_browser=False, block=False)
    try:
        yield f"http://127.0.0.1:{port}/"
    finally:
        page.close()


def test_demo_call_in_browser(app_url, browser, tmp_path):  # noqa: F811 (browser: the fixture)
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import WebDriverWait

    t0 = time.perf_counter()
    browser.get(app_url)
    WebDriverWait(browser, 30).until(EC.element_to_be_clickable((By.ID, "run-demo"))).click()
    WebDriverWait(browser, RUN_TIMEOUT_S).until(EC.text_to_be_present_in_element((By.ID, "call"), "HER2 2+"))
    call_text = browser.find_element(By.ID, "call").text
    assert "HER2 2+" in call_text
    assert "confidence" in call_text and "tumour cells" in call_text
    assert browser.find_element(By.ID, "error").text.strip() == ""
    WebDriverWait(browser, 30).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#heatmap img, #qc img"))
    WebDriverWait(browser, 30).until(
        lambda d: ".geojson" in d.find_element(By.ID, "downloads").text and ".parquet" in d.find_element(By.ID, "downloads").text)
    assert "x_level0" in browser.find_element(By.ID, "tiles").text
    downloads = browser.find_element(By.ID, "downloads").text  # the slide report, offered (Gradio breaks the name) ...
    assert "demo-her2-ihc.report" in downloads and ".pdf" in downloads
    browser.switch_to.frame(browser.find_element(By.ID, "report-frame"))  # ... and shown
    assert "HER2 2+" in browser.find_element(By.ID, "call").text and "pathologist" in browser.find_element(By.ID, "intended-use").text
    browser.switch_to.default_content()
    shot = screenshot_path("app.png", tmp_path)
    save_page_screenshot(browser, shot)
    assert shot.stat().st_size > 10_000

    # a file that is not a slide, uploaded through the page: the CLI's one line, and the old call is cleared
    bogus = tmp_path / "notes.svs"
    bogus.write_text("not a slide\n")
    browser.find_element(By.CSS_SELECTOR, "#upload input[type=file]").send_keys(str(bogus))
    WebDriverWait(browser, 30).until(lambda d: ".svs" in d.find_element(By.ID, "upload").text)
    browser.find_element(By.ID, "run-upload").click()
    WebDriverWait(browser, 60).until(EC.text_to_be_present_in_element((By.ID, "error"), "cannot open as a slide"))
    error_text = browser.find_element(By.ID, "error").text
    assert error_text.startswith("Error: notes.svs: cannot open as a slide") and "Traceback" not in browser.page_source
    assert "HER2 2+" not in browser.find_element(By.ID, "call").text
    print(f"browser run of the demo: {time.perf_counter() - t0:.1f} s; screenshot {shot}")


