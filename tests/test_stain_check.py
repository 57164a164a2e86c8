"""Stain check: the DAB scorer refuses H&E (real fixture) and accepts real and synthetic DAB IHC."""
from __future__ import annotations

import numpy as np
import pytest
from conftest import FIXTURES, fixture_slide

from wsi_her2.errors import StainError
from wsi_her2.stain.check import MAX_EOSIN_SHARE, stain_shares
from wsi_her2.store.patch_store import open_store
from wsi_her2.tile.pipeline import TileConfig, tile_slide


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
    from wsi_her2.score.pipeline import ScoreConfig, score_store

    slide = fixture_slide("CMU-1-Small-Region.svs")
    store = tile_slide(slide, tmp_path, config=TileConfig(workers=1)).store
    with pytest.raises(StainError, match="not DAB IHC"):
        score_store(store, config=ScoreConfig(min_tiles=5))
    assert not (tmp_path / "CMU-1-Small-Region.json").exists()
    assert main(["score", str(store), "-q"]) == 1  # one line, exit non-zero
    forced = score_store(store, config=ScoreConfig(min_tiles=5, force=True))
    assert forced.call.her2_score


def test_synthetic_ihc_store_passes_and_other_models_are_not_checked(graded_slide, tmp_path):
    from wsi_her2.models import get_capabilities
    from wsi_her2.stain.check import check_stain_for_model

    store = open_store(tile_slide(graded_slide, tmp_path, config=TileConfig(workers=1)).store)
    report = check_stain_for_model(store, get_capabilities("ihc_dab").stain)
    assert report is not None and report.eosin_share < MAX_EOSIN_SHARE / 4 and report.dab_share > 0.3
    # trained models decide themselves: they declare no stain
    assert check_stain_for_model(store, get_capabilities("convnext_tiny").stain) is None
