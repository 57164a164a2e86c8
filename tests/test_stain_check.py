"""Stain check: the DAB scorer refuses H&E (real fixture) and accepts real and synthetic DAB IHC."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from conftest import FIXTURES, fixture_slide
from wsi_her2.errors import StainError
from wsi_her2.stain_check import MAX_EOSIN_SHARE, stain_shares
from wsi_her2.store import open_store
from wsi_her2.tile_pipeline import TileConfig, tile_slide


def test_real_ihc_patches_pass_the_stain_check():
    from PIL import Image

    paths = sorted((FIXTURES / "ihc_dev").glob("*.jpg"))
    if not paths:
        pytest.skip("real IHC patches not available")
    for path in paths:
        tile = np.asarray(Image.open(path).convert("RGB"))[None]
        report = stain_shares(tile)
        assert report.is_dab_ihc and report.eosin_share < MAX_EOSIN_SHARE / 4, path.name


def test_he_slide_is_refused_by_the_dab_scorer_unless_forced(tmp_path):
    from wsi_her2.cli import main
    from wsi_her2.score_pipeline import ScoreConfig, score_store

    slide = fixture_slide("CMU-1-Small-Region.svs")
    store = tile_slide(slide, tmp_path, config=TileConfig(workers=1)).store
    with pytest.raises(StainError, match="not DAB IHC"):
        score_store(store, config=ScoreConfig(min_tiles=5))
    assert not (tmp_path / "CMU-1-Small-Region.json").exists()
    assert main(["score", str(store), "-q"]) == 1  # one line, exit non-zero
    forced = score_store(store, config=ScoreConfig(min_tiles=5, force=True))
    assert forced.call["her2_score"]


def test_ihc_slide_is_scored(demo_slide, tmp_path):
    from wsi_her2.score_pipeline import ScoreConfig, score_store

    store = tile_slide(demo_slide, tmp_path, config=TileConfig(workers=1)).store
    res = score_store(store, config=ScoreConfig())
    assert res.call["her2_score"] == "2+"
    from wsi_her2.stain_check import slide_stain_report

    assert slide_stain_report(open_store(store)).eosin_share < MAX_EOSIN_SHARE / 4
    assert Path(res.outputs["geojson"]).exists()
