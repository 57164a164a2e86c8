"""Tests of wsi_her2.synthetic.image_slide: images made into slides, composited on glass, resampled."""
from __future__ import annotations

import numpy as np
import pytest

from wsi_her2.errors import ConfigError
from wsi_her2.synthetic.image_slide import (
    LAVENDER_GLASS_RGB,
    composite_on_glass,
    disc_cover,
    resample_to_mpp,
    write_image_slide,
)
from wsi_her2.slide import open_slide
from wsi_her2.slide.mpp import resolve_mpp
from wsi_her2.synthetic.textures import block_mean


def smooth_image(h: int, w: int, seed: int = 0) -> np.ndarray:
    """Smooth colour gradients plus blobs: JPEG keeps such content within a few grey levels."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    rng = np.random.default_rng(seed)
    img = np.stack([120 + 80 * np.sin(xx / 47 + c) * np.cos(yy / 61 - c) for c in (0.0, 1.1, 2.3)], -1)
    for _ in range(6):
        cx, cy, r = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(20, 60)
        img[(xx - cx) ** 2 + (yy - cy) ** 2 < r * r] -= 40
    return np.clip(img, 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def image_and_slide(tmp_path_factory):
    img = smooth_image(1100, 1300)  # not multiples of the 256 px tile: padded edge tiles
    path = write_image_slide(img, tmp_path_factory.mktemp("img") / "patch 1+.svs", mpp_um=0.25,
                             jpeg_rgb=True)
    return img, path


@pytest.mark.parametrize("backend", ["tiffslide", "openslide"])
def test_round_trip_pixels_levels_and_mpp(image_and_slide, backend):
    img, path = image_and_slide
    with open_slide(path, backend=backend) as reader:
        mpp = resolve_mpp(reader)
        assert mpp.mpp_um == pytest.approx(0.25) and mpp.source.startswith("vendor:")
        assert reader.dimensions == (1300, 1100)
        assert [lv.downsample for lv in reader.levels] == pytest.approx([1, 4])
        assert (reader.levels[1].width_px, reader.levels[1].height_px) == (325, 275)
        level0 = reader.read_level_region(0, 0, 0, 1300, 1100).astype(np.int16)
        level1 = reader.read_level_region(1, 0, 0, 325, 275).astype(np.int16)
    err0 = np.abs(level0 - img)
    assert err0.mean() < 1.5 and np.percentile(err0, 99) <= 6  # JPEG q90, RGB 4:4:4
    err1 = np.abs(level1 - block_mean(img, 4))
    assert err1.mean() < 2.0


def test_both_backends_decode_identical_pixels(image_and_slide):
    _, path = image_and_slide
    with open_slide(path, backend="tiffslide") as a, open_slide(path, backend="openslide") as b:
        np.testing.assert_array_equal(a.read_level_region(0, 200, 300, 700, 500),
                                      b.read_level_region(0, 200, 300, 700, 500))


def test_small_image_gets_one_level_and_ycbcr_default(tmp_path):
    img = smooth_image(300, 200)
    path = write_image_slide(img, tmp_path / "small.svs", mpp_um=1.0)
    with open_slide(path, backend="tiffslide") as reader:
        assert len(reader.levels) == 1 and resolve_mpp(reader).mpp_um == pytest.approx(1.0)
        err = np.abs(reader.read_level_region(0, 0, 0, 200, 300).astype(np.int16) - img)
    assert err.mean() < 3.0


@pytest.mark.parametrize("kwargs", [{"mpp_um": 0.0}, {"mpp_um": 50.0}, {"mpp_um": 0.5, "tile_px": 100}])
def test_write_refuses_bad_options(tmp_path, kwargs):
    with pytest.raises(ConfigError):
        write_image_slide(smooth_image(64, 64), tmp_path / "x.svs", **kwargs)


def test_write_refuses_non_rgb_uint8(tmp_path):
    with pytest.raises(ConfigError, match="uint8 RGB"):
        write_image_slide(np.zeros((64, 64), np.uint8), tmp_path / "x.svs", mpp_um=0.5)
    with pytest.raises(ConfigError, match="uint8 RGB"):
        write_image_slide(np.zeros((64, 64, 3), np.float32), tmp_path / "x.svs", mpp_um=0.5)


def test_core_keeps_a_disc_of_the_image_and_glass_elsewhere():
    img = np.full((400, 300, 3), (120, 80, 40), np.uint8)
    margin = 50
    out = composite_on_glass(img, shape="core", margin_px=margin, seed=3)
    assert out.shape == (500, 400, 3) and out.dtype == np.uint8
    tissue = np.all(out == (120, 80, 40), axis=-1)
    # disc of diameter min(h, w) = 300 centred on the image: area pi * 150^2 within the rim
    assert tissue.sum() == pytest.approx(np.pi * 150**2, rel=0.01)
    ys, xs = np.nonzero(tissue)
    assert xs.mean() == pytest.approx(margin + 150, abs=0.5) and ys.mean() == pytest.approx(margin + 200, abs=0.5)
    assert xs.max() - xs.min() + 1 == pytest.approx(300, abs=2) and ys.max() - ys.min() + 1 == pytest.approx(300, abs=2)
    glass = out[~tissue & (disc_cover(500, 400, cx_px=200, cy_px=250, radius_px=151) == 0)].astype(np.int16)
    dev = glass - np.asarray(LAVENDER_GLASS_RGB)
    assert np.abs(dev).max() <= 2 and 0.3 < dev.std() < 1.2  # slight noise, never more than 2 levels
    assert np.abs(dev.mean(axis=0)).max() < 0.05


def test_rect_keeps_the_whole_image_and_is_reproducible():
    img = smooth_image(120, 90)
    out = composite_on_glass(img, shape="rect", margin_px=10, glass_rgb=(240, 240, 232), seed=1)
    np.testing.assert_array_equal(out[10:130, 10:100], img)
    assert np.abs(out[:10].astype(int) - (240, 240, 232)).max() <= 2
    np.testing.assert_array_equal(out, composite_on_glass(img, shape="rect", margin_px=10,
                                                          glass_rgb=(240, 240, 232), seed=1))
    assert not np.array_equal(out, composite_on_glass(img, shape="rect", margin_px=10,
                                                      glass_rgb=(240, 240, 232), seed=2))


def test_composite_refuses_unknown_shape():
    with pytest.raises(ConfigError, match="shape"):
        composite_on_glass(smooth_image(32, 32), shape="oval")


def test_disc_cover_rim_is_antialiased():
    cover = disc_cover(21, 21, cx_px=10.5, cy_px=10.5, radius_px=8)
    assert cover[10, 10] == 1 and cover[0, 0] == 0
    assert ((cover > 0) & (cover < 1)).any()
    assert cover.sum() == pytest.approx(np.pi * 64, rel=0.03)


def test_resample_coarsen_is_an_area_mean_and_refine_is_cubic():
    img = smooth_image(200, 160)
    coarse = resample_to_mpp(img, 0.25, 1.0)
    assert coarse.shape == (50, 40, 3)
    np.testing.assert_allclose(coarse.astype(float), block_mean(img, 4).astype(float), atol=1)
    fine = resample_to_mpp(img, 1.0, 0.5)
    assert fine.shape == (400, 320, 3)
    # cubic: every other output sample sits between input samples; smooth content comes back
    back = resample_to_mpp(fine, 0.5, 1.0)
    assert np.abs(back.astype(int) - img).mean() < 1.5
    assert resample_to_mpp(img, 0.5, 0.5) is not img
    np.testing.assert_array_equal(resample_to_mpp(img, 0.5, 0.5), img)


def test_resample_refuses_bad_mpp():
    with pytest.raises(ConfigError, match="dst_mpp_um"):
        resample_to_mpp(smooth_image(16, 16), 1.0, 0.0)
