"""Debian's headless Chromium driven by Selenium, for the tests that look at pages as a user does.

Skips when Chromium, chromedriver or selenium is missing (``.ci/run`` installs them). The
README's screenshots are refreshed only on request (``WSI_HER2_UPDATE_SCREENSHOT=1``), so a test
run leaves the checkout clean; otherwise pictures go to pytest's temporary folder.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
DOCS = Path(__file__).resolve().parents[1] / "docs"


def need_browser() -> None:
    for path in (CHROMIUM, CHROMEDRIVER):
        if not path.is_file():
            pytest.skip(f"{path} is missing: apt-get install chromium chromium-driver (.ci/run does)")
    pytest.importorskip("selenium", reason="selenium is missing: pip install 'wsi-her2[test]'")


def start_browser(width: int = 1280, height: int = 1000):
    """A headless Chromium; the caller quits it."""
    need_browser()
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = str(CHROMIUM)
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                f"--window-size={width},{height}"):
        options.add_argument(arg)
    return webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)


def screenshot_path(name: str, tmp_path: Path) -> Path:
    """``docs/<name>`` when the README's pictures are being refreshed, else a temporary file."""
    path = DOCS / name if os.environ.get("WSI_HER2_UPDATE_SCREENSHOT") == "1" else tmp_path / name
    path.parent.mkdir(exist_ok=True)
    return path


def save_page_screenshot(driver, path: Path, *, width: int = 1280, colors: int = 64) -> None:
    """The whole page, as a small palette PNG."""
    from PIL import Image

    height = int(driver.execute_script("return document.documentElement.scrollHeight"))
    driver.set_window_size(width, min(max(height + 200, 1000), 4000))
    time.sleep(0.5)
    raw = path.with_suffix(".raw.png")
    driver.save_screenshot(str(raw))
    with Image.open(raw) as im:
        im.convert("RGB").quantize(colors=colors).save(path, optimize=True)
    raw.unlink()


@pytest.fixture
def browser():
    """A headless Chromium for one test (import this fixture into the test module)."""
    driver = start_browser()
    try:
        yield driver
    finally:
        driver.quit()
