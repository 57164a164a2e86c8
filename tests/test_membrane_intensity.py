"""Membranes of known OD read as their grade at 0.25, 0.5 and 1.0 µm/px, through `tile` and `score`.

The ground truth needs no pathologist: cells whose membranes are rendered at a faint (0.15),
weak-moderate (0.5) or intense (1.2) DAB OD, imaged as a scanner does (0.75 NA optics, 0.25 µm/px
sensor, JPEG 85 with 4:2:0 colour: :mod:`wsi_her2.synthetic.membranes`), written as a slide whose
pyramid levels are 4:2:0 JPEG too, tiled at each resolution and scored. Each tile's membrane OD
must fall in the rendered grade's band. Reading OD per pixel (the previous scorer) gave 0.27 for
the 0.5 membrane at 0.5 µm/px and 0.20 for the 1.2 membrane at 1.0 µm/px.
"""
from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from wsi_her2.cli import main
from wsi_her2.models.ihc_thresholds import IhcThresholds
from wsi_her2.slide.chroma import jpeg_chroma_factor, level_chroma_factors
from wsi_her2.stain.membrane import membrane_response, membrane_smoothing_um
from wsi_her2.synthetic.cores import jpeg_roundtrip
from wsi_her2.synthetic.image_slide import write_image_slide
from wsi_her2.synthetic.membranes import render_membrane_field
from wsi_her2.tile.geometry import choose_geometry

T = IhcThresholds()
BANDS = {0.15: (T.dab_faint_od, T.dab_weak_od), 0.5: (T.dab_weak_od, T.dab_strong_od), 1.2: (T.dab_strong_od, 10.0)}
#: resolution -> tile px: 112 µm tiles (a cell cut by a tile edge is not graded; small tiles cut many), nine per field
TILES = {0.25: 448, 0.5: 224, 1.0: 112}


@pytest.fixture(scope="module")
def slides(tmp_path_factory):
    out = tmp_path_factory.mktemp("membranes")
    made = {}
    for od in BANDS:
        field = render_membrane_field(membrane_od=od, field_um=(336.0, 336.0), seed=1)
        made[od] = write_image_slide(field.rgb, out / f"m{od:g}.svs", mpp_um=0.25)  # levels: 4:2:0 JPEG
    return made


@pytest.mark.parametrize("mpp", sorted(TILES))
def test_rendered_membranes_read_as_their_grade_through_tile_and_score(slides, mpp, tmp_path):
    for od, slide in slides.items():
        assert main(["tile", str(slide), "-o", str(tmp_path), "--mpp", str(mpp), "--tile-px", str(TILES[mpp]), "-q"]) == 0
        assert main(["score", str(tmp_path / f"{slide.stem}.zarr"), "--min-tiles", "2", "-q"]) == 0
        table = pq.read_table(tmp_path / f"{slide.stem}.tiles.parquet").to_pandas()
        measured = table.loc[table.qc_pass, "dab_od_membrane"].to_numpy()
        lo, hi = BANDS[od]
        assert measured.size >= 2 and np.all((measured >= lo) & (measured < hi)), (od, mpp, measured.round(3))
        call = json.loads((tmp_path / f"{slide.stem}.json").read_text())["call"]
        assert call["her2_score"] == {0.15: "1+", 0.5: "2+", 1.2: "3+"}[od], (od, mpp, call["details"])


def test_membrane_response_is_the_peak_of_a_blurred_band():
    """A 1 µm band at 0.9 µm total blur peaks at erf(1 / (2 sqrt 2 0.9)) ~ 0.42, a little less when sampled coarsely."""
    from math import erf, sqrt

    from wsi_her2.models.ihc_score import IhcDabScorer

    ideal = erf(1.0 / (2 * sqrt(2) * 0.9))
    got = {p: IhcDabScorer(mpp_um=p).membrane_response for p in (0.25, 0.5, 1.0)}
    assert all(0.9 * ideal < v <= ideal * 1.02 for v in got.values()), got
    assert got[1.0] < got[0.25]  # a coarse pixel grid samples the peak less well
    unblurred = membrane_response(0.25, blur_um=0.9, optics_um=0.16, width_um=1.0, taps=None)
    assert unblurred > 0.95  # optics and 0.25 µm pixels alone barely lower a 1 µm band's peak
    assert membrane_smoothing_um(1.0, blur_um=0.9, optics_um=0.16) < membrane_smoothing_um(0.25, blur_um=0.9, optics_um=0.16)


def test_chroma_subsampling_is_read_and_a_sharp_colour_level_preferred(tmp_path):
    rgb = np.full((64, 64, 3), 200, np.uint8)
    import io

    from PIL import Image

    def encoded(sub):
        b = io.BytesIO()
        Image.fromarray(rgb).save(b, "JPEG", quality=90, subsampling=sub)
        return b.getvalue()

    assert jpeg_chroma_factor(encoded(2)) == 2 and jpeg_chroma_factor(encoded(0)) == 1
    slide = write_image_slide(jpeg_roundtrip(np.full((1024, 1024, 3), 200, np.uint8)), tmp_path / "s.svs", mpp_um=0.25)
    assert level_chroma_factors(slide, 2) == [2, 2]  # the writer stores YCbCr 4:2:0 levels, as scanners do
    kw = dict(level_dims=[(4000, 4000), (1000, 1000)], level_downsamples=[1.0, 4.0], slide_mpp_um=0.25,
              target_mpp_um=1.0, tile_px=112)
    assert choose_geometry(**kw).level == 1  # colour unknown: the coarsest level fine enough
    sharp = choose_geometry(**kw, level_chroma=[2, 2])
    assert sharp.level == 0 and sharp.chroma_mpp_um == pytest.approx(1.0)  # 0.5 µm colour, area-averaged to 1.0
    fast = choose_geometry(**kw, level_chroma=[2, 2], prefer_sharp_chroma=False)
    assert fast.level == 1 and fast.chroma_mpp_um == pytest.approx(2.0)


def test_a_slide_whose_only_colour_is_subsampled_is_scaled_back_through_tile_and_score(tmp_path):
    """A slide scanned at 1 µm/px as 4:2:0 JPEG has 2 µm colour samples and no sharper level: a 1 µm
    membrane keeps about half its colour difference. The tile stage records the colour sample width
    and the scorer scales the OD back, so each rendered grade still reads as itself."""
    from wsi_her2.store.patch_store import open_store

    for od in BANDS:
        field = render_membrane_field(membrane_od=od, field_um=(336.0, 336.0), seed=1)
        h, w = (s // 4 * 4 for s in field.rgb.shape[:2])
        coarse = field.rgb[:h, :w].reshape(h // 4, 4, w // 4, 4, 3).mean(axis=(1, 3)).round().astype(np.uint8)
        slide = write_image_slide(coarse, tmp_path / f"c{od:g}.svs", mpp_um=1.0, tile_px=112)
        assert main(["tile", str(slide), "-o", str(tmp_path), "--mpp", "1.0", "--tile-px", "112", "-q"]) == 0
        store = open_store(tmp_path / f"{slide.stem}.zarr")
        assert store.attrs["tiling"]["chroma_mpp_um"] == pytest.approx(2.0)
        assert main(["score", str(tmp_path / f"{slide.stem}.zarr"), "--min-tiles", "2", "-q"]) == 0
        table = pq.read_table(tmp_path / f"{slide.stem}.tiles.parquet").to_pandas()
        measured = table.loc[table.qc_pass, "dab_od_membrane"].to_numpy()
        lo, hi = BANDS[od]
        assert measured.size >= 2 and np.all((measured >= lo) & (measured < hi)), (od, measured.round(3))
        assert np.median(measured) == pytest.approx(od, rel=0.35), (od, measured.round(3))
