"""Empty or unstained cores, as a user meets them: `tile` stops with its reason, `score` says
indeterminate with that reason (never HER2 0, never a missing file)."""
from __future__ import annotations

import json

import numpy as np

from wsi_her2.cli import main
from wsi_her2.store.no_tissue import record_path
from wsi_her2.synthetic.cores import pale_core
from wsi_her2.synthetic.image_slide import write_image_slide


def _unstained_core_slide(tmp_path, name: str = "blank"):
    rgb, _ = pale_core(size_px=1200, mpp_um=1.0, core_diameter_um=1000.0, stain_od=0.0, seed=2)
    return write_image_slide(rgb, tmp_path / f"{name}.svs", mpp_um=1.0)


def test_unstained_core_is_indeterminate_with_its_reason(tmp_path, capsys):
    slide = _unstained_core_slide(tmp_path)
    out = tmp_path / "out"
    assert main(["tile", str(slide), "-o", str(out), "--mpp", "1.0", "-q"]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert "no tissue found" in err[0] and err[1:] == ["wsi-her2 tile: 1 of 1 slides failed"]
    assert (out / "blank.qc.png").is_file() and record_path(out / "blank.zarr").is_file()
    assert not (out / "blank.zarr").exists()

    for target in (out / "blank.zarr", out):  # the store path, or the output folder
        assert main(["score", str(target), "-o", str(out), "-q", "--overwrite"]) == 0
        printed = capsys.readouterr().out
        assert "blank: HER2 indeterminate" in printed and "no tissue found" in printed
        result = json.loads((out / "blank.json").read_text())
        assert result["call"]["her2_score"] == "indeterminate"
        assert result["call"]["her2_category"] == "indeterminate"
        assert "no tissue found" in result["call"]["details"]["reason"]
        rows = (out / "slides.csv").read_text().splitlines()
        assert len(rows) == 2 and rows[1].startswith("blank,indeterminate,")
        # the report says why there is no call and shows what the tile stage looked at
        report_html = (out / "blank.report.html").read_text()
        assert "indeterminate" in report_html and "no tissue found" in report_html
        assert report_html.count("data:image/jpeg;base64,") == 1  # the QC picture (no heatmap without tiles)
        assert (out / "blank.report.pdf").read_bytes().startswith(b"%PDF")
        assert result["outputs"]["report_pdf"].endswith("blank.report.pdf")


def test_record_goes_when_the_slide_is_tiled_after_all(tmp_path):
    out = tmp_path / "out"
    slide = _unstained_core_slide(tmp_path, "core")
    assert main(["tile", str(slide), "-o", str(out), "--mpp", "1.0", "-q"]) != 0
    assert record_path(out / "core.zarr").is_file()
    # the same slide name, now with stained tissue (a rescan, or the right file)
    rgb, _ = pale_core(size_px=1200, mpp_um=1.0, core_diameter_um=1000.0, stain_od=1.0, seed=2)
    write_image_slide(rgb, slide, mpp_um=1.0)
    assert main(["tile", str(slide), "-o", str(out), "--mpp", "1.0", "-q"]) == 0
    assert not record_path(out / "core.zarr").exists() and (out / "core.zarr").is_dir()
    assert main(["score", str(out), "-o", str(out), "-q"]) == 0
    result = json.loads((out / "core.json").read_text())
    assert result["store"] and np.isfinite(result["call"]["confidence"])


def test_overwrite_that_finds_no_tissue_leaves_no_old_store_behind(tmp_path):
    """A complete store from before must not be scored in place of the no-tissue record."""
    out = tmp_path / "out"
    rgb, _ = pale_core(size_px=1200, mpp_um=1.0, core_diameter_um=1000.0, stain_od=1.0, seed=2)
    slide = write_image_slide(rgb, tmp_path / "core.svs", mpp_um=1.0)
    assert main(["tile", str(slide), "-o", str(out), "--mpp", "1.0", "-q"]) == 0
    _unstained_core_slide(tmp_path, "core")  # the same name, now a blank core
    assert main(["tile", str(slide), "-o", str(out), "--mpp", "1.0", "-q", "--overwrite"]) != 0
    assert not (out / "core.zarr").exists() and record_path(out / "core.zarr").is_file()
    assert main(["score", str(out), "-o", str(out), "-q"]) == 0
    assert json.loads((out / "core.json").read_text())["call"]["her2_score"] == "indeterminate"
