"""Heatmap PNG: tile calls at the right thumbnail pixels, rejected tiles never in a class colour."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from wsi_her2.score.aggregate import HER2_CLASSES
from wsi_her2.errors import ConfigError
from wsi_her2.outputs.geojson import CLASS_COLORS, QC_REJECTED
from wsi_her2.outputs.heatmap import default_legend, render_heatmap, save_heatmap_png

FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures"
CLASSES = list(HER2_CLASSES)
SCALE = 1 / 16  # thumbnail px per level-0 px
WHITE = 255


def white(h=100, w=200):
    return np.full((h, w, 3), WHITE, dtype=np.uint8)


def paint(coords, calls, *, thumb=None, alpha=1.0, **kw):
    return render_heatmap(
        white() if thumb is None else thumb,
        thumb_px_per_level0_px=SCALE,
        coords_level0=np.asarray(coords),
        tile_size_level0=256,
        calls=np.asarray(calls),
        class_names=CLASSES,
        alpha=alpha,
        **kw,
    )


def test_planted_tile_gets_its_class_colour_at_the_right_pixels():
    # level-0 (320, 160) + 256 px at 1/16 -> thumbnail x 20..36, y 10..26
    out = paint([[320, 160]], [2])
    colour = np.array(CLASS_COLORS["HER2 2+"], dtype=np.uint8)
    assert (out[10:26, 20:36] == colour).all()
    mask = np.zeros(out.shape[:2], dtype=bool)
    mask[10:26, 20:36] = True
    assert (out[~mask] == WHITE).all()


def test_alpha_blends_with_the_thumbnail():
    thumb = np.full((100, 200, 3), 100, dtype=np.uint8)
    out = paint([[0, 0]], [3], thumb=thumb, alpha=0.45)
    c = np.array(CLASS_COLORS["HER2 3+"], dtype=np.float64)
    expected = np.round(0.55 * 100 + 0.45 * c).astype(np.uint8)
    assert (out[0:16, 0:16] == expected).all()
    assert (out[16:, :] == 100).all()


def test_rejected_tile_is_hatched_not_coloured_as_a_class():
    thumb = np.full((100, 200, 3), 200, dtype=np.uint8)
    out = paint([[320, 160]], [-1], thumb=thumb)
    region = out[10:26, 20:36].reshape(-1, 3)
    class_colours = [np.array(CLASS_COLORS[f"HER2 {c}"]) for c in CLASSES]
    for c in class_colours:
        assert not (region == c).all(axis=1).any()
    grey = np.array(CLASS_COLORS[QC_REJECTED])
    is_grey = (region == grey).all(axis=1)
    is_thumb = (region == 200).all(axis=1)
    assert is_grey.any() and is_thumb.any()  # hatched: grey lines with the tissue between
    assert (is_grey | is_thumb).all()
    # outside the tile nothing changed
    out[10:26, 20:36] = 200
    assert (out == 200).all()


def test_scored_tile_wins_over_an_overlapping_rejected_tile():
    # the rejected tile comes last in the input, yet the scored one is drawn on top
    out = paint([[0, 0], [0, 0]], [1, -1])
    assert (out[0:16, 0:16] == np.array(CLASS_COLORS["HER2 1+"])).all()


def test_several_classes_on_a_grid_meet_without_gaps():
    coords = [[0, 0], [256, 0], [512, 0], [768, 0]]
    out = paint(coords, [0, 1, 2, 3])
    for k, c in enumerate(CLASSES):
        assert (out[0:16, 16 * k : 16 * (k + 1)] == np.array(CLASS_COLORS[f"HER2 {c}"])).all()


def test_tiles_at_the_edge_are_clipped_and_tiny_tiles_still_show():
    out = paint([[3100, 1550]], [0])  # thumbnail x 193.75.., y 96.9..: partly outside
    assert (out[97:, 194:] == np.array(CLASS_COLORS["HER2 0"])).all()
    tiny = render_heatmap(white(), thumb_px_per_level0_px=1 / 1000, coords_level0=np.array([[5000, 5000]]),
                          tile_size_level0=256, calls=np.array([3]), class_names=CLASSES, alpha=1.0)
    assert (tiny[5, 5] == np.array(CLASS_COLORS["HER2 3+"])).all()
    assert (tiny == np.array(CLASS_COLORS["HER2 3+"])).all(axis=2).sum() == 1


def test_thumbnail_origin_shifts_tiles():
    out = paint([[320 + 1600, 160 + 800]], [2], thumb_origin_level0=(1600, 800))
    assert (out[10:26, 20:36] == np.array(CLASS_COLORS["HER2 2+"])).all()


def test_colour_overrides():
    out = paint([[0, 0]], [0], colors={"0": (1, 2, 3)})
    assert (out[0:16, 0:16] == np.array([1, 2, 3])).all()


@pytest.mark.parametrize(
    "change",
    [
        {"thumbnail": np.zeros((10, 10, 3), dtype=np.float32)},
        {"calls": np.array([4])},
        {"calls": np.array([0, 1])},
        {"alpha": 1.5},
        {"thumb_px_per_level0_px": 0.0},
    ],
)
def test_bad_inputs_raise_config_error(change):
    kw = dict(thumbnail=white(), thumb_px_per_level0_px=SCALE, coords_level0=np.array([[0, 0]]),
              tile_size_level0=256, calls=np.array([0]), class_names=CLASSES)
    kw.update(change)
    with pytest.raises(ConfigError):
        render_heatmap(kw.pop("thumbnail"), **kw)


def test_png_is_readable_with_title_and_legend(tmp_path):
    out = paint([[0, 0], [256, 0]], [0, -1])
    legend = default_legend(CLASSES)
    assert list(legend) == ["HER2 0", "HER2 1+", "HER2 2+", "HER2 3+", QC_REJECTED]
    path = save_heatmap_png(out, tmp_path / "sub" / "slide-1.png",
                            title="slide-1: HER2 2+ (asco, confidence 0.93)", legend=legend)
    with Image.open(path) as im:
        assert im.format == "PNG"
        png = np.asarray(im.convert("RGB"))
    zoom = 5  # 200 px wide -> 1000 px: nearest neighbour, integer factor
    assert png.shape[1] == 200 * zoom
    # the heatmap sits below the title bar, each pixel a sharp 5 x 5 square: find it by its planted tile
    title_h = next(r for r in range(png.shape[0]) if (png[r, 0:16] == CLASS_COLORS["HER2 0"]).all())
    assert title_h > 0
    big = np.repeat(np.repeat(out, zoom, 0), zoom, 1)
    assert (png[title_h : title_h + 100 * zoom, : 200 * zoom] == big).all()
    # every legend colour appears as a swatch in the strip below the heatmap
    strip = png[title_h + 100 * zoom :].reshape(-1, 3)
    for rgb in legend.values():
        assert (strip == np.array(rgb)).all(axis=1).any(), rgb
    # the title bar holds dark text pixels
    assert (png[:title_h] < 100).all(axis=2).any()


def test_png_without_title_or_legend_is_the_image_enlarged(tmp_path):
    img = np.random.default_rng(0).integers(0, 255, (300, 400, 3), dtype=np.uint8)
    path = save_heatmap_png(img, tmp_path / "plain.png")
    with Image.open(path) as im:
        assert (np.asarray(im.convert("RGB")) == np.repeat(np.repeat(img, 3, 0), 3, 1)).all()
    big = np.zeros((1200, 900, 3), np.uint8)
    with Image.open(save_heatmap_png(big, tmp_path / "big.png")) as im:
        assert im.size == (900, 1200)  # already readable: left as is
    with pytest.raises(ConfigError):
        save_heatmap_png(img, tmp_path / "plain.jpg")


def _text_rows(png: np.ndarray) -> np.ndarray:
    return (png < 100).all(axis=2).any(axis=1)


def test_tiny_core_heatmap_is_readable_and_its_long_title_is_never_cut(tmp_path):
    """Regression: a 1.4 mm core came out 240 px wide with its title cut off."""
    from wsi_her2.outputs.heatmap import write_call_heatmap

    thumb = np.full((60, 40, 3), 230, np.uint8)  # a core at 8 µm/px, portrait
    coords = np.array([[x, y] for y in range(0, 900, 224) for x in range(0, 600, 224)])
    calls = np.arange(len(coords)) % 5 - 1
    call = {"her2_score": "2+", "method": "asco", "confidence": 0.87, "n_tiles_used": 9,
            "class_fractions": {"0": 0.111, "1+": 0.222, "2+": 0.333, "3+": 0.334}}
    sid = "TMA-block-7_core-B12_with-a-very-long-identifier-from-the-scanner-0123456789"
    path = write_call_heatmap(tmp_path / "core.png", thumbnail=thumb, thumb_px_per_level0_px=1 / 16,
                              coords_level0=coords, tile_size_level0=224, calls=calls, class_names=CLASSES,
                              slide_call=call, slide_id=sid)
    with Image.open(path) as im:
        png = np.asarray(im.convert("RGB"))
    assert max(png.shape[:2]) >= 1000
    # long title wrapped onto several text lines above the picture, all inside the canvas
    first_picture_row = next(r for r in range(png.shape[0]) if not (png[r] == 255).all(axis=1).any())
    rows = _text_rows(png[:first_picture_row])
    lines = np.count_nonzero(np.diff(rows.astype(int)) == 1) + int(rows[0])
    assert lines >= 2
    assert not (png[:, -2:] < 100).all(axis=2).any()  # no text runs into the right edge


def test_call_legend_holds_the_class_fractions():
    from wsi_her2.outputs.heatmap import call_legend

    legend = call_legend(CLASSES, slide_call={"class_fractions": {"0": 0.5, "1+": 0.25, "2+": 0.25, "3+": 0.0}},
                         n_rejected=7)
    assert list(legend) == ["HER2 0: 50 % of tiles", "HER2 1+: 25 % of tiles", "HER2 2+: 25 % of tiles",
                            "HER2 3+: 0 % of tiles", "QC rejected: 7 tiles"]
    cells = call_legend(CLASSES, slide_call={"class_fractions": {"0": 0.5, "1+": 0.5, "2+": 0.0, "3+": 0.0},
                                             "details": {"unit": "tumour cells"}})
    assert next(iter(cells)) == "HER2 0: 50 % of tumour cells"  # a cell-level call says so


def test_measure_map_colours_follow_the_values_and_gets_a_colour_bar(tmp_path):
    from wsi_her2.outputs.heatmap import render_measure_map, write_measure_heatmap
    from wsi_her2.outputs.picture_layout import viridis_lut

    coords = [[0, 0], [256, 0], [512, 0], [768, 0]]
    values = np.array([0.0, 0.5, 1.0, np.nan])
    out, lo, hi = render_measure_map(white(), thumb_px_per_level0_px=SCALE, coords_level0=coords,
                                     tile_size_level0=256, values=values, vmin=0, vmax=1, alpha=1.0)
    lut = viridis_lut()
    assert (lo, hi) == (0.0, 1.0)
    assert (out[0:16, 0:16] == lut[0]).all() and (out[0:16, 32:48] == lut[255]).all()
    assert (out[0:16, 16:32] == lut[128]).all()
    missing = out[0:16, 48:64].reshape(-1, 3)  # NaN: hatched grey, never a colour of the scale
    assert ((missing == CLASS_COLORS[QC_REJECTED]).all(1) | (missing == WHITE).all(1)).all()
    path = write_measure_heatmap(tmp_path / "m.png", thumbnail=white(), thumb_px_per_level0_px=SCALE,
                                 coords_level0=np.array(coords), tile_size_level0=256, values=values, measure="p_3+",
                                 slide_call={"her2_score": "0", "method": "asco", "confidence": 1.0}, slide_id="s")
    with Image.open(path) as im:
        png = np.asarray(im.convert("RGB"))
    assert png.shape[1] >= 1000
    bar = png[-60:].reshape(-1, 3)  # the colour bar at the bottom holds both ends of the scale
    assert (np.abs(bar.astype(int) - lut[0]).sum(1) < 10).any() and (np.abs(bar.astype(int) - lut[255]).sum(1) < 10).any()


def test_on_a_real_slide_thumbnail(tmp_path):
    slide_path = FIXTURES / "slides" / "CMU-1-Small-Region.svs"
    if not slide_path.exists():
        pytest.skip("shared fixtures not present")
    tiffslide = pytest.importorskip("tiffslide")
    with tiffslide.TiffSlide(slide_path) as slide:
        w0, h0 = slide.dimensions
        thumb = np.asarray(slide.get_thumbnail((400, 400)).convert("RGB"))
    scale = thumb.shape[1] / w0
    gx, gy = np.meshgrid(np.arange(0, w0 - 256, 256), np.arange(0, h0 - 256, 256))
    coords = np.stack([gx.ravel(), gy.ravel()], axis=1)
    calls = np.arange(len(coords)) % 5 - 1
    out = render_heatmap(thumb, thumb_px_per_level0_px=scale, coords_level0=coords, tile_size_level0=256,
                         calls=calls, class_names=CLASSES)
    assert out.shape == thumb.shape
    assert not (out == thumb).all()
    path = save_heatmap_png(out, tmp_path / "cmu.png", title="CMU-1: test", legend=default_legend(CLASSES))
    with Image.open(path) as im:
        assert im.size[0] >= thumb.shape[1]


@pytest.mark.slow
def test_100k_tiles_are_painted():
    n = 100_000
    side = int(np.ceil(np.sqrt(n)))
    gx, gy = np.meshgrid(np.arange(side), np.arange(side))
    coords = np.stack([gx.ravel(), gy.ravel()], axis=1)[:n] * 512
    calls = np.random.default_rng(0).integers(-1, 4, n)
    thumb = np.full((2000, 2000, 3), 230, dtype=np.uint8)
    # Speed at this size is benchmarks/bench_outputs.py's business; here: the picture is painted.
    out = render_heatmap(thumb, thumb_px_per_level0_px=2000 / (side * 512), coords_level0=coords,
                         tile_size_level0=512, calls=calls, class_names=CLASSES)
    assert out.shape == thumb.shape
    assert not (out == thumb).all()
