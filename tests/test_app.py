"""The web app's handler without a browser: bad uploads give the CLI's one-line errors; an image upload scores.

:func:`wsi_her2.app.handle_run` is what the page's buttons call; it needs no Gradio.
"""
from __future__ import annotations

import html
import re

from pathlib import Path

import numpy as np
import pytest

from wsi_her2.app import OUTPUT_NAMES, AppSettings, handle_run, parse_mpp
from wsi_her2.cli import main
from wsi_her2.errors import ConfigError


@pytest.fixture
def settings(tmp_path) -> AppSettings:
    return AppSettings(work_dir=tmp_path / "work", workers=1)


def _outputs(result: tuple) -> dict:
    assert len(result) == len(OUTPUT_NAMES)
    return dict(zip(OUTPUT_NAMES, result))


def _page_error(result: tuple) -> str:
    out = _outputs(result)
    assert out["call"] == "" and out["heatmap"] is None and out["table"] is None and out["downloads"] is None
    assert "Traceback" not in out["error"]
    match = re.fullmatch(r'<div class="wsi-her2-error"[^>]*>Error: (.*)</div>', out["error"], flags=re.S)
    assert match, out["error"]
    return html.unescape(match.group(1))


def _cli_error(capsys, argv: list[str]) -> str:
    capsys.readouterr()
    assert main(argv) != 0
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ": error: " in ln]
    return lines[0].split(": error: ", 1)[1]


def test_not_a_slide_gives_the_cli_error(settings, tmp_path, capsys, monkeypatch):
    upload_dir = tmp_path / "server-copy"
    upload_dir.mkdir()
    bogus = upload_dir / "notes.svs"
    bogus.write_text("not a slide\n")
    shown = _page_error(handle_run(settings, str(bogus), ""))
    assert shown.startswith("notes.svs: cannot open as a slide") and "server-copy" not in shown
    assert "\n" not in shown
    monkeypatch.chdir(upload_dir)  # the user's `wsi-her2 tile notes.svs` in the slide's folder
    assert shown == _cli_error(capsys, ["tile", "notes.svs", "-o", str(tmp_path / "cli")])
    mrxs = upload_dir / "scan.mrxs"
    mrxs.write_text("index")
    assert "cannot be uploaded as one file" in _page_error(handle_run(settings, str(mrxs), None))


def test_slide_without_mpp_gives_the_cli_error_and_the_field_fixes_it(settings, tmp_path, capsys, monkeypatch):
    from wsi_her2.synthetic.slides import graded_ihc_spec, write_synthetic_slide

    slide = write_synthetic_slide(tmp_path / "nompp.svs", graded_ihc_spec(block_px=448, grades=(2,), write_mpp=False,
                                                                          dust=False))
    shown = _page_error(handle_run(settings, str(slide), None))
    assert shown.startswith("nompp.svs: the slide has no pixel size (MPP)")
    monkeypatch.chdir(tmp_path)
    assert shown == _cli_error(capsys, ["tile", "nompp.svs", "-o", str(tmp_path / "cli")])
    out = _outputs(handle_run(settings, str(slide), "0.5"))
    assert out["error"] == "" and out["call"].startswith("## HER2 ")


def test_too_large_upload_is_refused_before_reading(tmp_path):
    big = tmp_path / "big.svs"
    big.write_bytes(b"\0" * 300_000)
    shown = _page_error(handle_run(AppSettings(work_dir=tmp_path / "w", max_upload_mb=0.1), str(big), None))
    assert "over this app's upload limit of 0 MB" in shown and "--max-upload-mb" in shown


def test_image_needs_mpp_and_bad_text_is_one_line(settings, tmp_path):
    from PIL import Image

    png = tmp_path / "field.png"
    Image.fromarray(np.full((64, 64, 3), 230, np.uint8)).save(png)
    assert "enter its µm per pixel" in _page_error(handle_run(settings, str(png), ""))
    assert "is not a number" in _page_error(handle_run(settings, str(png), "half"))
    assert "must be positive" in _page_error(handle_run(settings, str(png), "-1"))
    assert "no file uploaded" in _page_error(handle_run(settings, None, None))
    assert parse_mpp(" 0,25 ") == 0.25 and parse_mpp(None) is None
    with pytest.raises(ConfigError):
        parse_mpp("0")


def test_image_upload_with_mpp_is_scored(settings, tmp_path):
    """A JPEG cut from the demo slide's 2+ region (with some glass), with its µm/px, runs through tile and score."""
    from PIL import Image

    from wsi_her2.synthetic.slides import demo_spec, render_region

    spec = demo_spec()
    pixels = render_region(spec, 224, 224, 1344, 1120)
    jpg = tmp_path / "crop.jpg"
    Image.fromarray(pixels).save(jpg, quality=92)
    out = _outputs(handle_run(settings, str(jpg), str(spec.mpp_um)))
    assert out["error"] == ""
    assert out["call"].startswith("## HER2 2+") and "tumour cells" in out["call"], out["call"]
    table = out["table"]
    assert 0 < len(table) <= 500 and {"tile", "call", "p_2+"} <= set(table.columns)
    assert [Path(p).name for p in out["downloads"]] == ["crop.report.pdf", "crop.geojson", "crop.tiles.parquet", "crop.json"]
    assert out["heatmap"].endswith(".heatmap.png") and out["qc"].endswith(".qc.png")
    # the slide report, shown on the page in a frame of its own
    assert out["report"].startswith('<iframe id="report-frame"') and "HER2 IHC slide report: crop" in html.unescape(out["report"])


def test_dicom_slide_uploaded_as_zip_of_its_folder(settings, tmp_path):
    """A real DICOM WSI (made from the CMU-1 fixture) zipped as hospitals hand it over: named by its identifier."""
    import zipfile

    from conftest import fixture_slide
    from test_dicom_slides import SLIDE_ID, convert_to_dicom

    folder = convert_to_dicom(fixture_slide("CMU-1-Small-Region.svs"), tmp_path / "slide")
    archive = tmp_path / "upload" / "case.zip"
    archive.parent.mkdir()
    with zipfile.ZipFile(archive, "w") as zf:
        for f in sorted(folder.glob("*.dcm")):
            zf.write(f, f"case/{f.name}")
    shown = _page_error(handle_run(settings, str(archive), None))  # CMU-1 is H&E: tiled, then refused by the stain check
    assert SLIDE_ID in shown and "not DAB IHC" in shown, shown
    empty = tmp_path / "upload" / "empty.zip"
    with zipfile.ZipFile(empty, "w") as zf:
        zf.writestr("readme.txt", "no slide")
    assert "holds no DICOM files" in _page_error(handle_run(settings, str(empty), None))


def test_dicom_zip_without_extensions_keeps_the_files_the_reader_takes(tmp_path):
    """Regression: only members ending in .dcm were extracted, while the reader also takes extension-less files
    with the DICM preamble (as many PACS exports name them); notes zipped along are dropped."""
    import zipfile

    from conftest import fixture_slide
    from test_dicom_slides import SLIDE_ID, convert_to_dicom

    from wsi_her2.app import unzip_dicom_slide
    from wsi_her2.slide.dicom import dicom_slide

    folder = convert_to_dicom(fixture_slide("CMU-1-Small-Region.svs"), tmp_path / "slide")
    archive = tmp_path / "case.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for i, f in enumerate(sorted(folder.glob("*.dcm"))):
            zf.write(f, f"case/IMG{i:04d}")
        zf.writestr("case/README.txt", "exported from PACS")
        zf.writestr("__MACOSX/case/._IMG0000", "resource fork")
    unzipped = unzip_dicom_slide(archive, tmp_path / "unzipped")
    n = len(list(folder.glob("*.dcm")))
    assert sorted(p.name for p in unzipped.iterdir()) == [f"IMG{i:04d}" for i in range(n)]
    assert dicom_slide(unzipped).slide_id == SLIDE_ID


def test_dicom_zip_with_duplicate_names_or_too_large_is_refused(settings, tmp_path, monkeypatch):
    """Extracting flat by base name overwrote same-named members silently; the unzipped size is capped."""
    import zipfile

    from wsi_her2 import app
    from wsi_her2.errors import SlideOpenError

    preamble = b"\0" * 128 + b"DICM" + b"\0" * 2000
    twice = tmp_path / "twice.zip"
    with zipfile.ZipFile(twice, "w") as zf:
        zf.writestr("series1/IMG0001", preamble)
        zf.writestr("series2/IMG0001", preamble)
    shown = _page_error(handle_run(settings, str(twice), None))
    assert "series1/IMG0001 and series2/IMG0001 have the same file name" in shown, shown
    big = tmp_path / "big.zip"
    with zipfile.ZipFile(big, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("case/IMG0001", preamble)
    monkeypatch.setattr(app, "MAX_UNZIPPED_BYTES", 1000)
    assert "unzipped it would be over this app's limit" in _page_error(handle_run(settings, str(big), None))
    # the bytes are counted as they come too: a member's declared size is only the archive's word
    with zipfile.ZipFile(big) as zf, pytest.raises(SlideOpenError, match="over this app's limit"):
        app._extract_flat(big, zf, zf.infolist(), tmp_path)


def test_cli_defaults_bind_localhost_and_bad_port_is_one_line(capsys):
    from wsi_her2.cli import build_parser

    args = build_parser().parse_args(["app"])
    assert (args.host, args.port, args.max_upload_mb, args.no_browser, args.work_dir) == ("127.0.0.1", 7860, 2048.0, False,
                                                                                          None)
    assert _cli_error(capsys, ["app", "--port", "0", "--no-browser"]).startswith("--port 0: choose a port")


def test_missing_gradio_is_one_line_naming_the_extra(monkeypatch, tmp_path):
    import sys

    from wsi_her2.app import build_app
    from wsi_her2.errors import MissingDependencyError

    monkeypatch.setitem(sys.modules, "gradio", None)  # import gradio -> ModuleNotFoundError
    with pytest.raises(MissingDependencyError, match=r"wsi-her2 app needs the optional package 'gradio'.*wsi-her2\[app\]"):
        build_app(AppSettings(work_dir=tmp_path))
