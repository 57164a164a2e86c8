"""Tests of qc/real_stain_check.py: real IHC images through `wsi-her2 tile` and `wsi-her2 score`."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from wsi_her2.batch.report import confusion_matrix, weighted_kappa

REPO_ROOT = Path(__file__).resolve().parents[1]
FIXTURES = REPO_ROOT.parent / "shared" / "fixtures"
spec = importlib.util.spec_from_file_location("real_stain_check", REPO_ROOT / "qc" / "real_stain_check.py")
rsc = importlib.util.module_from_spec(spec)
sys.modules.setdefault(spec.name, rsc)  # dataclasses look their module up by name
spec.loader.exec_module(rsc)

IHC_DEV = FIXTURES / "ihc_dev"
ROW_KEYS = {"image", "variant", "slide", "label", "criteria", "call", "category", "tumour_area_mm2", "tumour_cells",
            "tiles_used", "tiles_total", "rejected", "reason", "agreement", "error", "seconds"}


def test_real_core_goes_through_tile_and_score(tmp_path):
    if not (IHC_DEV / "labels.csv").is_file():
        pytest.skip(f"real fixtures {IHC_DEV} not available")
    image, label = rsc.read_labels(IHC_DEV)[6]  # 00006, a 3+ patch of carcinoma nests
    rows = rsc.check_image(image, label, "core", rsc.CheckOptions(out_dir=tmp_path))
    assert [r["criteria"] for r in rows] == ["breast", "gastric"]  # one score per guideline
    row = rows[0]
    assert set(row) == ROW_KEYS
    assert row["error"] is None, row["error"]
    # the counted tumour cells set against the drawn tumour, from the command's own cells table
    found = rsc.Agreement(*row["agreement"])
    assert found.nuclei_in_tumour > 100 and 0.0 <= found.precision <= 1.0
    assert row["label"] == "3+" and row["slide"] == "00006_test_3+.core.1um"
    assert row["call"] in ("0", "1+", "2+", "3+", "indeterminate")
    # every tile is either used or rejected for a reason read from the parquet
    assert row["tiles_total"] > 0
    assert row["tiles_used"] + sum(row["rejected"].values()) == row["tiles_total"]
    # the slide the user would have: a core on lavender glass, at 1.0 µm/px
    with Image.open(tmp_path / "slides" / f"{row['slide']}.svs") as im:
        corner = np.asarray(im.convert("RGB"))[:8, :8].reshape(-1, 3).mean(0)
    assert np.abs(corner - rsc.LAVENDER_GLASS_RGB).max() < 3
    assert "-" in rsc.format_row(row) or row["category"] is not None


def test_a_failing_tile_is_a_row_with_its_error(tmp_path):
    glass = tmp_path / "glass.jpg"
    Image.fromarray(np.full((512, 512, 3), rsc.LAVENDER_GLASS_RGB, np.uint8)).save(glass, quality=95)
    row, = rsc.check_image(glass, "0", "full", rsc.CheckOptions(out_dir=tmp_path / "out", criteria=("breast",)))
    assert set(row) == ROW_KEYS and row["call"] is None
    assert row["error"].startswith("tile: glass.full.1um.svs: ") and "no tissue" in row["error"]
    assert "ERROR tile:" in rsc.format_row(row)


def test_an_unreadable_image_is_a_row_not_a_crash(tmp_path):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not a jpeg")
    rows = rsc.check_image(bad, "2+", "core", rsc.CheckOptions(out_dir=tmp_path / "out"))
    assert len(rows) == 2 and all(r["error"] and r["call"] is None for r in rows)


def test_outputs_are_read_defensively(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    sid = "x.core.1um"
    base = {"call": {"her2_score": "indeterminate", "details": {"reason": "too few"}},
            "row": {"tiles_used": 2, "tiles_rejected": 3}}
    (tmp_path / f"{sid}.json").write_text(json.dumps(base))
    pq.write_table(pa.table({"qc_reason": [None, None, "blurry", "blurry", "low_tissue+blurry"]}),
                   tmp_path / f"{sid}.tiles.parquet")
    out = rsc.read_outputs(tmp_path, sid)
    assert out["category"] is None and out["tumour_area_mm2"] is None and out["tumour_cells"] is None
    assert out["rejected"] == {"blurry": 2, "low_tissue+blurry": 1} and out["tiles_total"] == 5
    assert out["reason"] == "too few"
    extended = {**base, "call": {"her2_score": "2+", "her2_category": "HER2-low"},
                "tumour": {"area_mm2": 0.42, "cells": 1234}}
    (tmp_path / f"{sid}.json").write_text(json.dumps(extended))
    out = rsc.read_outputs(tmp_path, sid)
    assert (out["call"], out["category"], out["tumour_area_mm2"], out["tumour_cells"]) == ("2+", "HER2-low", 0.42, 1234)
    assert out["reason"] is None


def test_summary_counts_and_kappa():
    def row(label, call, error=None):
        return {"slide": f"s{label}{call}{error}", "label": label, "call": call, "error": error, "variant": "full",
                "agreement": None}

    rows = [row("0", "0"), row("1+", "2+"), row("3+", "3+"), row("2+", "1+"), row("2+", "indeterminate"),
            row("1+", None, "tile: x.svs: no tissue found"), row("0", None, "score: boom")]
    s = rsc.summarise(rows)
    assert (s["n"], s["exact"], s["no_tissue"], s["other_failures"], s["indeterminate"]) == (7, 2, 1, 1, 1)
    expected = weighted_kappa(confusion_matrix([0, 1, 3, 2], [0, 2, 3, 1], n_classes=4))
    assert s["agreement"]["quadratic_weighted_kappa"] == pytest.approx(expected, abs=1e-6)
    assert "exact agreement 2/7" in rsc.format_summary("full", s)


def test_bad_variant_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exc:
        rsc.parse_args(["--variants", "oval", "--fixtures", str(Path(__file__).parent)])
    assert exc.value.code == 2


def test_tma_of_cores_is_aligned_with_the_tiles_and_the_slide_blocks(tmp_path):
    """The TMA puts each core's slide pixels at a pitch that is a multiple of 224 and 256 px."""
    if not (IHC_DEV / "labels.csv").is_file():
        pytest.skip(f"real fixtures {IHC_DEV} not available")
    images = [image for image, _ in rsc.read_labels(IHC_DEV)[:3]]
    opts = rsc.CheckOptions(out_dir=tmp_path)
    slide, names = rsc.make_tma(images, opts)
    assert names == {"A1": images[0].name, "A2": images[1].name, "B1": images[2].name}
    own = rsc.slide_rgb(images[1], "core", opts)
    with Image.open(slide) as im:
        tma = np.asarray(im.convert("RGB"))
    pitch = tma.shape[1] // 2
    assert pitch % 224 == 0 and pitch % 256 == 0
    block = tma[: own.shape[0], pitch: pitch + own.shape[1]].astype(int)
    assert np.abs(block - own.astype(int)).mean() < 1.5  # the same pixels, up to the slides' JPEG


def test_summary_pools_the_annotation_agreement():
    a = rsc.Agreement(counted=10.0, counted_in_tumour=9.0, counted_in_benign=0.5, nuclei_in_tumour=12, nuclei=20)
    b = rsc.Agreement(counted=10.0, counted_in_tumour=7.0, counted_in_benign=0.0, nuclei_in_tumour=8, nuclei=15)
    rows = [{"slide": "a", "label": "1+", "call": "1+", "error": None, "variant": "full", "agreement": a.astuple()},
            {"slide": "b", "label": "2+", "call": "2+", "error": None, "variant": "full", "agreement": b.astuple()}]
    s = rsc.summarise(rows)
    assert s["tumour_precision"] == pytest.approx(16 / 20) and s["tumour_recall"] == pytest.approx(16 / 20)
    assert "precision 0.800" in rsc.format_summary("full, breast", s)
