"""Calls over tumour cells: grey is not brown, stroma does not dilute, HER2-low/ultralow categories."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from wsi_her2.score.aggregate import aggregate_asco_cells, her2_category
from wsi_her2.models.ihc_score import IhcDabScorer
from wsi_her2.synthetic.slides import graded_ihc_spec, render_region
from wsi_her2.synthetic.cores import jpeg_roundtrip


def _tiles(grade: int, n: int = 4):
    spec = graded_ihc_spec()
    r = spec.regions[grade]
    return spec, np.stack([render_region(spec, r.x_px + 224 * i, r.y_px + 300, 224, 224) for i in range(n)])


def _measure(tiles, mpp):
    x = torch.from_numpy(np.ascontiguousarray(tiles)).permute(0, 3, 1, 2).float() / 255.0
    return IhcDabScorer(mpp_um=mpp).measure(x)


@pytest.mark.parametrize("grey_od", [0.1, 0.25])
def test_grey_tinted_negative_tissue_stays_zero(grey_od):
    """Neutral absorbance (thick section, dense stroma) added to HER2 0 tissue must not read as DAB."""
    spec, tiles = _tiles(0)
    grey = np.clip(tiles.astype(np.float32) * 10 ** (-grey_od), 0, 255).astype(np.uint8)
    m = _measure(np.stack([jpeg_roundtrip(t, 90) for t in grey]), spec.mpp_um)
    assert m["probs"].argmax(dim=1).tolist() == [0] * len(tiles)
    assert float(m["frac_cells_1plus_or_more"].max()) < 0.10


def test_faint_brown_membranes_stay_1plus_through_jpeg():
    spec, tiles = _tiles(1)
    m = _measure(np.stack([jpeg_roundtrip(t, 80) for t in tiles]), spec.mpp_um)
    assert m["probs"].argmax(dim=1).tolist() == [1] * len(tiles)


def test_stroma_tiles_do_not_dilute_a_small_tumour_nest():
    """10 tiles of a 2+ nest among 90 stroma tiles with hardly any tumour cells: the call is 2+."""
    f = np.zeros((100, 3))
    w = np.full(100, 0.5)  # stroma: fibroblasts weigh little as tumour
    f[:10] = (1.0, 0.6, 0.02)
    w[:10] = 40.0
    call = aggregate_asco_cells(f, w)
    assert call.her2_score == "2+" and call.details["unit"] == "tumour cells"
    per_tile_vote = (f[:, 1] > 0.1).mean()  # what a tile-count rule would see: 10 % of tiles
    assert per_tile_vote <= 0.10


def test_too_few_tumour_cells_is_indeterminate_with_reason():
    call = aggregate_asco_cells(np.zeros((50, 3)), np.full(50, 2.0))
    assert call.her2_score == "indeterminate" and "tumour cells" in call.details["reason"]
    one_mm2 = aggregate_asco_cells(np.zeros((20, 3)), np.full(20, 150.0))  # a tumour-filled 1 mm²
    assert one_mm2.her2_score == "0"


@pytest.mark.parametrize(
    ("at_least", "score", "category"),
    [((0.0, 0.0, 0.0), "0", "null"), ((0.005, 0, 0), "0", "null"), ((0.05, 0, 0), "0", "ultralow"),
     ((0.099, 0, 0), "0", "ultralow"), ((0.12, 0.0, 0.0), "1+", "low"), ((0.5, 0.09, 0.0), "1+", "low"),
     ((0.5, 0.11, 0.0), "2+", "equivocal"), ((0.5, 0.5, 0.09), "2+", "equivocal"),
     ((0.5, 0.5, 0.11), "3+", "positive")],
)
def test_categories_either_side_of_each_boundary(at_least, score, category):
    call = aggregate_asco_cells(np.tile(at_least, (30, 1)), np.full(30, 20.0))
    assert call.her2_score == score
    assert her2_category(call.her2_score, call.details["fraction_at_least"][">=1+"]) == category


@pytest.mark.parametrize("mpp_um", [0.5, 1.0])
def test_tumour_share_does_not_depend_on_the_tile_size(mpp_um, torch_one_thread):
    """The same carcinoma cut into small or large tiles: nearly every nucleus is tumour either way
    (the cohesion window cut off by the tile edge is scaled up, not read as sparse tissue)."""
    import numpy as np
    import torch

    from wsi_her2.models.ihc_score import IhcDabScorer
    from wsi_her2.synthetic.textures import ihc_texture

    field = np.ascontiguousarray(ihc_texture(2, mpp_um, 3)[:896, :896])
    scorer = IhcDabScorer(mpp_um=mpp_um)
    shares = []
    for tile_px in (112, 224, 448):
        n = 896 // tile_px
        tiles = torch.from_numpy(field).reshape(n, tile_px, n, tile_px, 3).permute(0, 2, 4, 1, 3).reshape(-1, 3, tile_px, tile_px)
        m = scorer.measure(tiles.float() / 255.0)
        shares.append(float(m["tumour_cell_count"].sum() / m["cell_count"].sum()))
    assert min(shares) > 0.85, shares
    assert max(shares) - min(shares) < 0.05, shares
